"""Will the model fit? Checked before loading, so that a model too large for the machine ends in a
clear message instead of the kernel's OOM killer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._errors import ConfigError

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Room for activations, the KV cache of a batch and the framework itself, beyond the weights.
_HEADROOM_FRACTION = 0.15
_HEADROOM_BYTES = {"cpu": GIB // 2, "cuda": GIB}


@dataclass(frozen=True)
class MemoryEstimate:
    """What loading a model is expected to need, against what the device has free."""

    parameters: int
    dtype: str
    device: str
    needed_bytes: int
    available_bytes: int | None
    """None when the free memory could not be read; the check is then skipped."""

    @property
    def fits(self) -> bool:
        """Whether the model is expected to fit (True when free memory is unknown)."""
        return self.available_bytes is None or self.needed_bytes <= self.available_bytes


def needed_bytes(parameters: int, dtype: str, device: str, conversion_bytes_per_param: int = 0) -> int:
    """Weights at ``dtype`` plus headroom; ``conversion_bytes_per_param`` adds a transient copy (GGUF dequantization)."""
    weights = parameters * DTYPE_BYTES.get(dtype, 4)
    kind = device.split(":")[0]
    return int(weights * (1 + _HEADROOM_FRACTION)) + parameters * conversion_bytes_per_param + _HEADROOM_BYTES.get(
        kind, GIB // 2
    )


def _meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    # A container's limit is invisible in /proc/meminfo, and exceeding it is what gets a process killed.
    pairs = ((root / "memory.max", root / "memory.current"), (root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.usage_in_bytes"))
    for limit_file, usage_file in pairs:
        try:
            limit_text = limit_file.read_text().strip()
            if limit_text == "max":
                return None
            limit, usage = int(limit_text), int(usage_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if limit >= 2**60:  # cgroup v1 spells "no limit" as a huge number
            return None
        return max(0, limit - usage)
    return None


def available_memory(device: str, torch: Any | None = None) -> int | None:
    """Free bytes on ``device`` (``cpu``, ``cuda``, ``cuda:1``), or None when it cannot be told."""
    kind, _, index = device.partition(":")
    if kind == "cuda" and torch is not None:
        try:
            free, _total = torch.cuda.mem_get_info(int(index or 0))
            return int(free)
        except Exception:  # noqa: BLE001 - an unreadable GPU is reported as unknown, not fatal
            return None
    if kind != "cpu":
        return None
    candidates = [value for value in (_meminfo_available(), _cgroup_available()) if value is not None]
    if not candidates:
        try:
            import psutil  # type: ignore[import-untyped]

            return int(psutil.virtual_memory().available)
        except ImportError:
            return None
    return min(candidates)


def check_fits(model: str, estimate: MemoryEstimate) -> None:
    """ConfigError with the numbers when the model is not expected to fit."""
    if estimate.fits:
        return
    assert estimate.available_bytes is not None
    raise ConfigError(
        f"not enough memory to load {model}: it needs about {estimate.needed_bytes / GIB:.1f} GiB "
        f"({estimate.parameters / 1e9:.2f}B parameters in {estimate.dtype}, plus working room) but only "
        f"{estimate.available_bytes / GIB:.1f} GiB is free on {estimate.device}; use a smaller model, "
        "a lower-precision dtype, or another device",
        param="model",
    )
