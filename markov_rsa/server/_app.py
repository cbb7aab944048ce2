"""The proxy app: routes, inbound auth, body limits, and the shared upstream pool and backend."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import logging.config
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Self

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from .._backend import Backend
from .._errors import ConfigError
from .._http import OpenAIBackend
from .._loop import available
from .._routing import UpstreamPool
from ..upstream import UpstreamClient
from ._config import ServerConfig
from ._errors import APIError
from ._limits import RunLimiter
from ._local import local_completion
from ._logging import REQUEST_ID, logging_config, request_id_from
from ._metrics import Metrics
from ._relay import Relay
from ._requests import ChatRoute, decide, parse_rsa_request
from ._rsa import RSAHandler

logger = logging.getLogger("markov_rsa.server")


class ClientDisconnected(Exception):
    """The client closed its connection before the answer was ready."""


class _CancelOnDisconnect:
    """Cancels the handler's task when the client disconnects, so the work it started stops too.

    Starlette only notices a disconnect when it next writes; a run or an upstream call can take
    minutes without writing anything, and would go on generating for nobody.
    """

    __slots__ = ("_receive", "_task", "_watcher", "disconnected")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Future[None] | None = None
        self.disconnected = False

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                if self._task is not None:
                    self._task.cancel()
                return

    def __enter__(self) -> Self:
        self._task = asyncio.current_task()
        self._watcher = asyncio.ensure_future(self._watch())
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._watcher is not None
        self._watcher.cancel()
        if self.disconnected and exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            assert self._task is not None
            self._task.uncancel()
            raise ClientDisconnected from None


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    return {
        400: "invalid",
        401: "unauthorized",
        404: "not_found",
        413: "too_large",
        429: "rejected",
        499: "cancelled",
        502: "upstream_error",
        504: "upstream_timeout",
    }.get(status, "client_error" if status < 500 else "error")


def _json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as err:
        raise APIError(400, f"request body is not valid JSON: {err}", code="invalid_json") from None
    except RecursionError:
        # The JSON decoder recurses once per level: a body nested deeper than the interpreter's
        # recursion limit is refused like any other unreadable body.
        raise APIError(400, "request body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return body


def _internal_error(where: str) -> Response:
    logger.exception("%s failed", where)
    return APIError(500, "internal error", code="internal_error").response()


class Proxy:
    """State of one app: configuration, metrics, run limits, and (once started) upstreams and backend."""

    def __init__(self, config: ServerConfig, backend_factory: Callable[[], Backend] | None = None) -> None:
        if not config.upstream.backend and backend_factory is None:
            raise ConfigError("the proxy needs at least one --upstream URL (or a local engine)", param="upstream")
        self.config = config
        self.backend_factory = backend_factory
        self.metrics = Metrics()
        self.limiter = RunLimiter(config.max_concurrent_runs, config.max_queued_runs)
        # Keys are compared as digests: equal lengths, and compare_digest takes the same time
        # whichever byte differs.
        self._key_digests = [hashlib.sha256(key.encode()).digest() for key in config.client_api_keys]
        self.pool: UpstreamPool | None = None
        self.client: UpstreamClient | None = None
        self.relay: Relay | None = None
        self.backend: Backend | None = None
        self.rsa: RSAHandler | None = None
        self._start_lock = asyncio.Lock()
        self._warm_up: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the shared pool, relay and backend (inside the server's event loop)."""
        config = self.config
        if self.backend_factory is not None:
            self.backend = self.backend_factory()
        else:
            upstream = config.upstream
            self.pool = UpstreamPool(
                upstream.backend,
                per_upstream_concurrency=upstream.concurrency,
                probe_interval_s=config.probe_interval_s,
                health_interval_s=config.health_interval_s,
                observer=self.metrics.upstream_call,
            )
            self.metrics.watch_pool(self.pool)
            # One client for RSA calls, tokenizer calls, health probes and pass-through alike.
            self.client = UpstreamClient(self.pool, **upstream.client_kwargs())
            self.relay = Relay(self.client, self.metrics)
            backend = self.backend = OpenAIBackend(self.client, upstream.model, **upstream.call_kwargs())
            self.client.start()
            self._warm_up = asyncio.create_task(self._find_tokenizer(backend), name="markov-rsa-tokenizer")
        self.rsa = RSAHandler(config, self.backend, self.limiter, self.metrics, model_in_extra=self.pool is not None)

    async def _find_tokenizer(self, backend: OpenAIBackend) -> None:
        """Find the upstreams' tokenizer before the first run needs it, once one answers.

        Without a tokenize endpoint that means reading tiktoken's encoding, which holds the
        interpreter for a good part of a second even in a worker thread: done on the first run,
        it would stall every other request then. An upstream that is not up yet is left to the
        first run, so that a server still starting is not taken for one without a tokenizer.
        """
        try:
            if any(await self.client.check()) if self.client is not None else False:
                await backend.get_tokenizer()
        except Exception:  # noqa: BLE001 - the first run will find it, or say why
            logger.debug("finding the tokenizer at start failed", exc_info=True)

    async def ensure_started(self) -> None:
        """Start on first use when the server ran without lifespan events (``--lifespan off``)."""
        if self.rsa is None:
            async with self._start_lock:
                if self.rsa is None:
                    await self.start()

    async def stop(self) -> None:
        """Close connections and stop health checks."""
        if self._warm_up is not None:
            self._warm_up.cancel()
            await asyncio.gather(self._warm_up, return_exceptions=True)
        if self.backend is not None:
            await self.backend.aclose()
        if self.client is not None:
            await self.client.aclose()

    # -- request plumbing -------------------------------------------------------------------------

    def authorize(self, header: bytes | str | None) -> None:
        """Raise 401 unless ``header`` (the Authorization value) carries a configured key (no keys: open)."""
        if not self._key_digests:
            return
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        digest = hashlib.sha256(token.strip().encode()).digest()
        matched = False
        for key in self._key_digests:
            # No early exit: the time taken does not say which key, if any, came close.
            matched |= hmac.compare_digest(digest, key)
        if not matched:
            raise APIError(401, "invalid API key", code="invalid_api_key")

    async def read_body(self, receive: Receive, declared: bytes | str | None) -> bytes:
        """The body, refused with 413 past ``max_body_bytes`` (before reading it when the length is declared)."""
        limit = self.config.max_body_bytes
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise APIError(400, "invalid Content-Length header") from None
            if size > limit:
                raise APIError(413, f"request body of {size} bytes exceeds the limit of {limit}", code="request_too_large")
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _request_body(self, request: Request) -> bytes:
        self.authorize(request.headers.get("authorization"))
        return await self.read_body(request.receive, request.headers.get("content-length"))

    def _record(self, endpoint: str, mode: str, status: int, started: float) -> None:
        self.metrics.request(endpoint, mode, _outcome(status), time.perf_counter() - started)

    # -- endpoints --------------------------------------------------------------------------------

    async def chat_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST /v1/chat/completions: Markovian RSA, or pass-through (tools, n > 1, rsa: false).

        A plain ASGI handler: this is the pass-through hot path, and Starlette's request and
        routing layers would cost as much as the relaying itself.
        """
        started = time.perf_counter()
        mode = "passthrough"
        gauge = self.metrics.passthrough_in_flight
        gauge.inc()
        if self.rsa is None:
            await self.ensure_started()
        authorization = length = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"content-length":
                length = value
        try:
            self.authorize(authorization)
            raw = await self.read_body(receive, length)
            body = _json_body(raw)
            route = decide(body, raw, self.config)
            if route.rsa:
                mode = "rsa"
                gauge.dec()
                gauge = self.metrics.in_flight.labels("rsa")
                gauge.inc()
                response = await self._rsa_chat(receive, route, started)
            elif self.relay is None:
                response = await self._local_chat(receive, route)
            elif body.get("stream"):
                response = await self.relay.stream(
                    "POST",
                    "/chat/completions",
                    route.raw,
                    lambda status: self._stream_done("chat", mode, status, started),
                )
            else:
                with _CancelOnDisconnect(receive):
                    response = await self.relay.unary("POST", "/chat/completions", route.raw, count_usage=True)
        except APIError as err:
            response = err.response()
        except ClientDisconnected:
            response = Response(status_code=499)
        except Exception:
            response = _internal_error("chat completion")
        if not isinstance(response, StreamingResponse):
            # Streams are counted when they end, and the in-flight gauge with them.
            gauge.dec()
            self._record("chat", mode, response.status_code, started)
        await response(scope, receive, send)

    def _stream_done(self, endpoint: str, mode: str, status: int, started: float) -> None:
        self.metrics.in_flight.labels(mode).dec()
        self._record(endpoint, mode, status, started)

    async def _rsa_chat(self, receive: Receive, route: ChatRoute, started: float) -> Response:
        assert self.rsa is not None
        rsa_request = parse_rsa_request(route.body, route.rsa_value, self.config)
        if self.config.log_prompts:
            logger.info("rsa request messages: %s", rsa_request.messages)
        ticket = self.rsa.admit()
        client_model = route.client_model or route.model or self.config.upstream.model or "markov-rsa"
        if rsa_request.stream:
            outcome_status = {"ok": 200, "error": 502, "cancelled": 499}
            return self.rsa.stream(
                rsa_request,
                ticket,
                route.model,
                client_model,
                lambda outcome: self._stream_done("chat", "rsa", outcome_status.get(outcome, 500), started),
            )
        with _CancelOnDisconnect(receive):
            completion = await self.rsa.complete(rsa_request, ticket, route.model, client_model)
        return JSONResponse(completion)

    async def _local_chat(self, receive: Receive, route: ChatRoute) -> Response:
        assert self.backend is not None
        model = route.model or self.config.upstream.model or self.backend.name
        with _CancelOnDisconnect(receive):
            return await local_completion(self.backend, route.body, self.config.defaults, model)

    async def completions(self, request: Request) -> Response:
        """POST /v1/completions: always passed through."""
        await self.ensure_started()
        started = time.perf_counter()
        try:
            raw = await self._request_body(request)
            body = _json_body(raw)
            if self.relay is None:
                raise APIError(404, "/v1/completions needs an upstream server; this proxy runs a local engine")
            route = decide(body, raw, self.config)
            if body.get("stream"):
                self.metrics.in_flight.labels("passthrough").inc()
                response = await self.relay.stream(
                    "POST",
                    "/completions",
                    route.raw,
                    lambda status: self._stream_done("completions", "passthrough", status, started),
                )
                if isinstance(response, StreamingResponse):
                    return response
                self.metrics.in_flight.labels("passthrough").dec()
            else:
                with _CancelOnDisconnect(request.receive):
                    response = await self.relay.unary("POST", "/completions", route.raw, count_usage=True)
        except APIError as err:
            response = err.response()
        except ClientDisconnected:
            response = Response(status_code=499)
        except Exception:
            response = _internal_error("completion")
        self._record("completions", "passthrough", response.status_code, started)
        return response

    async def models(self, request: Request) -> Response:
        """GET /v1/models: the upstreams' models, each also offered as ``<prefix><name>`` (RSA on)."""
        await self.ensure_started()
        try:
            self.authorize(request.headers.get("authorization"))
            if self.relay is not None:
                response = await self.relay.unary("GET", "/models", None)
                if response.status_code != 200:
                    return response
                try:
                    data = json.loads(bytes(response.body))
                except ValueError:
                    raise APIError(502, "the upstream's model list is not JSON", code="upstream_error") from None
            else:
                assert self.backend is not None
                name = self.config.upstream.model or self.backend.name
                data = {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "markov-rsa"}]}
        except APIError as err:
            return err.response()
        entries = data.get("data") if isinstance(data, dict) else None
        if isinstance(entries, list):
            prefix = self.config.model_prefix
            extra = [
                {**entry, "id": prefix + entry["id"], "root": entry.get("root", entry["id"])}
                for entry in entries
                if isinstance(entry, dict) and isinstance(entry.get("id"), str) and not entry["id"].startswith(prefix)
            ]
            data["data"] = entries + extra
        return JSONResponse(data)

    async def root_passthrough(self, request: Request) -> Response:
        """POST /tokenize and /detokenize: relayed to an upstream's root, as Zyphra's proxy does."""
        await self.ensure_started()
        try:
            raw = await self._request_body(request)
            if self.relay is None:
                raise APIError(404, f"{request.url.path} needs an upstream server")
            # Under the upstream's root, its path prefix kept (``http://h/prefix/v1`` -> ``/prefix/tokenize``).
            return await self.relay.unary("POST", request.url.path, raw, root=True)
        except APIError as err:
            return err.response()
        except ClientDisconnected:
            return Response(status_code=499)
        except Exception:
            return _internal_error(request.url.path)

    async def health(self, request: Request) -> Response:
        """GET /health: the proxy process is alive (no auth, no upstream call)."""
        return JSONResponse({"status": "ok"})

    def _may_see_details(self, request: Request) -> bool:
        """Whether upstream addresses and errors may be shown: no keys configured, or a valid key sent."""
        try:
            self.authorize(request.headers.get("authorization"))
        except APIError:
            return False
        return True

    async def ready(self, request: Request) -> Response:
        """GET /ready: 200 when at least one upstream answers its health check, else 503.

        Upstream addresses and last errors are shown only to callers with a valid key (when keys
        are configured); others see each upstream's name and health.
        """
        await self.ensure_started()
        if self.pool is None or self.client is None:
            return JSONResponse({"status": "ready"})
        results = await self.client.check()
        details = self._may_see_details(request)
        upstreams = [u.to_dict(details=details) for u in self.pool.upstreams]
        if any(results):
            return JSONResponse({"status": "ready", "upstreams": upstreams})
        return JSONResponse(
            {**APIError(503, "no upstream answers its health check", code="no_upstream").payload(), "upstreams": upstreams},
            status_code=503,
        )

    async def metrics_endpoint(self, request: Request) -> Response:
        """GET /metrics: Prometheus text format (upstreams labelled by name, never by address)."""
        self.metrics.runs_active.set(self.limiter.running)
        self.metrics.runs_queued.set(self.limiter.queued)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


