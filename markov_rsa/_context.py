"""Calls that fit the model's context: a completion budget lowered to the room the prompt leaves,
and aggregation tails shortened evenly when the prompt alone leaves too little."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ._prompts import content_text
from ._tails import TRUNCATION_MARKER, make_tail
from ._tokenizers import Tokenizer
from ._types import Message, Trace

# Tokens a chat template may add per message (role markers, separators) and per prompt (the
# generation prompt); generous, since the count is of content only.
PER_MESSAGE_TOKENS = 8
PER_PROMPT_TOKENS = 16
# The least completion budget worth sending: below it the tails are shortened instead.
MIN_COMPLETION_TOKENS = 256
# Room for the truncation marker a shortened tail gets.
MARKER_TOKENS = 16


def prompt_bound(messages: Sequence[Message]) -> int:
    """An upper bound on a prompt's tokens without tokenizing: a token covers at least one byte."""
    content = sum(len(content_text(m.get("content")).encode("utf-8")) for m in messages)
    return content + PER_MESSAGE_TOKENS * len(messages) + PER_PROMPT_TOKENS


async def prompt_tokens(messages: Sequence[Message], tokenizer: Tokenizer) -> int:
    """A prompt's tokens in ``tokenizer``, plus an allowance for the chat template."""
    total = PER_PROMPT_TOKENS
    for message in messages:
        total += PER_MESSAGE_TOKENS + len(await tokenizer.encode(content_text(message.get("content"))))
    return total


@dataclass(frozen=True)
class Shortening:
    """How far each tail of one aggregation prompt must be cut for the call to fit."""

    tokens_each: int


def tails_budget(
    context: int, prompt: int, tail_counts: Sequence[int], max_tokens: int
) -> Shortening | None:
    """The even cut that leaves a useful completion budget, or None when none is needed.

    ``prompt`` counts the whole prompt, ``tail_counts`` the tokens of each tail within it.
    """
    floor = min(max_tokens, MIN_COMPLETION_TOKENS)
    if context - prompt >= floor or not tail_counts:
        return None
    fixed = prompt - sum(tail_counts)
    each = (context - floor - fixed) // len(tail_counts) - MARKER_TOKENS
    return Shortening(max(0, each))


async def shorten_tail(tail: str, tokens: int, tokenizer: Tokenizer, align_newline: bool) -> str:
    """``tail`` cut to its last ``tokens`` tokens (marked as truncated)."""
    body = tail.removeprefix(TRUNCATION_MARKER + "\n")
    if tokens <= 0:
        return TRUNCATION_MARKER
    cut = await make_tail(Trace(content=body), tokens, tokenizer, align_newline)
    return cut.text if cut.truncated or body == tail else f"{TRUNCATION_MARKER}\n{cut.text}"
