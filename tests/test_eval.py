"""``markov-rsa eval`` on the simulated backend, configured so that aggregation helps."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from test_cli import cli

DATASET = Path(__file__).resolve().parent.parent / "datasets" / "arith.jsonl"
ARGS = ["--n", "8", "--k", "4", "--t", "3", "--tail-tokens", "40", "--max-tokens", "400", "--seed", "1", "-q"]


def test_eval_accuracy_rises_over_rounds(fake_backend: Any, tmp_path: Path) -> None:
    server = fake_backend(length_mean=40, error_rate=0.6, follow_majority=0.9, aggregation_error_rate=0.3, seed=4)
    proc = cli("eval", str(DATASET), "--backend", server.base_url, *ARGS, "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for row in rounds:
        assert {"round", "mean_acc", "majority_acc", "pass_at_n", "tokens", "calls"} <= row.keys()
        assert row["calls"] == 30 * 8
    assert rounds[-1]["mean_acc"] > rounds[0]["mean_acc"] + 0.1
    assert rounds[-1]["majority_acc"] > rounds[0]["majority_acc"]
    assert results["completed"] == 30
    assert sum(r["tokens"] for r in rounds) == server.stats.usage["total_tokens"]
    rows = list(csv.DictReader((tmp_path / "problems.csv").open()))
    assert len(rows) == 30 and {"id", "gold", "predicted", "correct"} <= rows[0].keys()
    assert "mean@N" in proc.stdout  # the summary table


def test_eval_reports_bad_lines_and_runs_the_rest(fake_backend: Any, tmp_path: Path) -> None:
    server = fake_backend(length_mean=30, error_rate=0.0, aggregation_error_rate=0.0)
    dataset = tmp_path / "mixed.jsonl"
    dataset.write_text(
        '{"id": "a", "problem": "What is 2 + 3?", "answer": "5"}\n'
        '{"id": "b", "answer": "7"}\n'
        "this is not json\n"
        '{"id": "c", "problem": "What is 6 * 7?", "answer": "42"}\n'
    )
    out = tmp_path / "out"
    proc = cli("eval", str(dataset), "--backend", server.base_url, "--n", "2", "--k", "2", "--t", "2",
               "--tail-tokens", "20", "--max-tokens", "200", "--seed", "1", "-q", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "mixed.jsonl:2" in proc.stderr and "problem" in proc.stderr
    assert "mixed.jsonl:3" in proc.stderr and "not JSON" in proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["completed"] == 2 and results["final_acc"] == 1.0
    assert [s["line"] for s in results["skipped_lines"]] == [2, 3]


def test_eval_limit_and_resume(fake_backend: Any, tmp_path: Path) -> None:
    server = fake_backend(length_mean=30)
    first = cli("eval", str(DATASET), "--backend", server.base_url, *ARGS, "--limit", "3", "--out", str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert json.loads((tmp_path / "results.json").read_text())["problems"] == 3
    server.reset_stats()
    again = cli("eval", str(DATASET), "--backend", server.base_url, *ARGS, "--limit", "3", "--resume", str(tmp_path))
    assert again.returncode == 0, again.stderr
    assert server.stats.requests == 0  # every problem's run was already complete in its log


def test_eval_refuses_to_overwrite_an_evaluation(fake_backend: Any, tmp_path: Path) -> None:
    server = fake_backend(length_mean=30)
    first = cli("eval", str(DATASET), "--backend", server.base_url, *ARGS, "--limit", "2", "--out", str(tmp_path))
    assert first.returncode == 0, first.stderr
    before = (tmp_path / "results.json").read_text()
    again = cli("eval", str(DATASET), "--backend", server.base_url, *ARGS, "--limit", "2", "--out", str(tmp_path))
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr
    assert (tmp_path / "results.json").read_text() == before
