"""RSAParams: the one definition of every Markovian RSA parameter, and the presets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

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


class Compaction(str, Enum):
    """What each trace carries to the next round."""

    tail = "tail"
    """Its last ``tail_tokens`` tokens (reasoning, then answer)."""
    hybrid = "hybrid"
    """The report's PaCoRe hybrid: a finished trace with an answer section after its reasoning
    carries that answer section (bounded by ``tail_tokens``); any other trace carries its tail."""
    summary = "summary"
    """One extra call per trace summarises it (``prompts/summary.txt``); the summary, bounded by
    ``tail_tokens``, is carried."""


class RSAParams(BaseModel):
    """Every parameter of a Markovian RSA run.

    The CLI flags, the proxy's ``rsa`` request key, the ``MARKOV_RSA_*`` environment variables and
    the presets are all derived from the fields below; defaults are the ZAYA1 report's.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    n: int = Field(16, ge=1, le=4096, description="Population size N: parallel traces per round.")
    k: int = Field(4, ge=1, le=64, description="Aggregation subset size K: tails shown to each aggregation call.")
    t: int = Field(
        3,
        ge=1,
        le=256,
        description="Stages, counting round 0 (t=1: independent sampling only), as Zyphra's rsa/ proxy counts; "
        "= aggregation_rounds + 1.",
    )
    aggregation_rounds: int | None = Field(
        None,
        ge=0,
        le=255,
        description="The ZAYA1 report's T: aggregation rounds after round 0 (T=0: N independent samples); "
        "another way to set t (= T + 1).",
    )
    tail_tokens: int = Field(
        4096, ge=0, description="Tail length tau in the model's tokens carried to the next round; 0 keeps full traces."
    )
    max_tokens: int = Field(40000, ge=1, description="Completion budget (beta) of each rollout before the final stage.")
    final_max_tokens: int | None = Field(
        None,
        ge=1,
        description="Budget of the final stage (the last round's rollouts, or the final aggregation calls "
        "under selection final_agg, and any final aggregation); defaults to max_tokens.",
    )
    temperature: float = Field(1.0, ge=0.0, le=5.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
    top_k: int | None = Field(None, ge=1, description="Top-k sampling; unset leaves the backend's default.")
    final_temperature: float | None = Field(
        None, ge=0.0, le=5.0, description="Temperature of the final stage; defaults to temperature."
    )
    final_top_p: float | None = Field(None, gt=0.0, le=1.0, description="top_p of the final stage; defaults to top_p.")
    final_top_k: int | None = Field(None, ge=1, description="top_k of the final stage; defaults to top_k.")
    final_n: int = Field(
        1, ge=1, le=4096, description="Final aggregation calls when one runs; their answers are voted on."
    )
    compaction: Compaction = Field(
        Compaction.tail,
        description="What a trace carries forward: tail (its last tail_tokens tokens) | hybrid (the report's "
        "PaCoRe hybrid: a finished trace's answer section, else its tail) | summary (one extra call per trace).",
    )
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
    def _check(self) -> RSAParams:
        if self.k > self.n:
            raise ValueError(f"k ({self.k}) must not exceed n ({self.n}): each aggregation draws k distinct traces")
        if self.aggregation_rounds is not None and "aggregation_rounds" in self.model_fields_set:
            if "t" in self.model_fields_set and self.t != self.aggregation_rounds + 1:
                raise ValueError(
                    f"t ({self.t}) and aggregation_rounds ({self.aggregation_rounds}) disagree: t counts stages "
                    "with round 0, so t = aggregation_rounds + 1; give one of them"
                )
            object.__setattr__(self, "t", self.aggregation_rounds + 1)
        object.__setattr__(self, "aggregation_rounds", self.t - 1)
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        # Always t - 1, even on a copy made with model_copy(update={"t": ...}).
        data["aggregation_rounds"] = self.t - 1
        return data

    # -- the final stage -------------------------------------------------------------------------

    @property
    def last_round_is_final(self) -> bool:
        """Whether the last round's rollouts are the final stage: they are, unless ``final_agg``
        makes the final aggregation calls the run's answer (the last round then only feeds them)."""
        return self.selection != Selection.final_agg

    @property
    def final_aggregation_may_run(self) -> bool:
        """Whether the selection may make final aggregation calls."""
        return self.selection in (Selection.final_agg, Selection.auto)

    def sampling(self, final: bool) -> dict[str, Any]:
        """``max_tokens``, ``temperature``, ``top_p``, ``top_k`` of a call of the final stage or of an earlier one."""
        if not final:
            return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        return {
            "max_tokens": self.final_max_tokens or self.max_tokens,
            "temperature": self.temperature if self.final_temperature is None else self.final_temperature,
            "top_p": self.top_p if self.final_top_p is None else self.final_top_p,
            "top_k": self.top_k if self.final_top_k is None else self.final_top_k,
        }

    # -- the cost model --------------------------------------------------------------------------

    @property
    def calls(self) -> int:
        """Backend calls of a run without failures, at most: N*t rollouts, + final_n final
        aggregation calls when the selection may make them, + N*(t-1) summary calls (and one per
        final aggregation parent) with ``compaction: summary``."""
        final = self.final_n if self.final_aggregation_may_run else 0
        summaries = 0
        if self.compaction == Compaction.summary:
            summaries = self.n * (self.t - 1) + (min(self.n, final * self.k) if final else 0)
        return self.n * self.t + final + summaries

    def cost(self, problem_tokens: int = 0, template_tokens: int = 300, marker_tokens: int = 16) -> dict[str, int]:
        """Upper bounds of the cost model: calls, prompt tokens per aggregation call, generated tokens.

        Generated tokens: N*(t-1)*beta + N*final_max_tokens for the rounds (N*t*beta when
        ``final_agg`` makes the final aggregation the final stage), + final_n*final_max_tokens for
        final aggregation calls, + beta per summary call.
        """
        per_agg = problem_tokens + self.k * ((self.tail_tokens or self.max_tokens) + marker_tokens) + template_tokens
        beta = self.max_tokens
        final_budget = self.final_max_tokens or beta
        if self.last_round_is_final:
            rounds = self.n * (self.t - 1) * beta + self.n * final_budget
        else:
            rounds = self.n * self.t * beta
        final_calls = self.final_n if self.final_aggregation_may_run else 0
        summaries = self.calls - self.n * self.t - final_calls
        return {
            "calls": self.calls,
            "rollout_calls": self.n * self.t,
            "final_aggregation_calls": final_calls,
            "summary_calls": summaries,
            "prompt_tokens_per_aggregation": per_agg,
            "round_tokens": rounds,
            "max_generated_tokens": rounds + final_calls * final_budget + summaries * beta,
        }


@dataclass(frozen=True)
class Preset:
    """A named set of parameters and where it comes from."""

    values: Mapping[str, Any]
    source: str
    """The report row (or other reference) the values follow, and what was chosen where it is silent."""


_REPORT_SAMPLING = {"temperature": 1.0, "top_p": 1.0}
_REPORT = {"k": 4, "t": 3, "tail_tokens": 4096, "final_max_tokens": 40000, **_REPORT_SAMPLING}

PRESET_TABLE: Mapping[str, Preset] = {
    "zaya1": Preset(
        {"n": 16, **_REPORT, "max_tokens": 40000},
        "ZAYA1 report Table XII headline (beta, tau, T, N, C) = (40K, 4K, 2, 16, 4), final budget 40K",
    ),
    "zaya1-16k": Preset(
        {"n": 16, **_REPORT, "max_tokens": 16384},
        "ZAYA1 report Table XII, beta 16K: the report's recommended deployment",
    ),
    "zaya1-8k": Preset({"n": 16, **_REPORT, "max_tokens": 8192}, "ZAYA1 report Table XII, beta 8K"),
    "zaya1-light": Preset(
        {"n": 8, **_REPORT, "max_tokens": 8192}, "ZAYA1 report section VI-C(j), the lightweight setting (N=8, beta 8K)"
    ),
    "markovian-baseline": Preset(
        {"n": 16, **_REPORT, "k": 1, "t": 5, "max_tokens": 8192},
        "ZAYA1 report Table XII, C=1 Markovian baseline: each trace continues from its own tail, T=4",
    ),
    "apex-high": Preset(
        {"n": 16, **_REPORT, "t": 9, "max_tokens": 16384},
        "ZAYA1 report Table XIII 'high' (N=16, C=4, T=8, beta 16K); the report gives no final budget "
        "or sampling here: Table XII's 40K, temperature 1.0, top-p 1.0 chosen",
    ),
    "extra-high": Preset(
        {"n": 32, **_REPORT, "t": 9, "max_tokens": 32768},
        "ZAYA1 report Table XIII 'extra-high' (N=32, C=4, T=8, beta 32K); the report gives no final "
        "budget or sampling here: Table XII's 40K, temperature 1.0, top-p 1.0 chosen",
    ),
    "rsa-paper": Preset(
        {"n": 16, "k": 4, "t": 10, "tail_tokens": 0, "max_tokens": 8192},
        "RSA paper (arXiv 2509.26626): N=16, K=4, 10 stages, full traces",
    ),
    "smoke": Preset({"n": 4, "k": 2, "t": 2, "tail_tokens": 256, "max_tokens": 1024}, "a quick check of a pipeline"),
    "local": Preset(
        {
            "n": 4,
            "k": 2,
            "t": 2,
            "tail_tokens": 96,
            "max_tokens": 128,
            "final_max_tokens": 128,
            "temperature": 0.7,
            "top_p": 0.9,
        },
        "small budgets for the embedded CPU model",
    ),
}
"""Every preset with its source; :data:`PRESETS` holds the values alone."""

PRESETS: Mapping[str, Mapping[str, Any]] = {name: preset.values for name, preset in PRESET_TABLE.items()}

LINKED_FIELDS: tuple[tuple[str, str], ...] = (("t", "aggregation_rounds"),)
"""Pairs of fields that set one value: a layer that gives one of them replaces both below it."""


def apply_layer(merged: dict[str, Any], layer: Mapping[str, Any]) -> list[str]:
    """Put ``layer``'s given (non-None) values over ``merged``, in place; a field of a linked
    pair replaces its partner from lower layers. Returns the fields removed that way."""
    given = {key: value for key, value in layer.items() if value is not None}
    removed = []
    for first, second in LINKED_FIELDS:
        for mine, partner in ((first, second), (second, first)):
            if mine in given and partner not in given and partner in merged:
                del merged[partner]
                removed.append(partner)
    merged.update(given)
    return removed


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
        apply_layer(merged, PRESETS[preset])
    if overrides:
        unknown = [key for key in overrides if key not in RSAParams.model_fields]
        if unknown:
            raise ConfigError(
                f"unknown parameter {unknown[0]!r}; known: {', '.join(PARAM_NAMES)}", param=str(unknown[0])
            )
        apply_layer(merged, overrides)
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
