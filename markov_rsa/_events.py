"""Events emitted by a run. Every front end (CLI progress, SSE stream, run log, metrics) consumes
this one stream; none has a code path of its own into the controller."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from ._result import RolloutRecord, RoundSummary, RSAResult


@dataclass
class Progress:
    """Counters of the run so far, attached to every event.

    ``round`` is the oldest round not finished yet, ``done`` and ``failed`` count its rollouts;
    under dataflow scheduling later rounds may already be running (``in_flight`` counts all).
    """

    round: int = 0
    rounds: int = 0
    done: int = 0
    in_flight: int = 0
    failed: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    calls: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A plain dict, for JSON."""
        return dict(self.__dict__)


@dataclass
class RunStarted:
    """The run began; ``config`` is the resolved parameters, seed and tokenizer."""

    config: dict[str, Any]
    progress: Progress = field(default_factory=Progress)
    type: str = "run_started"


@dataclass
class RoundStarted:
    """A round's rollouts were sent (``size`` of them; fewer when resuming)."""

    round: int
    size: int
    progress: Progress = field(default_factory=Progress)
    type: str = "round_started"


@dataclass
class RolloutFinished:
    """One rollout finished (or failed for good: ``record.error`` is set)."""

    record: RolloutRecord
    progress: Progress = field(default_factory=Progress)
    type: str = "rollout_finished"


@dataclass
class RoundFinished:
    """Every rollout of a round finished."""

    summary: RoundSummary
    progress: Progress = field(default_factory=Progress)
    type: str = "round_finished"


@dataclass
class FinalAggregationStarted:
    """The final aggregation call was sent."""

    progress: Progress = field(default_factory=Progress)
    type: str = "final_aggregation"


@dataclass
class FinalDelta:
    """A piece of the final aggregation's output as it streams in (``text`` answer, ``reasoning``).

    Emitted only to handlers that ask for it with a true ``relay_final_deltas`` attribute, and only
    when the backend can stream.
    """

    text: str
    reasoning: str = ""
    progress: Progress = field(default_factory=Progress)
    type: str = "final_delta"


@dataclass
class RunFinished:
    """The run ended with a result."""

    result: RSAResult
    progress: Progress = field(default_factory=Progress)
    type: str = "run_finished"


Event = Union[
    RunStarted, RoundStarted, RolloutFinished, RoundFinished, FinalAggregationStarted, FinalDelta, RunFinished
]
EventHandler = Callable[[Event], Awaitable[None] | None]
