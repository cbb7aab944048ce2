"""RSAParams: the one definition of every Markovian RSA parameter, and the presets."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ._errors import ConfigError


class Selection(str, Enum):
    """How the answer is picked from the final population."""

    auto = "auto"
    majority = "majority"
    final_agg = "final_agg"
    sample = "sample"


class Task(str, Enum):
    """Kind of problem; picks the aggregation prompt and the answer extractor."""

    math = "math"
    code = "code"
    general = "general"


class Schedule(str, Enum):
    """When an aggregation call starts."""

    dataflow = "dataflow"
    """As soon as its own K parents have finished."""
    rounds = "rounds"
    """When the whole previous round has finished."""


class Verifier(str, Enum):
    """Which candidates count as provably broken and leave the aggregation pool and the vote."""

    off = "off"
    math = "math"
    """The final answer is missing or does not parse as math."""
    code = "code"
    """The last Python block does not run cleanly in a sandboxed subprocess (executes model output)."""
    auto = "auto"
    """``math`` for math problems, off otherwise (code execution is never switched on implicitly)."""


class RSAParams(BaseModel):
    """Every parameter of a Markovian RSA run.

    The CLI flags, the proxy's ``rsa`` request key, the ``MARKOV_RSA_*`` environment variables and
    the presets are all derived from the fields below; defaults are the ZAYA1 report's.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    n: int = Field(16, ge=1, le=4096, description="Population size N: parallel traces per round.")
    k: int = Field(4, ge=1, le=64, description="Aggregation subset size K: tails shown to each aggregation call.")
    t: int = Field(2, ge=1, le=256, description="Total rounds T, counting round 0 (t=1: independent sampling only).")
    tail_tokens: int = Field(
        4096, ge=0, description="Tail length tau in the model's tokens carried to the next round; 0 keeps full traces."
    )
    max_tokens: int = Field(40000, ge=1, description="Completion budget (beta) of each rollout.")
    final_max_tokens: int | None = Field(
        None, ge=1, description="Completion budget of the final aggregation call; defaults to max_tokens."
    )
    temperature: float = Field(1.0, ge=0.0, le=5.0, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
    top_k: int | None = Field(None, ge=1, description="Top-k sampling; unset leaves the backend's default.")
    seed: int | None = Field(
        None, ge=0, description="Seed for subset draws and per-call sampling seeds; unset picks one and reports it."
    )
    selection: Selection = Field(Selection.auto, description="auto | majority | final_agg | sample.")
    task: Task = Field(Task.math, description="math | code | general: prompt template and answer extractor.")
    align_newline: bool = Field(
        True, description="Move a tail's cut forward to the next line break so it never starts mid-line."
    )
    min_survivors: float = Field(
        0.5, ge=0.0, le=1.0, description="Fraction of a round's rollouts that must succeed for the run to go on."
    )

    schedule: Schedule = Field(
        Schedule.dataflow,
        description="dataflow: an aggregation starts as soon as its own K parents finished; "
        "rounds: when the whole previous round finished. Same prompts and outputs either way.",
    )
    early_stop: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Skip later rounds once a round's leading answer holds this share of its answers; unset: off.",
    )
    verifier: Verifier = Field(
        Verifier.off,
        description="off | math | code | auto: exclude provably broken candidates from aggregation and the vote. "
        "code runs model output on this host.",
    )

    max_model_len: int | None = Field(
        None,
        ge=16,
        description="The model's context length in tokens; unset: read from the backend (/v1/models "
        "max_model_len, the local engine's config). Calls are fitted to it.",
    )

    @model_validator(mode="after")
    def _check_k_le_n(self) -> RSAParams:
        if self.k > self.n:
            raise ValueError(f"k ({self.k}) must not exceed n ({self.n}): each aggregation draws k distinct traces")
        return self

    @property
    def calls(self) -> int:
        """Backend calls of a run without failures: N*T, +1 when a final aggregation may run."""
        return self.n * self.t + (1 if self.selection in (Selection.final_agg, Selection.auto) else 0)

    def cost(self, problem_tokens: int = 0, template_tokens: int = 300, marker_tokens: int = 16) -> dict[str, int]:
        """Upper bounds of the cost model: calls, prompt tokens per aggregation call, generated tokens."""
        per_agg = problem_tokens + self.k * ((self.tail_tokens or self.max_tokens) + marker_tokens) + template_tokens
        return {
            "calls": self.n * self.t + (1 if self.selection == Selection.final_agg else 0),
            "prompt_tokens_per_aggregation": per_agg,
            "max_generated_tokens": self.n * self.t * self.max_tokens
            + (self.final_max_tokens or self.max_tokens if self.selection == Selection.final_agg else 0),
        }


PRESETS: Mapping[str, Mapping[str, Any]] = {
    "zaya1": {"n": 16, "k": 4, "t": 2, "tail_tokens": 4096, "max_tokens": 40000, "temperature": 1.0, "top_p": 0.95},
    "extra-high": {
        "n": 32,
        "k": 4,
        "t": 9,
        "tail_tokens": 4096,
        "max_tokens": 32768,
        "final_max_tokens": 61440,
        "temperature": 0.6,
        "selection": "final_agg",
    },
    "rsa-paper": {"n": 16, "k": 4, "t": 10, "tail_tokens": 0, "max_tokens": 8192},
    "smoke": {"n": 4, "k": 2, "t": 2, "tail_tokens": 256, "max_tokens": 1024},
    "local": {
        "n": 4,
        "k": 2,
        "t": 2,
        "tail_tokens": 96,
        "max_tokens": 128,
        "final_max_tokens": 128,
        "temperature": 0.7,
        "top_p": 0.9,
    },
}

PARAM_NAMES: tuple[str, ...] = tuple(RSAParams.model_fields)


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "params"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if e["loc"] else msg)
    return "; ".join(parts)


def error_field(err: ValidationError) -> str | None:
    """The first field a validation error names, if any."""
    for e in err.errors():
        if e["loc"]:
            return str(e["loc"][0])
    return None


def resolve_params(
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    base: RSAParams | None = None,
) -> RSAParams:
    """Merge, in order of precedence: ``overrides`` > ``preset`` > ``base`` (or the defaults).

    ``None`` values in ``overrides`` mean "not given". Raises :class:`ConfigError` with a one-line
    message naming the offending field.
    """
    merged: dict[str, Any] = base.model_dump() if base is not None else {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}", param="preset")
        merged.update(PRESETS[preset])
    if overrides:
        unknown = [key for key in overrides if key not in RSAParams.model_fields]
        if unknown:
            raise ConfigError(
                f"unknown parameter {unknown[0]!r}; known: {', '.join(PARAM_NAMES)}", param=str(unknown[0])
            )
        merged.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return RSAParams.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err), param=error_field(err)) from None


def params_from_env(environ: Mapping[str, str], prefix: str = "MARKOV_RSA_") -> dict[str, str]:
    """Parameter overrides found in ``environ`` as ``MARKOV_RSA_<NAME>`` (e.g. ``MARKOV_RSA_TAIL_TOKENS``)."""
    found = {}
    for name in PARAM_NAMES:
        value = environ.get(prefix + name.upper())
        if value not in (None, ""):
            found[name] = value
    return found
