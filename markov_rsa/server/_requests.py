"""Reading a chat request: RSA or pass-through, and the RSA parameters it asks for.

The ``rsa`` body key follows Zyphra's RSA proxy: ``true``, ``false``, or an object whose fields
override the server's defaults. Its fields are :class:`RSAParams`'s, checked by
:func:`resolve_params`; nothing here lists them again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .._controller import to_messages
from .._errors import ConfigError
from .._params import RSAParams, resolve_params
from .._types import Message
from ._config import ServerConfig
from ._errors import APIError

# Keys of the ``rsa`` object that steer the proxy rather than the algorithm.
PROXY_KEYS = ("enabled", "progress")
# Zyphra's proxy accepts these server-level knobs per request; here they are server configuration
# (--upstream-concurrency, --upstream-timeout, --upstream-max-retries), so they are accepted and ignored.
IGNORED_KEYS = ("max_concurrency", "request_timeout", "max_retries")

# Request fields that override the rollout defaults, mapped to the RSAParams field they set.
# ``max_completion_tokens`` comes after ``max_tokens`` so that it wins, as it does on vLLM.
REQUEST_OVERRIDES = (
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("top_k", "top_k"),
    ("seed", "seed"),
    ("max_tokens", "max_tokens"),
    ("max_completion_tokens", "max_tokens"),
)

# Request fields the proxy handles itself; everything else rides along on every upstream call.
OWNED_FIELDS = frozenset(
    {
        "model",
        "messages",
        "rsa",
        "n",
        "stream",
        "stream_options",
        "chat_template_kwargs",
        "logprobs",
        "top_logprobs",
        "echo",
        "user",
        "return_token_ids",
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "parallel_tool_calls",
        *(name for name, _ in REQUEST_OVERRIDES),
    }
)


@dataclass
class ChatRoute:
    """How one chat request is served."""

    rsa: bool
    body: dict[str, Any]
    raw: bytes
    """The body to forward upstream: the client's bytes unless the proxy's own keys had to go."""
    model: str | None
    """The upstream model name (prefix removed); None when the request names none."""
    client_model: str | None
    rsa_value: Any = None


def decide(body: dict[str, Any], raw: bytes, config: ServerConfig) -> ChatRoute:
    """RSA or pass-through: tools, ``n > 1``, ``rsa: false`` and ``{"enabled": false}`` pass through.

    A model named ``<prefix><name>`` turns RSA on (for clients that can only set a model name).
    """
    client_model = body.get("model")
    model = client_model if isinstance(client_model, str) and client_model else None
    forced = False
    if model is not None and model.startswith(config.model_prefix):
        model = model[len(config.model_prefix) :] or None
        forced = True
    rsa_value = body.get("rsa")
    if rsa_value is not None and not isinstance(rsa_value, (bool, dict)):
        raise APIError(400, f"'rsa' must be true, false or an object, got {json.dumps(rsa_value)[:80]}", param="rsa")
    n = body.get("n")
    passthrough = (
        bool(body.get("tools") or body.get("functions"))
        or (isinstance(n, int) and not isinstance(n, bool) and n > 1)
        or rsa_value is False
        or (isinstance(rsa_value, dict) and rsa_value.get("enabled") is False)
    )
    rsa = not passthrough and (rsa_value is not None or forced or config.rsa_by_default)
    if "rsa" in body or forced:
        # The upstream must not see the proxy's own key nor a model name only the proxy knows.
        body = {key: value for key, value in body.items() if key != "rsa"}
        if forced:
            if model is None:
                body.pop("model", None)
            else:
                body["model"] = model
        raw = json.dumps(body).encode()
    return ChatRoute(rsa, body, raw, model, client_model if isinstance(client_model, str) else None, rsa_value)


@dataclass
class RSARequest:
    """An RSA chat request, validated."""

    params: RSAParams
    messages: list[Message]
    progress: bool = False
    """Whether the client asked for progress chunks in its stream."""
    stream: bool = False
    include_usage: bool = False
    request_extra: dict[str, Any] = field(default_factory=dict)
    chat_template_kwargs: dict[str, Any] | None = None


def parse_rsa_request(body: dict[str, Any], rsa_value: Any, config: ServerConfig) -> RSARequest:
    """Resolve the run's parameters: server defaults < the ``rsa`` object < request-level sampling fields.

    Request-level ``temperature``, ``top_p``, ``top_k``, ``seed`` and ``max_tokens`` (or
    ``max_completion_tokens``) override the rollout defaults, as on Zyphra's proxy. Raises
    :class:`APIError` 400 naming the offending field.
    """
    overrides: dict[str, Any] = {}
    progress = False
    origin: dict[str, str] = {}
    if isinstance(rsa_value, dict):
        progress = bool(rsa_value.get("progress"))
        for key, value in rsa_value.items():
            if key in PROXY_KEYS or key in IGNORED_KEYS:
                continue
            overrides[key] = value
            origin[key] = f"rsa.{key}"
    for request_key, param in REQUEST_OVERRIDES:
        value = body.get(request_key)
        if value is not None:
            overrides[param] = value
            origin[param] = request_key
    try:
        params = resolve_params(None, overrides, base=config.defaults)
    except ConfigError as err:
        param = origin.get(err.param or "", f"rsa.{err.param}" if err.param else "rsa")
        raise APIError(400, f"invalid RSA parameter: {err}", param=param, code="invalid_value") from None
    budget = params.n * params.t * params.max_tokens
    if budget > config.max_request_tokens:
        raise APIError(
            400,
            f"n*t*max_tokens = {params.n}*{params.t}*{params.max_tokens} = {budget} exceeds this server's "
            f"limit of {config.max_request_tokens} tokens per request",
            param="rsa",
            code="budget_exceeded",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise APIError(400, "'messages' must be a list of message objects", param="messages")
    try:
        checked = to_messages(messages)
    except ConfigError as err:
        raise APIError(400, str(err), param=err.param or "messages") from None
    stream_options = body.get("stream_options")
    requested_template = body.get("chat_template_kwargs")
    if requested_template is not None and not isinstance(requested_template, dict):
        raise APIError(400, "'chat_template_kwargs' must be an object", param="chat_template_kwargs")
    template = {**(config.chat_template_kwargs or {}), **(requested_template or {})}
    return RSARequest(
        params=params,
        messages=checked,
        progress=progress,
        stream=bool(body.get("stream")),
        include_usage=isinstance(stream_options, dict) and bool(stream_options.get("include_usage")),
        request_extra={key: value for key, value in body.items() if key not in OWNED_FIELDS},
        chat_template_kwargs=template or None,
    )
