"""Running model-written Python in a subprocess under resource limits.

This executes untrusted code on the host. The limits (CPU time, address space, processes, output
size, wall-clock timeout, a private temporary directory, an isolated interpreter and an empty
environment) stop runaway and memory-hungry programs; they are not a security boundary against a
program written to escape. ``RLIMIT_NPROC`` counts every process of the user and is not enforced
for root. Use it only where running model output is acceptable, or inside a container.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import resource
import signal
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Iteration))\b", re.MULTILINE)


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one program run."""

    cpu_s: float = 2.0
    """CPU seconds (RLIMIT_CPU); the process is killed past them."""
    wall_s: float = 6.0
    """Wall-clock seconds before the process group is killed (a program blocked on a sleep or a pipe)."""
    memory_bytes: int = 512 * 2**20
    """Address space (RLIMIT_AS); allocations past it raise MemoryError."""
    processes: int = 32
    """RLIMIT_NPROC (per user; not enforced for root)."""
    output_bytes: int = 2 * 2**20
    """Largest stdout or stderr file (RLIMIT_FSIZE); the process is killed past it."""


Status = Literal["ok", "error", "timeout", "limit"]


@dataclass(frozen=True)
class ProgramRun:
    """How one run ended: ``ok`` (exit 0), ``error`` (non-zero exit), ``timeout`` (wall clock) or
    ``limit`` (killed for CPU time or output size, or out of memory)."""

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    error_type: str | None = None
    """The exception a failed run ended with (``NameError``), read from its traceback."""

    @property
    def stopped_by_limits(self) -> bool:
        """Whether a limit of the sandbox ended the run."""
        return self.status in ("timeout", "limit")


def _apply_limits(limits: SandboxLimits) -> None:
    # Runs in the child between fork and exec: only calls into modules imported already.
    cpu = max(1, math.ceil(limits.cpu_s))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.output_bytes, limits.output_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class Sandbox:
    """Runs Python programs under :class:`SandboxLimits`, at most ``parallel`` at a time.

    Create one per event loop (its semaphore belongs to the loop that first uses it).
    """

    def __init__(self, limits: SandboxLimits | None = None, parallel: int | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self._gate = asyncio.Semaphore(parallel or max(1, os.cpu_count() or 1))

    async def run(self, code: str, stdin: str = "") -> ProgramRun:
        """Run ``code`` with ``stdin`` in a fresh temporary directory and return how it ended."""
        async with self._gate:
            with tempfile.TemporaryDirectory(prefix="markov-rsa-sandbox-") as tmp:
                return await self._run_in(Path(tmp), code, stdin)

    async def _run_in(self, tmp: Path, code: str, stdin: str) -> ProgramRun:
        limits = self.limits
        (tmp / "main.py").write_text(code, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp), "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
        with (tmp / "stdout").open("wb") as out, (tmp / "stderr").open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-B", "main.py",
                cwd=tmp, env=env, stdin=asyncio.subprocess.PIPE, stdout=out, stderr=err,
                preexec_fn=partial(_apply_limits, limits), start_new_session=True,
            )  # fmt: skip
            timed_out = False
            try:
                await asyncio.wait_for(proc.communicate(stdin.encode("utf-8")), timeout=limits.wall_s)
            except TimeoutError:
                timed_out = True
            finally:
                # Also ends whatever the program started in its session.
                _kill_group(proc.pid)
                if proc.returncode is None:
                    await proc.wait()
        stdout = (tmp / "stdout").read_bytes()[: limits.output_bytes].decode("utf-8", "replace")
        stderr = (tmp / "stderr").read_bytes()[-20_000:].decode("utf-8", "replace")
        code_ = proc.returncode
        errors = _ERROR_LINE.findall(stderr)
        error_type = errors[-1].rsplit(".", 1)[-1] if errors else None
        status: Status
        if timed_out:
            status = "timeout"
        elif code_ == 0:
            status = "ok"
        elif (code_ is not None and code_ < 0) or error_type == "MemoryError" or "File too large" in stderr:
            # Killed past the CPU limit, out of memory, or past the output limit (Python ignores
            # SIGXFSZ, so the write fails with EFBIG instead).
            status = "limit"
        else:
            status = "error"
        return ProgramRun(status, code_, stdout, stderr, error_type)


def normalise_output(text: str) -> str:
    """A program's stdout without trailing whitespace on each line or trailing blank lines (as
    competitive-programming judges compare it)."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def same_output(actual: str, expected: str) -> bool:
    """Whether a program's stdout matches the expected one, as :func:`normalise_output` sees them."""
    return normalise_output(actual) == normalise_output(expected)
