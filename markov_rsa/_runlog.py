"""Durable runs: every rollout appended to a JSONL log as it finishes, and resume from that log.

The log is a consumer of the run's event stream like any other front end. Records are flushed one
by one and fsynced at the end of each round, so a process killed mid-round loses at most the
rollouts still in flight. Every record carries the run's id (``run``): a log holding records of
two runs is refused on resume rather than mixing their populations.
"""

from __future__ import annotations

import json
import os
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from ._errors import ConfigError
from ._events import Event, RolloutFinished, RoundFinished, RunFinished, RunStarted
from ._params import RSAParams
from ._result import RolloutRecord, RoundSummary, RSAResult
from ._types import Message, Trace, Usage

LOG_NAME = "run.jsonl"


def new_run_id() -> str:
    """A fresh run id: 16 hex digits."""
    return secrets.token_hex(8)


class RunLog:
    """Writes a run's events to ``DIR/run.jsonl``. Use as an ``on_event`` handler.

    A new log gets a fresh run id; a resumed one (``resuming``) continues under the id of the
    run its config record names.
    """

    def __init__(self, run_dir: str | Path, *, resuming: bool = False) -> None:
        self.dir = Path(run_dir)
        self.path = self.dir / LOG_NAME
        if not resuming and self.path.exists() and self.path.stat().st_size > 0:
            raise ConfigError(f"{self.path} already holds a run; resume it with --resume {self.dir}", param="run_dir")
        self.resuming = resuming
        self.run_id = _logged_run_id(self.path) if resuming else new_run_id()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._file: IO[str] = self.path.open("a", encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"cannot write the run log in {self.dir}: {err.strerror or err}", param="run_dir") from None

    def write(self, record: dict[str, Any], sync: bool = False) -> None:
        """Append one record, stamped with the run id, and flush it to the OS (and to disk when ``sync``)."""
        record = {"type": record.get("type"), "run": self.run_id, **record}
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


def _logged_run_id(path: Path) -> str:
    """The run id of the config record of the log at ``path``."""
    try:
        with path.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                try:
                    data = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                if isinstance(data, dict) and data.get("type") == "config" and isinstance(data.get("run"), str):
                    return data["run"]
    except OSError:
        pass
    raise ConfigError(f"{path} has no config record with a run id; cannot resume", param="resume")


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
    run_id: str = ""
    backend: str | None = None
    """Where the run's rollouts ran (the backend's name: a URL, or ``local:<model>``)."""
    model: str | None = None
    """The model a remote backend was asked for, when it was known."""


def _check_run(data: dict[str, Any], run_id: str | None, where: str) -> None:
    """Refuse a record that belongs to another run than the log's config record."""
    if run_id is None:
        raise ConfigError(f"{where}: a {data['type']} record before the config record; cannot resume", param="resume")
    if data["run"] != run_id:
        raise ConfigError(
            f"{where}: a {data['type']} record of run {data['run']!r} in the log of run {run_id!r}; "
            "the log mixes two runs and cannot be resumed",
            param="resume",
        )


def read_run_log(run_dir: str | Path) -> LoggedRun:
    """Read ``DIR/run.jsonl``.

    Lines that are not valid JSON (a record cut by a crash) or lack a field (the run id among
    them) are skipped with a warning, never fatal. A second config record, or a record of another
    run, is a :class:`ConfigError` naming the line.
    """
    path = Path(run_dir) / LOG_NAME
    if not path.is_file():
        raise ConfigError(f"no run log at {path}", param="resume")
    config: dict[str, Any] | None = None
    run_id: str | None = None
    records: dict[tuple[int, int], RolloutRecord] = {}
    failed: dict[tuple[int, int], RolloutRecord] = {}
    finished_rounds: set[int] = set()
    result = None
    skipped = []
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                data = json.loads(line)
                kind = data["type"]
                if not isinstance(data["run"], str):
                    raise TypeError("the run id is not a string")
                if kind == "config":
                    if config is not None:
                        raise ConfigError(
                            f"{where}: a second config record (run {data['run']!r}); the log holds more than "
                            "one run and cannot be resumed",
                            param="resume",
                        )
                    config, run_id = data, data["run"]
                    continue
                _check_run(data, run_id, where)
                if kind == "rollout":
                    record = _record_from_log(data)
                    (records if record.error is None else failed)[(record.round, record.slot)] = record
                elif kind == "round_end":
                    finished_rounds.add(int(data["round"]))
                elif kind == "result":
                    result = data
            except ConfigError:
                raise
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                skipped.append(number)
                warnings.warn(f"{where}: unreadable record skipped", stacklevel=2)
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
            run_id=str(run_id),
            backend=config.get("backend") if isinstance(config.get("backend"), str) else None,
            model=config.get("model") if isinstance(config.get("model"), str) else None,
        )
    except (ValidationError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{path}: the config record is unusable ({type(err).__name__}); cannot resume",
                          param="resume") from None


