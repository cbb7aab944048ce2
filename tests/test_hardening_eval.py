"""Evaluations as real datasets and real interruptions exercise them: ids, resume, ties."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from test_cli import cli

from markov_rsa import load_dataset, solve

EVAL_ARGS = ["--n", "2", "--k", "2", "--t", "2", "--tail-tokens", "20", "--max-tokens", "200", "--seed", "1", "-q"]


def test_dataset_id_zero_is_kept(fake_backend: Any, tmp_path: Path) -> None:
    dataset = tmp_path / "ids.jsonl"
    dataset.write_text(
        '{"id": 0, "problem": "What is 2 + 3?", "answer": "5"}\n'
        '{"id": 1, "problem": "What is 6 * 7?", "answer": "42"}\n'
        '{"problem": "What is 1 + 1?", "answer": "2"}\n'
    )
    problems, errors = load_dataset(dataset)
    assert [p.id for p in problems] == ["0", "1", "line3"] and not errors.lines
    server = fake_backend(length_mean=30)
    out = tmp_path / "out"
    proc = cli("eval", str(dataset), "--backend", server.base_url, *EVAL_ARGS, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert [row["id"] for row in csv.DictReader((out / "problems.csv").open())] == ["0", "1", "line3"]
    assert (out / "runs" / "0" / "run.jsonl").is_file()


def test_resume_of_finished_problems_changes_nothing(fake_backend: Any, tmp_path: Path) -> None:
    dataset = Path(__file__).resolve().parent.parent / "datasets" / "arith.jsonl"
    server = fake_backend(length_mean=30)
    first = cli("eval", str(dataset), "--backend", server.base_url, *EVAL_ARGS, "--limit", "2", "--out", str(tmp_path))
    assert first.returncode == 0, first.stderr
    logs = {path: path.read_bytes() for path in (tmp_path / "runs").glob("*/run.jsonl")}
    before = json.loads((tmp_path / "results.json").read_text())
    server.reset_stats()
    again = cli("eval", str(dataset), "--backend", server.base_url, *EVAL_ARGS, "--limit", "2",
                "--resume", str(tmp_path))
    assert again.returncode == 0, again.stderr
    assert server.stats.requests == 0
    assert {path: path.read_bytes() for path in logs} == logs  # nothing appended
    after = json.loads((tmp_path / "results.json").read_text())
    # Per-round times are the logged ones (kept to 0.1 ms), not those of a run that had nothing to do.
    for row_after, row_before in zip(after["rounds"], before["rounds"], strict=True):
        assert row_after == {**row_before, "wall_s": pytest.approx(row_before["wall_s"], abs=1.5e-4)}
    assert after["final_acc"] == before["final_acc"] and after["tokens"] == before["tokens"]


def test_a_tied_vote_is_decided_by_finished_traces_and_reported(fake_backend: Any) -> None:
    # Two traces, one vote each: the one cut at the token budget loses the tie, whatever its slot.
    long_answer = r"The answer is \boxed{0}." + " and some more words" * 40
    server = fake_backend(script=[long_answer, r"The answer is \boxed{42}."], reasoning_field="none")
    result = solve("What is 40 + 2?", backend=server.base_url, n=2, k=1, t=1, max_tokens=30,
                   selection="majority", seed=3)
    assert sorted(r.trace.finish_reason for r in result.population if r.trace) == ["length", "stop"]
    assert result.answer == "42"
    assert result.tie == {"answers": ["42", "0"], "votes": 1, "winner": "42", "rule": "more finished traces"}
    assert any("tied vote" in note for note in result.notes)
    assert result.to_dict()["tie"] == result.tie
