"""What the engine needs to know about a GGUF file before handing it to transformers.

transformers' own reader parses every metadata field, the whole vocabulary included, which takes
seconds; the architecture and the tensor sizes sit in the header, so a small reader of our own
answers "can this load, and will it fit" in milliseconds.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._errors import ConfigError

_MAGIC = b"GGUF"
# GGUF value types, fixed-size ones with their struct codes.
_SCALARS: dict[int, str] = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING = 8
_ARRAY = 9


@dataclass(frozen=True)
class GGUFHeader:
    """The parts of a GGUF header the engine uses."""

    architecture: str
    """``general.architecture``, llama.cpp's name for the model family (``llama``, ``qwen2``...)."""
    name: str | None
    """``general.name`` when present."""
    parameters: int
    """Number of weights over all tensors, the size the model has once dequantized."""
    tensors: int


class _Cursor:
    def __init__(self, buffer: Any) -> None:
        self.buffer = buffer
        self.offset = 0

    def scalar(self, code: str) -> Any:
        (value,) = struct.unpack_from("<" + code, self.buffer, self.offset)
        self.offset += struct.calcsize(code)
        return value

    def string(self) -> str:
        length = self.scalar("Q")
        raw = bytes(self.buffer[self.offset : self.offset + length])
        self.offset += length
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        length = self.scalar("Q")  # read first: ``offset += scalar()`` would use the offset before the read
        self.offset += length

    def value(self, kind: int, keep: bool) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            if keep:
                return self.string()
            self.skip_string()
            return None
        if kind == _ARRAY:
            item_kind = self.scalar("I")
            count = self.scalar("Q")
            if item_kind in _SCALARS:
                self.offset += count * struct.calcsize(_SCALARS[item_kind])
            else:
                for _ in range(count):
                    self.value(item_kind, keep=False)
            return None
        raise ValueError(f"unknown GGUF value type {kind}")


def read_header(path: str | Path) -> GGUFHeader:
    """Read the architecture and the weight count of a GGUF file; ConfigError when it is not one."""
    path = Path(path)
    try:
        with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            return _parse(buffer, path)
    except (OSError, ValueError, TypeError, struct.error) as err:
        raise ConfigError(f"cannot read GGUF file {path}: {err}", param="model") from None


def _parse(buffer: Any, path: Path) -> GGUFHeader:
    if bytes(buffer[:4]) != _MAGIC:
        raise ValueError("not a GGUF file (bad magic)")
    cursor = _Cursor(buffer)
    cursor.offset = 4
    version = cursor.scalar("I")
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old (2 or later is needed)")
    tensor_count = cursor.scalar("Q")
    kv_count = cursor.scalar("Q")
    wanted = {"general.architecture", "general.name"}
    found: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cursor.string()
        kind = cursor.scalar("I")
        found_value = cursor.value(kind, keep=key in wanted)
        if key in wanted:
            found[key] = found_value
    parameters = 0
    for _ in range(tensor_count):
        cursor.skip_string()
        dims = [cursor.scalar("Q") for _ in range(cursor.scalar("I"))]
        cursor.offset += 4 + 8  # tensor type, data offset
        parameters += math.prod(dims)
    architecture = found.get("general.architecture")
    if not isinstance(architecture, str):
        raise TypeError("no general.architecture string in the header")
    return GGUFHeader(architecture, found.get("general.name"), parameters, tensor_count)


def transformers_architecture(architecture: str, supported: list[str]) -> str | None:
    """The name transformers' GGUF loader knows ``architecture`` by, or None when it cannot load it.

    llama.cpp spells a few families differently (``qwen2moe``, ``gpt-oss``); transformers maps
    those itself, so only the spelling is normalised here.
    """
    candidates = [architecture, architecture.replace("-", "_")]
    for fused in ("qwen2moe", "qwen3moe"):
        if fused in architecture:
            candidates.append(fused.replace("moe", "_moe"))
    if "t5" in architecture:
        candidates += ["t5", "umt5"]
    return next((name for name in candidates if name in supported), None)


def check_loadable(header: GGUFHeader, path: Path) -> None:
    """ConfigError when transformers has no GGUF loader for the file's architecture."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    supported = [name for name in GGUF_SUPPORTED_ARCHITECTURES if name not in ("general", "tokenizer")]
    if transformers_architecture(header.architecture, supported) is None:
        raise ConfigError(
            f"transformers cannot load GGUF files of architecture {header.architecture!r} ({path.name}); "
            f"its GGUF loader supports: {', '.join(sorted(supported))}. Use the model's safetensors "
            "checkpoint instead, or serve the GGUF with llama.cpp and use --backend",
            param="model",
        )


def cache_key(path: Path, transformers_version: str) -> str:
    """A directory name for the dequantized copy of ``path``: changes when the file or transformers does."""
    stat = path.stat()
    digest = hashlib.sha256(
        f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers_version}".encode()
    ).hexdigest()[:16]
    return f"{path.stem}-{digest}"
