"""Durable runs: every rollout appended to a JSONL log as it finishes, and resume from that log.

The log is a consumer of the run's event stream like any other front end. Records are flushed one
by one and fsynced at the end of each round, so a process killed mid-round loses at most the
rollouts still in flight.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from ._errors import ConfigError
from ._events import Event, RolloutFinished, RoundFinished, RunFinished, RunStarted
from ._params import RSAParams
from ._result import RolloutRecord
from ._types import Message, Trace, Usage

LOG_NAME = "run.jsonl"


class RunLog:
    """Writes a run's events to ``DIR/run.jsonl``. Use as an ``on_event`` handler."""

    def __init__(self, run_dir: str | Path, *, resuming: bool = False) -> None:
        self.dir = Path(run_dir)
        self.path = self.dir / LOG_NAME
        if not resuming and self.path.exists() and self.path.stat().st_size > 0:
            raise ConfigError(f"{self.path} already holds a run; resume it with --resume {self.dir}", param="run_dir")
        self.resuming = resuming
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._file: IO[str] = self.path.open("a", encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"cannot write the run log in {self.dir}: {err.strerror or err}", param="run_dir") from None

    def write(self, record: dict[str, Any], sync: bool = False) -> None:
        """Append one record and flush it to the OS (and to disk when ``sync``)."""
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        if sync:
            os.fsync(self._file.fileno())

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.write({"type": "resumed" if self.resuming else "config", **event.config}, sync=True)
        elif isinstance(event, RolloutFinished):
            self.write(rollout_record(event.record))
        elif isinstance(event, RoundFinished):
            self.write({"type": "round_end", **event.summary.to_dict()}, sync=True)
        elif isinstance(event, RunFinished):
            self.write({"type": "result", **event.result.to_dict()}, sync=True)

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rollout_record(record: RolloutRecord) -> dict[str, Any]:
    """The log line of one rollout: place, parents, tails shown, output, answer, usage, timing."""
    data: dict[str, Any] = {"type": "rollout", **record.to_dict(include_text=True)}
    data["shown_tails"] = record.shown_tails
    if record.trace is not None:
        data["token_ids"] = record.trace.token_ids
    return data


@dataclass
class LoggedRun:
    """What a run log holds: the configuration and the rollouts that finished."""

    params: RSAParams
    seed: int
    messages: list[Message]
    records: dict[tuple[int, int], RolloutRecord] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    skipped_lines: list[int] = field(default_factory=list)


def read_run_log(run_dir: str | Path) -> LoggedRun:
    """Read ``DIR/run.jsonl``. Lines that are not valid JSON (a record cut by a crash) are skipped
    with a warning, never fatal."""
    path = Path(run_dir) / LOG_NAME
    if not path.is_file():
        raise ConfigError(f"no run log at {path}", param="resume")
    config: dict[str, Any] | None = None
    records: dict[tuple[int, int], RolloutRecord] = {}
    failed: dict[tuple[int, int], RolloutRecord] = {}
    finished_rounds: set[int] = set()
    result = None
    skipped = []
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                kind = data["type"]
                if kind == "config":
                    config = data
                elif kind == "rollout":
                    record = _record_from_log(data)
                    (records if record.error is None else failed)[(record.round, record.slot)] = record
                elif kind == "round_end":
                    finished_rounds.add(int(data["round"]))
                elif kind == "result":
                    result = data
            except (ValueError, KeyError, TypeError, AttributeError):
                skipped.append(number)
                warnings.warn(f"{path}:{number}: unreadable record skipped", stacklevel=2)
    if config is None:
        raise ConfigError(f"{path} has no readable config record; cannot resume", param="resume")
    # A failure in a finished round stays a failure (the next round's subsets were drawn without
    # it); one in an unfinished round is run again.
    records.update({key: r for key, r in failed.items() if key[0] in finished_rounds and key not in records})
    try:
        params = RSAParams.model_validate(config["params"])
        return LoggedRun(
            params=params,
            seed=int(config["seed"]),
            messages=list(config["messages"]),
            records=records,
            result=result,
            skipped_lines=skipped,
        )
    except (ValidationError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{path}: the config record is unusable ({type(err).__name__}); cannot resume",
                          param="resume") from None


def _record_from_log(data: dict[str, Any]) -> RolloutRecord:
    if data.get("error") is not None:
        return RolloutRecord(int(data["round"]), int(data["slot"]), data.get("parents"), data.get("seed"),
                             error=str(data["error"]), shown_tails=data.get("shown_tails"))
    trace = Trace(
        content=data.get("content") or "",
        reasoning=data.get("reasoning") or "",
        token_ids=data.get("token_ids"),
        finish_reason=data.get("finish_reason"),
        usage=Usage.from_dict(data.get("usage")),
        attempts=int(data.get("attempts") or 1),
        latency_s=float(data.get("latency_s") or 0.0),
    )
    return RolloutRecord(
        round=int(data["round"]),
        slot=int(data["slot"]),
        parents=data.get("parents"),
        seed=data.get("seed"),
        trace=trace,
        answer=data.get("answer"),
        shown_tails=data.get("shown_tails"),
    )
