"""Evaluation datasets: built-in names, JSONL, CSV, Parquet and hf:ORG/NAME[:split], with field mapping."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from markov_rsa import ConfigError, load_dataset
from markov_rsa._datasets import Fields, builtin_names, parse_hf

CLI = str(Path(sys.executable).parent / "markov-rsa")
ROWS = [
    {"qid": "a", "question": "What is 2 + 3?", "gold": "5"},
    {"qid": "b", "question": "What is 10 - 4?", "gold": 6},
    {"qid": "c", "question": "What is 0 * 9?", "gold": 0},
]
FIELDS = Fields(problem="question", answer="gold", id="qid")


def _check(problems: list[Any]) -> None:
    assert [(p.id, p.problem, p.answer) for p in problems] == [
        ("a", "What is 2 + 3?", "5"), ("b", "What is 10 - 4?", "6"), ("c", "What is 0 * 9?", "0"),
    ]


@pytest.mark.parametrize(("name", "count"), [("arith", 30), ("gsm8k", 1319), ("math500", 500)])
def test_builtin_datasets_by_name(name: str, count: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # found by name, not as a file in the working directory
    problems, bad = load_dataset(name)
    assert len(problems) == count and not bad.lines
    assert len({p.id for p in problems}) == count
    assert all(p.problem.strip() and p.answer.strip() for p in problems)
    assert name in builtin_names()


def test_builtin_answers_are_the_references() -> None:
    gsm8k = {p.id: p for p in load_dataset("gsm8k")[0]}
    assert gsm8k["gsm8k-0"].answer == "18" and "Janet" in gsm8k["gsm8k-0"].problem
    math500 = {p.id: p for p in load_dataset("math500")[0]}
    assert math500["math500-0"].answer == r"\left( 3, \frac{\pi}{2} \right)"


def test_jsonl_with_mapped_fields(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS) + "not json\n")
    problems, bad = load_dataset(path, fields=FIELDS)
    _check(problems)
    assert bad.lines == [(4, "not JSON (Expecting value)")]


def test_csv(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["qid", "question", "gold"])
        writer.writeheader()
        writer.writerows(ROWS)
        writer.writerow({"qid": "d", "question": "", "gold": "1"})
    problems, bad = load_dataset(path, fields=FIELDS)
    _check(problems)
    assert bad.lines == [(5, "missing 'question'")]


def test_parquet(tmp_path: Path) -> None:
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    path = tmp_path / "d.parquet"
    parquet.write_table(pyarrow.Table.from_pylist([{**row, "gold": str(row["gold"])} for row in ROWS]), path)
    _check(load_dataset(path, fields=FIELDS)[0])


def test_missing_dataset_names_every_form(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dataset not found: .*nope") as caught:
        load_dataset(tmp_path / "nope")
    for form in (".jsonl", ".csv", ".parquet", "arith", "gsm8k", "math500", "hf:ORG/NAME[:split]"):
        assert form in str(caught.value)
    assert parse_hf("org/name") == ("org/name", "test") and parse_hf("org/name:train") == ("org/name", "train")


def _run(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MARKOV_RSA_", "HF_"))}
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env={**base, **env})


def test_hf_dataset_saved_locally_and_missing_offline(tmp_path: Path, fake_backend: Any) -> None:
    pytest.importorskip("datasets")
    server = fake_backend(length_mean=30, error_rate=0.0, aggregation_error_rate=0.0)
    folder = tmp_path / "myorg" / "tiny"
    folder.mkdir(parents=True)
    (folder / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS[:2]))
    env = {"HF_HOME": str(tmp_path / "hf-home")}
    out = tmp_path / "out"
    proc = _run(
        "eval", "hf:myorg/tiny:test", "--backend", server.base_url, "--preset", "smoke", "--seed", "1",
        "--problem-field", "question", "--answer-field", "gold", "--id-field", "qid", "--out", str(out),
        "--quiet", cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["problems"] == 2 and results["completed"] == 2
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["a", "b"]

    missing = _run("eval", "hf:myorg/absent", "--backend", server.base_url, cwd=tmp_path, env=env)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "cannot load hf:myorg/absent split 'test' offline" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr


def test_eval_builtin_by_name(tmp_path: Path, fake_backend: Any) -> None:
    server = fake_backend(length_mean=30, error_rate=0.0, aggregation_error_rate=0.0)
    proc = _run(
        "eval", "arith", "--limit", "2", "--backend", server.base_url, "--preset", "smoke", "--out",
        str(tmp_path / "out"), "--quiet", cwd=tmp_path, env={},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "out" / "results.json").read_text())["problems"] == 2
