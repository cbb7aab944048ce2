"""ServerConfig: everything ``markov-rsa serve`` is configured with."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .._params import RSAParams
from ..upstream import DEFAULT_MAX_RESPONSE_BYTES

MiB = 1024 * 1024


class ServerConfig(BaseModel):
    """Configuration of the OpenAI-compatible Markovian RSA proxy.

    The upstreams are fixed here and never taken from a request. ``defaults`` are the RSA parameters
    of every request that does not override them in its ``rsa`` key.
    """

    model_config = ConfigDict(extra="forbid")

    upstreams: list[str] = Field(default_factory=list, description="OpenAI base URLs of the inference servers.")
    api_keys: list[str] = Field(
        default_factory=list, repr=False, description="Bearer keys clients must present; empty: no inbound auth."
    )
    upstream_api_key: str | None = Field(None, repr=False, description="Bearer key the proxy sends upstream.")
    model: str | None = Field(None, description="Model for RSA calls when a request names none (default: upstream's first).")
    defaults: RSAParams = Field(default_factory=RSAParams, description="RSA parameters of requests that set none.")
    max_body_bytes: int = Field(4 * MiB, ge=1024, description="Largest request body accepted (413 past it).")
    max_request_tokens: int = Field(
        10_000_000, ge=1, description="Largest n*t*max_tokens an RSA request may ask for (400 past it)."
    )
    max_concurrent_runs: int = Field(16, ge=1, description="RSA runs executing at once.")
    max_queued_runs: int = Field(64, ge=0, description="RSA runs waiting for a slot; past it requests get 429.")
    upstream_concurrency: int = Field(64, ge=1, description="Requests in flight per upstream, RSA and pass-through.")
    upstream_timeout: float = Field(
        900.0, gt=0, description="Total seconds an upstream call may take, from request to last byte (504 past it)."
    )
    upstream_idle_timeout: float = Field(
        300.0, gt=0, description="Seconds an upstream may stay silent inside a response body before the call fails."
    )
    max_response_bytes: int = Field(
        DEFAULT_MAX_RESPONSE_BYTES, ge=1024, description="Largest upstream response body read (502 past it)."
    )
    upstream_max_retries: int = Field(4, ge=0, description="Retries of an RSA rollout on 429, 5xx and timeouts.")
    log_prompts: bool = Field(False, description="Log request messages (off: prompts never reach the log).")
    rsa_by_default: bool = Field(True, description="Apply RSA to chat requests that do not say (rsa key absent).")
    heartbeat_s: float = Field(10.0, gt=0, description="Seconds between SSE keep-alive comments of streamed runs.")
    probe_interval_s: float = Field(2.0, gt=0, description="Seconds between probes of an upstream taken out.")
    health_interval_s: float = Field(10.0, gt=0, description="Seconds between health checks of every upstream.")
    tokenizer: str | None = Field(None, description="Local tokenizer for tails when upstreams have no /tokenize.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Default chat_template_kwargs of RSA calls (e.g. {'enable_thinking': true})."
    )
    model_prefix: str = Field("mrsa/", min_length=1, description="A model name with this prefix turns RSA on.")

    @field_validator("upstreams")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"upstream URL must start with http:// or https://, got {url!r}")
        return [url.rstrip("/") for url in urls]