def _record_from_log(data: dict[str, Any]) -> RolloutRecord:
    if data.get("error") is not None:
        return RolloutRecord(int(data["round"]), int(data["slot"]), data.get("parents"), data.get("seed"),
                             error=str(data["error"]), shown_tails=data.get("shown_tails"),
                             shown_kinds=data.get("shown_kinds"))
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
        shown_kinds=data.get("shown_kinds"),
        summary=data["summary"] if isinstance(data.get("summary"), dict) else None,
    )


def _local_model(name: str | None) -> str:
    """The local engine's model as its backend name spells it (the embedded default by its full name)."""
    from .engine import DEFAULT_MODEL, DEFAULT_MODEL_NAME

    if name is None or name.strip().lower() in (DEFAULT_MODEL, DEFAULT_MODEL_NAME.lower()):
        return DEFAULT_MODEL_NAME
    return name


def resume_backend(
    logged: LoggedRun, backend: Sequence[str], model: str | None, *, force: bool = False
) -> tuple[list[str], str | None]:
    """The backend URLs and model to continue ``logged`` on: the log's own, so that one population
    never mixes two models.

    ``backend`` and ``model`` are what the user configured (``[]``: no backend named; ``["local"]``
    the local engine; None: no model named). One that differs from the log is a
    :class:`ConfigError` naming the change, unless ``force``.
    """
    logged_local = logged.backend is None or logged.backend.startswith("local:")
    if logged_local:
        logged_model: str | None = _local_model(logged.backend.removeprefix("local:") if logged.backend else None)
        logged_urls: list[str] = []
        logged_where = "the local engine"
    else:
        logged_model = logged.model
        logged_urls = [url.strip().rstrip("/") for url in str(logged.backend).split(",")]
        logged_where = ", ".join(logged_urls)
    asked = [url.rstrip("/") for url in backend]
    asked_local = asked == ["local"]
    backend_changed = bool(asked) and (asked_local != logged_local or (not logged_local and asked != logged_urls))
    changes = []
    if backend_changed:
        changes.append(f"backend {logged_where} -> {'the local engine' if asked_local else ', '.join(asked)}")
    elif model is not None and logged_model is not None:
        if (_local_model(model) if logged_local else model) != logged_model:
            changes.append(f"model {logged_model} -> {model}")
    if changes and not force:
        raise ConfigError(
            f"this run was logged on {logged_where}"
            + (f" with model {logged_model}" if logged_model else "")
            + f"; resuming it with {' and '.join(changes)} would mix two models in one population "
            "(pass --force to do so anyway)",
            param="resume",
        )
    if backend_changed:
        return asked, model
    if model is None and not (logged_local and logged_model == _local_model(None)):
        model = logged_model
    return logged_urls, model


def logged_result(logged: LoggedRun) -> RSAResult | None:
    """The result of a run whose log ends in one (it finished), rebuilt from the log; None when it
    did not finish or its result record is unusable (the run is then resumed instead)."""
    data = logged.result
    if data is None:
        return None
    try:
        rounds = [RoundSummary.from_dict(r) for r in data["rounds"]]
        last = logged.params.t - 1
        return RSAResult(
            answer=data.get("answer"),
            final_text=str(data.get("final_text") or ""),
            final_reasoning="",
            selection=str(data["selection"]),
            votes=[(str(answer), int(count)) for answer, count in data.get("votes") or []],
            rounds=rounds,
            usage=Usage.from_dict(data.get("usage")),
            calls=int(data["calls"]),
            retries=int(data.get("retries") or 0),
            failed=int(data.get("failed") or 0),
            tokenizer=str(data.get("tokenizer") or ""),
            seed=logged.seed,
            params=logged.params,
            population=[logged.records[key] for key in sorted(logged.records) if key[0] == last],
            finish_reason=data.get("finish_reason"),
            timings={str(k): float(v) for k, v in (data.get("timings") or {}).items()},
            notes=[str(note) for note in data.get("notes") or []],
            stopped_early=data.get("stopped_early") if isinstance(data.get("stopped_early"), dict) else None,
            tie=data.get("tie") if isinstance(data.get("tie"), dict) else None,
        )
    except (KeyError, TypeError, ValueError):
        return None
