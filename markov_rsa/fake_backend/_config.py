"""Settings of the simulated backend: one pydantic model, so the CLI flags follow from it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ReasoningField = Literal["reasoning", "reasoning_content", "inline", "none"]


class FakeBackendConfig(BaseModel):
    """How the simulated OpenAI-compatible backend answers, how fast, and how it fails.

    Everything it does is deterministic given ``seed`` and the request (and, for faults and
    scripted answers, the order in which requests arrive).
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(default="fake-reasoner", description="Model name served and listed by /v1/models.")
    seed: int = Field(default=0, description="Seed of every random choice the server makes.")
    tokens_per_second: float = Field(
        default=0.0, ge=0.0, description="Generation speed of each stream in tokens per second; 0 = no delay."
    )
    ttft_s: float = Field(default=0.0, ge=0.0, description="Time to first token, seconds.")
    max_concurrency: int = Field(
        default=0, ge=0, description="Most requests generating at once; the rest wait in FIFO order. 0 = no limit."
    )
    error_rate: float = Field(
        default=0.3, ge=0.0, le=1.0, description="Probability that a direct solve gives a wrong answer."
    )
    aggregation_error_rate: float = Field(
        default=0.15,
        ge=0.0,
        le=1.0,
        description="Probability that an aggregation call ignores its candidates and answers wrongly.",
    )
    follow_majority: float = Field(
        default=0.9,
        ge=0.0,
        le=1.0,
        description="Probability that an aggregation call answers the candidates' plurality answer.",
    )
    length_mean: int = Field(default=200, ge=1, description="Median reasoning length in tokens.")
    length_sigma: float = Field(default=0.3, ge=0.0, description="Lognormal sigma of the reasoning length.")
    long_tail_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Probability that a trace is a long-tail one."
    )
    long_tail_factor: float = Field(default=8.0, ge=1.0, description="How many times longer a long-tail trace is.")
    reasoning_field: ReasoningField = Field(
        default="reasoning",
        description="Where reasoning goes: reasoning | reasoning_content | inline (<think> in content) | none.",
    )
    fault_rate_5xx: float = Field(default=0.0, ge=0.0, le=1.0, description="Probability of a 500/503 answer.")
    fault_rate_429: float = Field(default=0.0, ge=0.0, le=1.0, description="Probability of a 429 answer.")
    fault_rate_hang: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Probability that a request is never answered."
    )
    fault_rate_drop: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Probability that the connection drops mid-response."
    )
    fault_rate_malformed: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Probability of a 200 answer whose body is not valid JSON."
    )
    fail_seeds: list[int] = Field(
        default_factory=list,
        description="Request seeds always answered with HTTP 500: rollouts that fail however often they are retried.",
    )
    support_token_ids: bool = Field(default=True, description="Honour return_token_ids as vLLM does.")
    reject_fields: list[str] = Field(
        default_factory=list, description="Request fields answered with HTTP 400, as OpenAI does for top_k."
    )
    support_tokenize: bool = Field(default=True, description="Expose /tokenize and /detokenize.")
    api_key: str | None = Field(default=None, description="Require 'Authorization: Bearer KEY' on /v1/*.")
    script: list[str] | None = Field(
        default=None, description="Scripted mode: answer contents returned in order (cycling) instead of solving."
    )
    max_model_len: int = Field(default=131072, ge=16, description="Context length reported and enforced.")
    request_log_limit: int = Field(
        default=10000, ge=0, description="Request bodies kept in stats.requests_log (the newest); 0 = keep all."
    )

    @field_validator("script")
    @classmethod
    def _script_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("script needs at least one answer")
        return value
