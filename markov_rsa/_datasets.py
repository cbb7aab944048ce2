"""Evaluation data from wherever it is kept: a built-in name (``arith``, ``gsm8k``, ``math500``), a
JSONL, CSV or Parquet file, or ``hf:ORG/NAME[:split]`` through the ``datasets`` library.

Each source yields ``(row number, row)`` pairs, where a row is a dict or, for a line that could not
be read, a :class:`BadRow` saying why; :func:`markov_rsa.load_dataset` turns rows into problems.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any


from ._errors import ConfigError

BUILTIN_PACKAGE = "markov_rsa.datasets"
HF_PREFIX = "hf:"
HF_DEFAULT_SPLIT = "test"


@dataclass(frozen=True)
class BadRow:
    """A line of a file that is not a usable row, and why."""

    reason: str


@dataclass(frozen=True)
class Fields:
    """Which columns hold what (``--problem-field``, ``--answer-field``)."""

    problem: str = "problem"
    answer: str = "answer"
    id: str = "id"
    task: str = "task"


Rows = Iterator[tuple[int, "dict[str, Any] | BadRow"]]


def builtin_names() -> list[str]:
    """The datasets shipped with the package, by name."""
    folder = resources.files(BUILTIN_PACKAGE)
    return sorted(entry.name.removesuffix(".jsonl") for entry in folder.iterdir() if entry.name.endswith(".jsonl"))


def read_rows(source: str | Path) -> Rows:
    """The rows of a built-in name, a file (by its suffix; anything else is read as JSONL) or
    ``hf:ORG/NAME[:split]``. Raises :class:`ConfigError` when the source cannot be found or opened."""
    text = str(source)
    if text.startswith(HF_PREFIX):
        return _hf_rows(text.removeprefix(HF_PREFIX))
    path = Path(source)
    if not path.exists() and text in builtin_names():
        return _jsonl_rows(resources.files(BUILTIN_PACKAGE).joinpath(f"{text}.jsonl").read_text(encoding="utf-8"))
    if not path.is_file():
        names = ", ".join(builtin_names())
        raise ConfigError(
            f"dataset not found: {text} (give a .jsonl, .csv or .parquet file, a built-in name: {names}, "
            "or hf:ORG/NAME[:split])",
            param="dataset",
        )
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_rows(path)
    if suffix in (".parquet", ".pq"):
        return _parquet_rows(path)
    return _jsonl_rows(path.read_text(encoding="utf-8", errors="replace"))


def identify(source: str | Path) -> dict[str, str | None]:
    """``name``, ``path`` and ``sha256`` of a dataset, for an evaluation's record: a file's path and
    digest, a built-in's name and digest, or an ``hf:`` name (its version is the cache's business)."""
    text = str(source)
    if text.startswith(HF_PREFIX):
        name, split = parse_hf(text.removeprefix(HF_PREFIX))
        return {"name": f"{HF_PREFIX}{name}:{split}", "path": None, "sha256": None}
    path = Path(source)
    if not path.exists() and text in builtin_names():
        data = resources.files(BUILTIN_PACKAGE).joinpath(f"{text}.jsonl").read_bytes()
        return {"name": text, "path": f"builtin:{text}", "sha256": hashlib.sha256(data).hexdigest()}
    return {"name": path.stem, "path": str(path), "sha256": file_sha256(path)}


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _jsonl_rows(text: str) -> Rows:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as err:
            yield number, BadRow(f"not JSON ({getattr(err, 'msg', err)})")
            continue
        yield number, item if isinstance(item, dict) else BadRow("not a JSON object")


def _csv_rows(path: Path) -> Rows:
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            # Line numbers of the file, header included, so that a warning points at the right line.
            yield reader.line_num, {key: value for key, value in row.items() if key is not None}


def _parquet_rows(path: Path) -> Rows:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise ConfigError("reading Parquet needs pyarrow: pip install pyarrow", param="dataset") from None
    try:
        table = parquet.read_table(path)
    except Exception as err:  # noqa: BLE001 - any reader failure means an unreadable file
        raise ConfigError(f"cannot read {path} as Parquet: {err}", param="dataset") from None
    for number, row in enumerate(table.to_pylist(), 1):
        yield number, row


def parse_hf(spec: str) -> tuple[str, str]:
    """``ORG/NAME[:split]`` -> ``(ORG/NAME, split)``."""
    name, _, split = spec.partition(":")
    if not name.strip():
        raise ConfigError("hf: needs a dataset name, e.g. hf:openai/gsm8k:test", param="dataset")
    return name.strip(), split.strip() or HF_DEFAULT_SPLIT


def _hf_rows(spec: str) -> Rows:
    """A dataset through Hugging Face ``datasets``: a local directory of that name, or the local
    cache. Nothing is downloaded unless ``HF_HUB_OFFLINE=0`` is set explicitly."""
    name, split = parse_hf(spec)
    # Read before the import: the hub library fixes its offline mode when it is first imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "hf: datasets need the 'datasets' package: pip install 'markov-rsa[hf]'", param="dataset"
        ) from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        data = datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - the library raises many kinds; all mean "not available"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"cannot load hf:{name} split {split!r} offline (it must be a local directory or in the local "
            f"Hugging Face cache; set HF_HUB_OFFLINE=0 to allow a download): {first}",
            param="dataset",
        ) from None
    for number, row in enumerate(data, 1):
        yield number, dict(row)
