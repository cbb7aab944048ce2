"""The simulated backend's HTTP application: OpenAI-compatible endpoints on Starlette."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._config import FakeBackendConfig
from ._generation import BadRequest, build_job, chat_prompt_ids, chat_prompts, text_prompts, validate_messages
from ._responses import CompletionResponse, error_response, fault_response
from ._solver import encoding
from ._state import FakeBackendStats, ServerState


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("The request body is not valid JSON.") from None
    except RecursionError:
        raise BadRequest("The request body is nested too deeply.") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


def _check_auth(state: ServerState, request: Request) -> Response | None:
    key = state.config.api_key
    if key is None:
        return None
    given = request.headers.get("authorization", "")
    if hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
        return None
    # vLLM answers a failed --api-key check with this bare shape, not OpenAI's error object.
    return JSONResponse({"error": "Unauthorized"}, status_code=401)


Endpoint = Callable[[Request], Awaitable[Response]]


def _rejected(state: ServerState, body: dict[str, Any]) -> Response | None:
    names = [name for name in state.config.reject_fields if name in body]
    if not names:
        return None
    if len(names) == 1:
        return error_response(400, f"Unrecognized request argument supplied: {names[0]}", names[0])
    # OpenAI names every unrecognised argument at once.
    return error_response(400, f"Unrecognized request arguments supplied: {', '.join(names)}", names[0])


def _generation_endpoint(state: ServerState, kind: Literal["chat", "text"]) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        state.bind()
        if (denied := _check_auth(state, request)) is not None:
            return denied
        try:
            body = await _json_object(request)
        except BadRequest as err:
            return error_response(err.status, str(err), err.param)
        number = state.record(body)
        await state.wait_if_held(number)
        if (rejected := _rejected(state, body)) is not None:
            return rejected
        try:
            prompts = chat_prompts(body) if kind == "chat" else text_prompts(body)
            job = build_job(state, kind, prompts, body, None if kind == "chat" else 16)
        except BadRequest as err:
            return error_response(err.status, str(err), err.param)
        fault = state.draw_fault(number, body.get("seed"))
        if fault in ("5xx", "429"):
            assert fault is not None
            return fault_response(fault, number, state.config.seed)
        return CompletionResponse(state, job, fault, job.stream)

    return endpoint


def _tokenize_endpoint(state: ServerState) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        if request.url.path.startswith("/v1/") and (denied := _check_auth(state, request)) is not None:
            return denied
        try:
            body = await _json_object(request)
            if isinstance(body.get("messages"), list):
                ids = chat_prompt_ids(validate_messages(body))
            else:
                text = body["prompt"] if "prompt" in body else body.get("content")
                if not isinstance(text, str):
                    raise BadRequest("prompt must be a string.", "prompt")
                ids = encoding().encode_ordinary(text)
        except BadRequest as err:
            return error_response(err.status, str(err), err.param)
        strs = None
        if body.get("return_token_strs"):
            enc = encoding()
            strs = [enc.decode_single_token_bytes(t).decode("utf-8", "replace") for t in ids]
        return JSONResponse(
            {"count": len(ids), "max_model_len": state.config.max_model_len, "tokens": ids, "token_strs": strs}
        )

    return endpoint


def _detokenize_endpoint(state: ServerState) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        if request.url.path.startswith("/v1/") and (denied := _check_auth(state, request)) is not None:
            return denied
        try:
            body = await _json_object(request)
            tokens = body.get("tokens")
            if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                raise BadRequest("tokens must be a list of integers.", "tokens")
            try:
                text = encoding().decode(tokens)
            except (KeyError, ValueError, OverflowError):
                raise BadRequest("tokens contains ids outside the vocabulary.", "tokens") from None
        except BadRequest as err:
            return error_response(err.status, str(err), err.param)
        return JSONResponse({"prompt": text})

    return endpoint


def create_app(config: FakeBackendConfig) -> tuple[Starlette, FakeBackendStats]:
    """The simulated backend as an ASGI application, and its live stats."""
    state = ServerState(config)

    async def models(request: Request) -> Response:
        if (denied := _check_auth(state, request)) is not None:
            return denied
        entry = {
            "id": config.model,
            "object": "model",
            "created": state.created,
            "owned_by": "markov-rsa",
            "max_model_len": config.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [entry]})

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    async def stats(request: Request) -> Response:
        include_log = request.query_params.get("log", "").lower() in ("1", "true", "yes")
        return JSONResponse(state.stats.to_dict(include_log=include_log))

    routes = [
        Route("/v1/chat/completions", _generation_endpoint(state, "chat"), methods=["POST"]),
        Route("/v1/completions", _generation_endpoint(state, "text"), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/stats", stats, methods=["GET"]),
    ]
    if config.support_tokenize:
        tokenize, detokenize = _tokenize_endpoint(state), _detokenize_endpoint(state)
        for prefix in ("", "/v1"):
            routes.append(Route(f"{prefix}/tokenize", tokenize, methods=["POST"]))
            routes.append(Route(f"{prefix}/detokenize", detokenize, methods=["POST"]))
    app = Starlette(routes=routes)
    app.state.fake_backend = state
    return app, state.stats


def app_state(app: Starlette) -> ServerState:
    """The simulated backend's state behind an app made by :func:`create_app`."""
    state: ServerState = app.state.fake_backend
    return state
