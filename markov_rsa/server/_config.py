"""ServerSettings and ServerConfig: everything ``markov-rsa serve`` is configured with."""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import Field, model_validator

from .._params import RSAParams
from .._settings import ENV_PREFIX, BackendSettings, JsonObject, Settings, StrList

MiB = 1024 * 1024


class Engine(str, Enum):
    """Where the proxy's generations run."""

    upstream = "upstream"
    local = "local"


class LogFormat(str, Enum):
    """How the proxy writes its log lines (its own, uvicorn's and the access log alike)."""

    text = "text"
    json = "json"


class LogLevel(str, Enum):
    """Lowest level of log line written."""

    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"


class ServerSettings(Settings):
    """Settings of the proxy itself: where it listens, who may call it, its limits and its logs."""

    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8100, ge=1, le=65535, description="Port to listen on (1-65535).")
    engine: Engine = Field(
        Engine.upstream,
        description="upstream: relay to the --backend servers; local: run the in-process engine.",
    )
    client_api_keys: StrList = Field(
        default_factory=list,
        repr=False,
        description="Key clients must send as 'Authorization: Bearer KEY'; repeatable. Unset: no auth.",
        json_schema_extra={"env_aliases": [ENV_PREFIX + "SERVE_API_KEYS"], "secret": True, "metavar": "KEY"},
    )
    log_level: LogLevel = Field(LogLevel.info, description="Lowest level of log line written.")
    log_format: LogFormat = Field(LogFormat.text, description="text, or json: one JSON object per line.")
    access_log: bool = Field(False, description="Log one line per HTTP request (method, path, status, time).")
    max_body_bytes: int = Field(4 * MiB, ge=1024, description="Largest request body accepted (413 past it).")
    max_request_tokens: int = Field(
        10_000_000, ge=1, description="Largest n*t*max_tokens an RSA request may ask for (400 past it)."
    )
    max_concurrent_runs: int = Field(16, ge=1, description="RSA runs executing at once.")
    max_queued_runs: int = Field(64, ge=0, description="RSA runs waiting for a slot; past it requests get 429.")
    log_prompts: bool = Field(False, description="Log request messages (off: prompts never reach the log).")
    rsa_by_default: bool = Field(True, description="Apply RSA to chat requests that do not say (rsa key absent).")
    strict_rsa: bool = Field(
        False, description="Answer 400 to an 'rsa' object with unknown fields or k > n (default: ignore, clamp)."
    )
    heartbeat_s: float = Field(10.0, gt=0, description="Seconds between SSE keep-alive comments of streamed runs.")
    probe_interval_s: float = Field(2.0, gt=0, description="Seconds between probes of an upstream taken out.")
    health_interval_s: float = Field(10.0, gt=0, description="Seconds between health checks of every upstream.")
    chat_template_kwargs: JsonObject | None = Field(
        None,
        description="Default chat_template_kwargs of RSA calls, as JSON (e.g. '{\"enable_thinking\": true}').",
        json_schema_extra={"metavar": "JSON"},
    )
    model_prefix: str = Field("mrsa/", min_length=1, description="A model name with this prefix turns RSA on.")


# Older keyword spellings of ServerConfig, still accepted from Python callers.
_LEGACY_UPSTREAM_KEYS = {
    "upstreams": "backend",
    "upstream_api_key": "backend_api_key",
    "upstream_concurrency": "concurrency",
    "upstream_timeout": "timeout",
    "upstream_idle_timeout": "idle_timeout",
    "max_response_bytes": "max_response_bytes",
    "upstream_max_retries": "max_retries",
    "tokenizer": "tokenizer",
    "model": "model",
}


class ServerConfig(ServerSettings):
    """Configuration of the OpenAI-compatible Markovian RSA proxy.

    ``upstream`` says how to reach the inference servers (fixed here, never taken from a request);
    ``defaults`` are the RSA parameters of every request that does not override them in its ``rsa`` key.
    """

    upstream: BackendSettings = Field(
        default_factory=lambda: BackendSettings.model_validate({}), description="The inference servers behind the proxy."
    )
    defaults: RSAParams = Field(default_factory=RSAParams, description="RSA parameters of requests that set none.")

    @model_validator(mode="before")
    @classmethod
    def _legacy_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "api_keys" in data:
            data["client_api_keys"] = data.pop("api_keys")
        moved = {new: data.pop(old) for old, new in _LEGACY_UPSTREAM_KEYS.items() if old in data}
        if moved:
            upstream = data.get("upstream") or {}
            if isinstance(upstream, BackendSettings):
                upstream = upstream.model_dump()
            data["upstream"] = {**upstream, **moved}
        return data
