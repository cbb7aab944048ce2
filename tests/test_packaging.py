"""A wheel built from the repo (``pip install .``, not only ``-e``) carries the prompts and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_carries_prompts_and_cli(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("markov_rsa-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("math", "code", "general", "final", "candidate"):
        assert f"markov_rsa/prompts/{name}.txt" in names
    for module in ("cli/main.py", "fake_backend/__init__.py", "engine/__init__.py", "server/__init__.py"):
        assert f"markov_rsa/{module}" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    for template in ("base.html.j2", "eval_page.html.j2", "run_page.html.j2", "compare_page.html.j2", "style.css", "report.js"):
        assert f"markov_rsa/report/templates/{template}" in names

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import markov_rsa, markov_rsa.cli.main as m; from markov_rsa import load_template;"
        "print(markov_rsa.__file__); print(len(load_template('math')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
    ).stdout.split()
    assert out[0].startswith(str(target))
    assert int(out[1]) > 100
