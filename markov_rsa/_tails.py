"""Tails: the last tau tokens of a trace, the only part of it carried to the next round."""

from __future__ import annotations

import re
from typing import Any
from dataclasses import dataclass

from ._tokenizers import Tokenizer
from ._types import Trace

TRUNCATION_MARKER = "[... earlier reasoning truncated ...]"
_THINK_TAGS = re.compile(r"</?think>")
# How far into a tail the cut may move to reach a line break; past this, a long unbroken line is
# cut mid-line rather than losing most of the tail.
_ALIGN_FRACTION = 0.25
APPROXIMATE_MARGIN = 0.75
"""Share of ``tail_tokens`` kept when the tokenizer only approximates the model's (tiktoken): a
model's own tokens run up to ~30 % more than cl100k's on reasoning text, so a cut at 75 % stays
within tau instead of over it."""
# Characters per token that a window of the text's end is sized by: no tokenizer's tokens run
# longer on average, so the window holds at least the tokens asked for (else it grows).
_WINDOW_CHARS_PER_TOKEN = 16


@dataclass(frozen=True)
class Tail:
    """The part of a trace shown to aggregation calls."""

    text: str
    """What the candidate block shows, marker included when cut."""
    tokens: int
    """Tokens of the kept trace text (without the marker) in the tokenizer used; at most ``tail_tokens``."""
    truncated: bool


def answer_section(trace: Trace) -> str | None:
    """The answer section of a trace that finished: what it wrote after its reasoning (the
    backend's separate answer when it split reasoning off, else the text after an inline
    ``</think>``). None for a trace cut at its budget, or one with no reasoning to set apart
    (the report's PaCoRe hybrid then carries the trace's tail)."""
    if not trace.finished:
        return None
    if trace.reasoning.strip():
        answer = trace.content
    elif "</think>" in trace.content:
        answer = trace.content.rsplit("</think>", 1)[1]
    else:
        return None
    answer = _strip_think(answer)
    return answer or None


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
    budget = tail_tokens if tokenizer.exact else max(1, int(tail_tokens * APPROXIMATE_MARGIN))
    ids = trace.token_ids
    if ids is None or not tokenizer.decodes_backend_ids or not _all_ids(ids[-budget:]):
        ids = await _encode_end(full, budget, tokenizer)
    if len(ids) <= budget:
        return Tail(full, len(ids), False)
    kept = _strip_think(await tokenizer.decode(ids[-budget:]))
    if align_newline:
        kept = _align(kept)
    # The count is an upper bound once the cut moved to a line break; re-tokenizing to know it
    # exactly would cost a server round trip per trace.
    return Tail(f"{TRUNCATION_MARKER}\n{kept}", budget, True)


def _all_ids(ids: list[Any]) -> bool:
    """Whether every item is a token id (an integer): a server's token list is used as sent."""
    return set(map(type, ids)) <= {int}


async def _encode_end(text: str, tokens: int, tokenizer: Tokenizer) -> list[int]:
    """Token ids of the end of ``text``: enough of it to hold more than ``tokens`` tokens, or all of it.

    A trace can be megabytes long; only its end is ever kept, so only a window of the end is
    tokenized (the window's first token may be cut mid-word, far from what is kept).
    """
    window = (tokens + 1) * _WINDOW_CHARS_PER_TOKEN
    while True:
        if window >= len(text):
            return await tokenizer.encode(text)
        ids = await tokenizer.encode(text[-window:])
        if len(ids) > tokens + 1:
            return ids
        window *= 4
