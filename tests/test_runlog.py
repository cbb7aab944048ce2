"""Durable runs: the JSONL run log, SIGKILL mid-run, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from test_cli import CLI, cli

PROBLEM = "What is 23 * 4 - 7?"
ARGS = ["--n", "4", "--k", "2", "--t", "3", "--tail-tokens", "30", "--max-tokens", "400", "--seed", "5", "--json", "-q"]


def records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    path = run_dir / "run.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if data.get("type") == kind:
            out.append(data)
    return out


def wait_until(condition: Callable[[], object], proc: subprocess.Popen[bytes], limit_s: float = 300) -> None:
    """Poll ``condition`` (the log, the server's counters) while ``proc`` lives; the limit only stops a hung test."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert proc.poll() is None, f"the run ended early (exit {proc.returncode})"
        assert time.monotonic() < deadline, "the run never reached the expected point"
        time.sleep(0.02)


def through_round_zero(lines: list[str]) -> tuple[list[str], list[str]]:
    """A finished run's log split into what a crash right after round 0 ended leaves (its config, round 0's
    rollouts and round 0's end) and the rest, in log order. A round-1 rollout whose parents were done may be
    logged before round 0 ends (dataflow); it goes to the rest, so exactly round 0 is kept."""
    end = next(i for i, line in enumerate(lines) if json.loads(line)["type"] == "round_end")
    kept = [line for line in lines[: end + 1] if json.loads(line).get("round") in (None, 0)]
    return kept, [line for line in lines if line not in kept]


def final_population(run_dir: Path, rounds: int) -> dict[int, tuple[str, str | None]]:
    return {
        r["slot"]: (r["content"], r["answer"]) for r in records(run_dir, "rollout") if r["round"] == rounds - 1
    }


def test_log_has_config_every_rollout_and_result(fake_backend: Any, tmp_path: Path) -> None:
    server = fake_backend(length_mean=50)
    proc = cli("solve", PROBLEM, "--backend", server.base_url, *ARGS, "--run-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    config = records(tmp_path, "config")
    assert len(config) == 1 and config[0]["params"]["n"] == 4 and config[0]["seed"] == 5
    rollouts = records(tmp_path, "rollout")
    assert sorted((r["round"], r["slot"]) for r in rollouts) == [(r, s) for r in range(3) for s in range(4)]
    for r in rollouts:
        assert r["content"] and r["usage"]["completion_tokens"] > 0 and r["finish_reason"] == "stop"
        if r["round"] == 0:
            assert r["parents"] is None and r["shown_tails"] is None
        else:
            assert len(r["parents"]) == 2 and len(r["shown_tails"]) == 2
    assert [e["round"] for e in records(tmp_path, "round_end")] == [0, 1, 2]
    assert records(tmp_path, "result")[0]["answer"] == json.loads(proc.stdout)["answer"]
    again = cli("solve", PROBLEM, "--backend", server.base_url, *ARGS, "--run-dir", str(tmp_path))
    assert again.returncode != 0 and "--resume" in again.stderr


def test_sigkill_after_round_zero_then_resume(fake_backend: Any, tmp_path: Path) -> None:
    server = fake_backend(length_mean=60, length_sigma=0.05, tokens_per_second=120)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    # Round 0's four rollouts are answered; round 1's aggregations are held unanswered, so the
    # process is killed mid-round 1 however slow the machine is.
    server.hold(after=4)
    proc = subprocess.Popen(
        [CLI, "solve", PROBLEM, "--backend", server.base_url, *ARGS, "--run-dir", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: records(killed, "round_end") and server.stats.requests == 8, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [e["round"] for e in records(killed, "round_end")] == [0]
    round0_before = [r for r in records(killed, "rollout") if r["round"] == 0]
    assert len(round0_before) == 4

    server.release()
    server.reset_stats()
    resumed = cli("solve", "--resume", str(killed), "--backend", server.base_url, "--json", "-q")
    assert resumed.returncode == 0, resumed.stderr
    # Round 0 was not generated again: every request of the resumed run is an aggregation.
    assert server.stats.requests_log
    assert all("=== Candidate 1 ===" in b["messages"][-1]["content"] for b in server.stats.requests_log)
    assert len(server.stats.requests_log) <= 8
    assert [r for r in records(killed, "rollout") if r["round"] == 0] == round0_before

    uninterrupted = cli("solve", PROBLEM, "--backend", server.base_url, *ARGS, "--run-dir", str(clean))
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    assert final_population(killed, 3) == final_population(clean, 3)
    assert len(final_population(clean, 3)) == 4
    assert json.loads(resumed.stdout)["answer"] == json.loads(uninterrupted.stdout)["answer"]


def test_truncated_last_line_is_skipped_with_a_warning(fake_backend: Any, tmp_path: Path) -> None:
    server = fake_backend(length_mean=40)
    first = cli("solve", PROBLEM, "--backend", server.base_url, *ARGS, "--run-dir", str(tmp_path))
    assert first.returncode == 0, first.stderr
    log = tmp_path / "run.jsonl"
    lines = log.read_text().splitlines()
    # Keep round 0 and half of the next rollout record, as a crash mid-write would leave it.
    kept, rest = through_round_zero(lines)
    log.write_text("\n".join(kept) + "\n" + rest[0][: len(rest[0]) // 2])
    server.reset_stats()
    resumed = cli("solve", "--resume", str(tmp_path), "--backend", server.base_url, "--json", "-q")
    assert resumed.returncode == 0, resumed.stderr
    assert f"line {len(kept) + 1}" in resumed.stderr and "warning" in resumed.stderr
    assert len(server.stats.requests_log) == 8  # rounds 1 and 2 again, round 0 kept
    assert json.loads(resumed.stdout)["answer"] == json.loads(first.stdout)["answer"]


def test_valid_json_but_broken_records_are_skipped(fake_backend: Any, tmp_path: Path) -> None:
    server = fake_backend(length_mean=40)
    first = cli("solve", PROBLEM, "--backend", server.base_url, *ARGS, "--run-dir", str(tmp_path))
    assert first.returncode == 0, first.stderr
    log = tmp_path / "run.jsonl"
    log.write_text(log.read_text() + '{"type": "rollout", "round": null}\n{"type": "round_end"}\n')
    resumed = cli("solve", "--resume", str(tmp_path), "--backend", server.base_url, "--json", "-q")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.count("warning") == 2
