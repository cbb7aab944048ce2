"""Resume continues the run it was given: on the log's backend and model, from that run's records only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from test_cli import assert_one_line_error, cli
from test_runlog import ARGS, PROBLEM, through_round_zero

RESUME = ["--json", "-q"]


def half_run(server: Any, run_dir: Path) -> list[str]:
    """A finished run's log cut back to its config and round 0, as a crash after round 0 leaves it."""
    proc = cli("solve", PROBLEM, "--backend", server.base_url, *ARGS, "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    kept, _ = through_round_zero((run_dir / "run.jsonl").read_text().splitlines())
    (run_dir / "run.jsonl").write_text("\n".join(kept) + "\n")
    server.reset_stats()
    return kept


def test_every_record_carries_the_run_id(fake_backend: Any, tmp_path: Path) -> None:
    server = fake_backend(length_mean=40)
    proc = cli("solve", PROBLEM, "--backend", server.base_url, *ARGS, "--run-dir", str(tmp_path / "a"))
    assert proc.returncode == 0, proc.stderr
    other = cli("solve", PROBLEM, "--backend", server.base_url, *ARGS, "--run-dir", str(tmp_path / "b"))
    assert other.returncode == 0, other.stderr
    ids = {
        name: {json.loads(line)["run"] for line in (tmp_path / name / "run.jsonl").read_text().splitlines()}
        for name in ("a", "b")
    }
    assert len(ids["a"]) == len(ids["b"]) == 1 and ids["a"] != ids["b"]


def test_resume_continues_on_the_logged_backend(fake_backend: Any, tmp_path: Path) -> None:
    server = fake_backend(length_mean=40)
    half_run(server, tmp_path)
    resumed = cli("solve", "--resume", str(tmp_path), *RESUME)
    assert resumed.returncode == 0, resumed.stderr
    assert server.stats.requests == 8  # rounds 1 and 2, on the backend of the log
    assert {body["model"] for body in server.stats.requests_log} == {"fake-reasoner"}
    ids = {json.loads(line)["run"] for line in (tmp_path / "run.jsonl").read_text().splitlines()}
    assert len(ids) == 1  # the resumed records continue the same run


def test_resume_refuses_another_backend_or_model_unless_forced(fake_backend: Any, tmp_path: Path) -> None:
    logged_on, other = fake_backend(length_mean=40), fake_backend(length_mean=40, model="other-model")
    half_run(logged_on, tmp_path)
    refused = cli("solve", "--resume", str(tmp_path), "--backend", other.base_url, *RESUME)
    assert refused.returncode == 2
    assert_one_line_error(refused, logged_on.base_url, other.base_url, "--force")
    refused = cli("solve", "--resume", str(tmp_path), "--model", "other-model", *RESUME)
    assert_one_line_error(refused, "model fake-reasoner -> other-model", "--force")
    refused = cli("solve", "--resume", str(tmp_path), "--backend", "local", *RESUME)
    assert_one_line_error(refused, "the local engine", "--force")
    assert other.stats.requests == logged_on.stats.requests == 0
    # The same backend named explicitly is no change.
    same = cli("solve", "--resume", str(tmp_path), "--backend", logged_on.base_url + "/", "--json", "-q")
    assert same.returncode == 0, same.stderr
    assert logged_on.stats.requests == 8


def test_forced_resume_runs_on_the_named_backend(fake_backend: Any, tmp_path: Path) -> None:
    logged_on, other = fake_backend(length_mean=40), fake_backend(length_mean=40, model="other-model")
    half_run(logged_on, tmp_path)
    forced = cli("solve", "--resume", str(tmp_path), "--backend", other.base_url, "--force", *RESUME)
    assert forced.returncode == 0, forced.stderr
    assert logged_on.stats.requests == 0 and other.stats.requests == 8
    assert {body["model"] for body in other.stats.requests_log} == {"other-model"}


def test_a_log_mixing_two_runs_is_refused_naming_the_line(fake_backend: Any, tmp_path: Path) -> None:
    server = fake_backend(length_mean=40)
    run_a, run_b = half_run(server, tmp_path / "a"), half_run(server, tmp_path / "b")
    # Run A's config, then run B's rollouts.
    spliced = tmp_path / "spliced"
    spliced.mkdir()
    (spliced / "run.jsonl").write_text("\n".join([run_a[0], *run_b[1:]]) + "\n")
    refused = cli("solve", "--resume", str(spliced), "--backend", server.base_url, *RESUME)
    assert_one_line_error(refused, "run.jsonl:2", "run")
    # A second config record.
    doubled = tmp_path / "doubled"
    doubled.mkdir()
    (doubled / "run.jsonl").write_text("\n".join([*run_a, run_b[0]]) + "\n")
    refused = cli("solve", "--resume", str(doubled), "--backend", server.base_url, *RESUME)
    assert_one_line_error(refused, f"run.jsonl:{len(run_a) + 1}", "second config record")
    assert server.stats.requests == 0
