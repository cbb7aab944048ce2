"""Reading a chat request: RSA or pass-through, and the RSA parameters it asks for.

The ``rsa`` body key follows Zyphra's RSA proxy: ``true``, ``false``, or an object whose fields
override the server's defaults. Its fields are :class:`RSAParams`'s, checked by
:func:`resolve_params`; nothing here lists them again. As Zyphra's proxy does, ``k`` above the
population is clamped to it and fields it does not know are ignored; both are reported in the
response's ``rsa`` object, and ``strict_rsa`` turns them back into 400s.
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
# Fields Zyphra's proxy documents for the ``rsa`` object. Those that are not RSAParams fields are
# server configuration here (--upstream-concurrency, --upstream-timeout, --upstream-max-retries), so
# they are accepted, even under strict_rsa, and reported as ignored.
ZYPHRA_KEYS = ("verifier", "max_concurrency", "request_timeout", "max_retries")

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


def _json_kind(value: Any) -> str:
    kinds = {str: "a string", int: "a number", float: "a number", list: "an array", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


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
        raise APIError(400, f"'rsa' must be true, false or an object, got {_json_kind(rsa_value)}", param="rsa")
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
        try:
            raw = json.dumps(body).encode()
        except RecursionError:
            raise APIError(400, "request body is nested too deeply", code="invalid_json") from None
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
    adjusted: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Parameters the proxy changed from what was asked, as ``{name: {"requested", "used", "reason"}}``."""
    ignored: list[str] = field(default_factory=list)
    """Fields of the ``rsa`` object that had no effect."""

    def report(self) -> dict[str, Any]:
        """What the response's ``rsa`` object says about how the request was read."""
        return {"adjusted": self.adjusted, "ignored": self.ignored}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _clamp_k(overrides: dict[str, Any], defaults: RSAParams) -> dict[str, dict[str, Any]]:
    """Zyphra's proxy draws ``min(k, n)`` candidates: a ``k`` above the population is lowered to it."""
    n = overrides.get("n", defaults.n)
    k = overrides.get("k", defaults.k)
    if not (_is_int(n) and _is_int(k)) or not 1 <= n < k:
        return {}
    overrides["k"] = n
    return {"k": {"requested": k, "used": n, "reason": f"k must not exceed the population n={n}"}}


def _budget_error(params: RSAParams, origin: dict[str, str], limit: int) -> APIError | None:
    """400 when the run could generate more than ``limit`` tokens, naming the field that takes it there.

    Every call the run can make counts: N*T rollouts of ``max_tokens`` each, plus the final
    aggregation call (of ``final_max_tokens``) when the selection may make one.
    """
    rounds = params.n * params.t * params.max_tokens
    final_calls = params.calls - params.n * params.t
    final_budget = params.final_max_tokens or params.max_tokens
    total = rounds + final_calls * final_budget
    if total <= limit:
        return None
    if rounds <= limit and params.final_max_tokens is not None:
        culprit = origin.get("final_max_tokens", "rsa.final_max_tokens")
    else:
        # The request's own fields are named before the server's defaults, the budget first.
        culprit = next(
            (origin[name] for name in ("max_tokens", "final_max_tokens", "n", "t") if name in origin), "rsa"
        )
    formula = f"n*t*max_tokens = {params.n}*{params.t}*{params.max_tokens}"
    if final_calls:
        formula += f", plus {final_budget} for the final aggregation call,"
    return APIError(
        400,
        f"{formula} = {total} tokens exceeds this server's limit of {limit} tokens per request (set by {culprit})",
        param=culprit,
        code="budget_exceeded",
    )


def _rsa_overrides(
    rsa_value: Any, strict: bool, origin: dict[str, str], ignored: list[str]
) -> tuple[dict[str, Any], bool]:
    """The RSAParams overrides of an ``rsa`` object, and whether it asks for progress chunks."""
    overrides: dict[str, Any] = {}
    if not isinstance(rsa_value, dict):
        return overrides, False
    for key, value in rsa_value.items():
        if key in PROXY_KEYS:
            continue
        if key in RSAParams.model_fields:
            overrides[key] = value
            origin[key] = f"rsa.{key}"
        elif key in ZYPHRA_KEYS or not strict:
            ignored.append(str(key))
        else:
            raise APIError(
                400,
                f"unknown RSA parameter {key!r}; known: {', '.join(RSAParams.model_fields)}",
                param=f"rsa.{key}",
                code="invalid_value",
            )
    return overrides, bool(rsa_value.get("progress"))


def parse_rsa_request(body: dict[str, Any], rsa_value: Any, config: ServerConfig) -> RSARequest:
    """Resolve the run's parameters: server defaults < the ``rsa`` object < request-level sampling fields.

    Request-level ``temperature``, ``top_p``, ``top_k``, ``seed`` and ``max_tokens`` (or
    ``max_completion_tokens``) override the rollout defaults, as on Zyphra's proxy. Unless
    ``config.strict_rsa``, a ``k`` above ``n`` is clamped and unknown ``rsa`` fields are ignored
    (both reported by :meth:`RSARequest.report`). Raises :class:`APIError` 400 naming the
    offending field.
    """
    origin: dict[str, str] = {}
    ignored: list[str] = []
    overrides, progress = _rsa_overrides(rsa_value, config.strict_rsa, origin, ignored)
    for request_key, param in REQUEST_OVERRIDES:
        value = body.get(request_key)
        if value is not None:
            overrides[param] = value
            origin[param] = request_key
    adjusted = {} if config.strict_rsa else _clamp_k(overrides, config.defaults)
    try:
        params = resolve_params(None, overrides, base=config.defaults)
    except ConfigError as err:
        param = origin.get(err.param or "", f"rsa.{err.param}" if err.param else "rsa")
        raise APIError(400, f"invalid RSA parameter: {err}", param=param, code="invalid_value") from None
    budget_error = _budget_error(params, origin, config.max_request_tokens)
    if budget_error is not None:
        raise budget_error
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
        adjusted=adjusted,
        ignored=ignored,
    )
