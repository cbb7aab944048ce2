"""Tails: the last tau tokens of a trace, the only part of it carried to the next round."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._tokenizers import Tokenizer
from ._types import Trace

TRUNCATION_MARKER = "[... earlier reasoning truncated ...]"
_THINK_TAGS = re.compile(r"</?think>")
# How far into a tail the cut may move to reach a line break; past this, a long unbroken line is
# cut mid-line rather than losing most of the tail.
_ALIGN_FRACTION = 0.25


@dataclass(frozen=True)
class Tail:
    """The part of a trace shown to aggregation calls."""

    text: str
    """What the candidate block shows, marker included when cut."""
    tokens: int
    """Tokens of the kept trace text (without the marker) in the tokenizer used; at most ``tail_tokens``."""
    truncated: bool


def _strip_think(text: str) -> str:
    return _THINK_TAGS.sub("", text).strip()


def _align(text: str) -> str:
    cut = text.find("\n")
    if 0 <= cut < len(text) * _ALIGN_FRACTION and cut + 1 < len(text):
        return text[cut + 1 :]
    return text


async def make_tail(trace: Trace, tail_tokens: int, tokenizer: Tokenizer, align_newline: bool = True) -> Tail:
    """Keep the last ``tail_tokens`` tokens of the trace's whole output (reasoning, then answer).

    Uses the completion's own token ids when the backend returned them and the tokenizer can decode
    them; otherwise re-tokenizes the text. ``tail_tokens == 0`` keeps the full trace.
    """
    full = _strip_think(trace.text)
    if tail_tokens == 0:
        return Tail(full, len(trace.token_ids) if trace.token_ids else -1, False)
    if trace.token_ids is not None and tokenizer.decodes_backend_ids:
        ids = trace.token_ids
    else:
        ids = await tokenizer.encode(full)
    if len(ids) <= tail_tokens:
        return Tail(full, len(ids), False)
    kept = _strip_think(await tokenizer.decode(ids[-tail_tokens:]))
    if align_newline:
        kept = _align(kept)
    # The count is an upper bound once the cut moved to a line break; re-tokenizing to know it
    # exactly would cost a server round trip per trace.
    return Tail(f"{TRUNCATION_MARKER}\n{kept}", tail_tokens, True)
