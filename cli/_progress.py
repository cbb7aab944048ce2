"""Live progress on stderr, fed by the run's events."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

from markov_rsa import Event, Progress, RoundFinished, RunFinished, RunStarted


def _fmt_tokens(count: int) -> str:
    return f"{count / 1000:.1f}k" if count >= 10_000 else str(count)


def progress_line(progress: Progress, population: int, phase: str = "") -> str:
    """One status line: round r/T, rollouts done / in flight / failed, tokens, elapsed."""
    parts = [
        f"round {progress.round + 1}/{progress.rounds}" if not phase else phase,
        f"done {progress.done}/{population}",
        f"in flight {progress.in_flight}",
        f"failed {progress.failed}",
    ]
    if progress.retries:
        parts.append(f"retries {progress.retries}")
    parts += [
        f"tokens {_fmt_tokens(progress.prompt_tokens)} in / {_fmt_tokens(progress.completion_tokens)} out",
        f"{progress.elapsed_s:.1f}s",
    ]
    return " · ".join(parts)


class ProgressDisplay:
    """A one-line live display; prints one summary line per finished round."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = Live(Text(""), console=console, refresh_per_second=8, transient=True)
        self.population = 0
        self.phase = ""
        self.started = time.perf_counter()

    def __enter__(self) -> ProgressDisplay:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.live.__exit__(*exc)

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.population = int(event.config["params"]["n"])
            self.console.print(
                f"[dim]markov-rsa: {event.config['backend']} · tokenizer {event.config['tokenizer']} · "
                f"seed {event.config['seed']}[/dim]"
            )
        elif isinstance(event, RoundFinished):
            s = event.summary
            top = ", ".join(f"{a} x{c}" for a, c in s.votes[:3]) or "no answers"
            self.console.print(
                f"[dim]round {s.round + 1}/{event.progress.rounds}: {s.calls - s.failed}/{s.calls} ok, "
                f"{_fmt_tokens(s.usage.total_tokens)} tokens, {s.wall_s:.1f}s · {top}[/dim]"
            )
        elif event.type == "final_aggregation":
            self.phase = "final aggregation"
        elif isinstance(event, RunFinished):
            self.phase = "done"
        self.live.update(Text(progress_line(event.progress, self.population, self.phase)))
