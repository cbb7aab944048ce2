"""What a run produces: per-rollout records, per-round summaries and the final result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._errors import BackendError
from ._params import RSAParams
from ._types import Trace, Usage


@dataclass
class RolloutRecord:
    """One rollout of a run: where it sits, what it was shown, what it produced."""

    round: int
    slot: int
    parents: list[int] | None
    """Slots of the previous round whose tails this aggregation saw (None in round 0)."""
    seed: int | None
    trace: Trace | None = None
    error: str | None = None
    answer: str | None = None
    tail: str | None = None
    """The tail of this trace carried to the next round, once computed."""
    tail_tokens: int | None = None
    shown_tails: list[str] | None = None
    """The parents' tails this aggregation was shown, in candidate order (None in round 0)."""
    fitted: str | None = None
    """How the call was made to fit the model's context (shortened tails, a lower max_tokens)."""
    excluded: str | None = None
    """Why the verifier excluded this trace from the aggregation pool and the vote (None: kept)."""
    failure: BackendError | None = field(default=None, repr=False, compare=False)
    """The error a failed rollout ended in (not logged; ``error`` holds its message)."""
    quoted_lines: list[dict[str, Any]] | None = None
    """Lines of the shown tails quoted in the prompt because they read as its own structure
    (``candidate``, ``line``, original ``text``); None when there were none."""
    tail_kind: str | None = None
    """What ``tail`` is: ``tail`` (the trace's last tokens), ``answer`` (its answer section, under
    ``compaction: hybrid``) or ``summary`` (a summary call's output, under ``compaction: summary``)."""
    shown_kinds: list[str] | None = None
    """The kind of each shown tail, in candidate order (None in round 0)."""
    summary: dict[str, Any] | None = None
    """The summary call of this trace under ``compaction: summary``: ``text``, ``usage``,
    ``attempts``, ``latency_s``, or ``error`` when it failed (the tail was carried instead)."""

    @property
    def ok(self) -> bool:
        """Whether the rollout produced a trace."""
        return self.trace is not None

    def to_dict(self, include_text: bool = True) -> dict[str, Any]:
        """A JSON-ready dict."""
        data: dict[str, Any] = {
            "round": self.round,
            "slot": self.slot,
            "parents": self.parents,
            "seed": self.seed,
            "answer": self.answer,
            "error": self.error,
        }
        if self.excluded is not None:
            data["excluded"] = self.excluded
        if self.fitted is not None:
            data["fitted"] = self.fitted
        if self.quoted_lines:
            data["quoted_lines"] = self.quoted_lines
        if self.shown_kinds is not None:
            data["shown_kinds"] = self.shown_kinds
        if self.tail_kind is not None:
            data["tail_kind"] = self.tail_kind
        if self.summary is not None:
            data["summary"] = self.summary
        if self.trace is not None:
            data.update(
                finish_reason=self.trace.finish_reason,
                usage=self.trace.usage.to_dict(),
                attempts=self.trace.attempts,
                latency_s=round(self.trace.latency_s, 4),
            )
            if include_text:
                data.update(content=self.trace.content, reasoning=self.trace.reasoning)
        return data


@dataclass
class RoundSummary:
    """Totals of one round."""

    round: int
    answers: list[str | None]
    finish_reasons: list[str | None]
    usage: Usage
    calls: int
    failed: int
    retries: int
    wall_s: float
    votes: list[tuple[str, int]]
    """The vote over the round's candidates (those the verifier kept, unless it fell back)."""
    excluded: int = 0
    """Rollouts the verifier excluded from the aggregation pool and the vote."""
    verifier_fallback: bool = False
    """Fewer than K passed the verifier, so the whole population stayed in the pool."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "round": self.round,
            "answers": self.answers,
            "finish_reasons": self.finish_reasons,
            "usage": self.usage.to_dict(),
            "tokens": self.usage.total_tokens,
            "calls": self.calls,
            "failed": self.failed,
            "retries": self.retries,
            "wall_s": round(self.wall_s, 4),
            "votes": [list(v) for v in self.votes],
            "excluded": self.excluded,
            "verifier_fallback": self.verifier_fallback,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundSummary:
        """Read back what ``to_dict`` wrote (a run log's ``round_end`` record, a result's rounds)."""
        return cls(
            round=int(data["round"]),
            answers=list(data.get("answers") or []),
            finish_reasons=list(data.get("finish_reasons") or []),
            usage=Usage.from_dict(data.get("usage")),
            calls=int(data.get("calls") or 0),
            failed=int(data.get("failed") or 0),
            retries=int(data.get("retries") or 0),
            wall_s=float(data.get("wall_s") or 0.0),
            votes=[(str(answer), int(count)) for answer, count in data.get("votes") or []],
            excluded=int(data.get("excluded") or 0),
            verifier_fallback=bool(data.get("verifier_fallback")),
        )


@dataclass
class RSAResult:
    """The outcome of a Markovian RSA run."""

    answer: str | None
    """The extracted answer (``\\boxed{}`` content for math), or None when none could be extracted."""
    final_text: str
    """The answer text of the chosen trace (or of the final aggregation)."""
    final_reasoning: str
    selection: str
    """The selection method that produced the answer (``auto`` resolved to what it chose)."""
    votes: list[tuple[str, int]]
    rounds: list[RoundSummary]
    usage: Usage
    calls: int
    retries: int
    failed: int
    tokenizer: str
    seed: int
    params: RSAParams
    population: list[RolloutRecord]
    """The final round's rollouts."""
    finish_reason: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """Things a user should know: a final aggregation that failed and fell back, dropped fields."""
    stopped_early: dict[str, Any] | None = None
    """Where and why ``early_stop`` ended the run (round, answer, share, threshold, skipped_rounds);
    None when every round ran."""
    tie: dict[str, Any] | None = None
    """When the final vote's top count was shared: ``answers`` tied, ``votes`` each, ``winner``, ``rule``."""
    final_stage: list[Trace] = field(default_factory=list)
    """The outputs of the final stage: the final aggregation calls when they ran, else the last
    round's successful rollouts (Zyphra's report-settings proxy returns them all as choices)."""
    final_prompt: list[dict[str, Any]] | None = None
    """The conversation of the final stage's first aggregation call (None when it had none)."""
    final_answers: list[str | None] = field(default_factory=list)
    """The answer extracted from each final aggregation call, in call order (empty when none ran)."""

    def to_dict(self, include_population: bool = False) -> dict[str, Any]:
        """A JSON-ready dict (the CLI's ``--json`` output)."""
        data: dict[str, Any] = {
            "answer": self.answer,
            "final_text": self.final_text,
            "selection": self.selection,
            "votes": [list(v) for v in self.votes],
            "usage": self.usage.to_dict(),
            "calls": self.calls,
            "retries": self.retries,
            "failed": self.failed,
            "tokenizer": self.tokenizer,
            "seed": self.seed,
            "params": self.params.model_dump(mode="json"),
            "rounds": [r.to_dict() for r in self.rounds],
            "finish_reason": self.finish_reason,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "notes": self.notes,
            "stopped_early": self.stopped_early,
            "tie": self.tie,
            "final_answers": self.final_answers,
        }
        if include_population:
            data["population"] = [r.to_dict() for r in self.population]
        return data