class _ASGIEndpoint:
    """Marks a plain ASGI callable as such for Starlette's router (which wraps bare functions)."""

    def __init__(self, handler: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


class _ProxyApp(FastAPI):
    """FastAPI, with ``POST /v1/chat/completions`` answered before the middleware stack.

    Pass-through requests are the proxy's hot path; the error, telemetry and routing middlewares
    cost as much per request as relaying it. The route is also registered normally, so the router
    handles every other method and path as usual.
    """

    def __init__(self, proxy: Proxy, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._chat = proxy.chat_completions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        # Every response carries the request's x-request-id (the client's, or a new one), and every
        # log line written while answering it names it.
        request_id = request_id_from(scope["headers"], lambda: uuid.uuid4().hex)
        token = REQUEST_ID.set(request_id)
        header = (b"x-request-id", request_id.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        try:
            if scope["method"] == "POST" and scope["path"] == "/v1/chat/completions":
                await self._chat(scope, receive, send_with_id)
            else:
                await super().__call__(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


def create_app(config: ServerConfig, backend_factory: Callable[[], Backend] | None = None) -> FastAPI:
    """The proxy as an ASGI app.

    With ``backend_factory`` (e.g. the in-process local engine) RSA runs on that backend and
    pass-through requests become plain generations on it; otherwise every call goes to
    ``config.upstream.backend``. The pool, relay and backend are created when the app starts and are
    shared by all requests.
    """
    proxy = Proxy(config, backend_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await proxy.start()
        try:
            yield
        finally:
            await proxy.stop()

    app = _ProxyApp(
        proxy,
        title="markov-rsa proxy",
        description="OpenAI-compatible proxy that answers chat completions with Markovian RSA.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.proxy = proxy
    # Plain Starlette routes: the handlers read the raw body themselves, so FastAPI's request
    # models and dependency resolution would only add cost on the pass-through path.
    app.router.routes.append(Route("/v1/chat/completions", _ASGIEndpoint(proxy.chat_completions), methods=["POST"]))
    app.add_route("/v1/completions", proxy.completions, methods=["POST"])
    app.add_route("/v1/models", proxy.models, methods=["GET"])
    app.add_route("/tokenize", proxy.root_passthrough, methods=["POST"])
    app.add_route("/detokenize", proxy.root_passthrough, methods=["POST"])
    app.add_route("/health", proxy.health, methods=["GET"])
    app.add_route("/healthz", proxy.health, methods=["GET"])
    app.add_route("/ready", proxy.ready, methods=["GET"])
    app.add_route("/metrics", proxy.metrics_endpoint, methods=["GET"])

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return APIError(exc.status_code, message).response()

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        return APIError(400, str(first.get("msg", "invalid request")), param=".".join(loc) or None).response()

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    return app


def run_server(
    config: ServerConfig,
    host: str | None = None,
    port: int | None = None,
    *,
    log_level: str | None = None,
    backend_factory: Callable[[], Backend] | None = None,
) -> None:
    """Serve the proxy until interrupted (uvicorn, on uvloop and httptools when installed).

    ``host``, ``port`` and ``log_level`` default to the config's; the log format, the access log
    and the quiet library loggers follow the config too (see :func:`logging_config`).
    """
    import uvicorn

    level = (log_level or config.log_level.value).lower()
    log_config = logging_config(level, config.log_format.value)
    logging.config.dictConfig(log_config)
    logging.captureWarnings(True)  # Python warnings too come out in the one log format
    app = create_app(config, backend_factory)
    uvicorn.run(
        app,
        host=host or config.host,
        port=port or config.port,
        loop="uvloop" if available("uvloop") else "asyncio",
        http="httptools" if available("httptools") else "h11",
        log_level=level,
        log_config=log_config,
        access_log=config.access_log,
        backlog=2048,
        timeout_keep_alive=30,
        proxy_headers=False,
    )
