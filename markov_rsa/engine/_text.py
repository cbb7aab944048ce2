"""From generated token ids to a trace's text, and from chat messages to a prompt. Pure Python, so
it is testable without torch."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._types import Message

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass
class FinishedRow:
    """One sequence of a batch, cut where it ended."""

    token_ids: list[int]
    text: str
    """``decode(token_ids)``, special tokens kept."""
    finish_reason: str
    """``stop`` (end of sequence or a stop string) or ``length`` (its own budget)."""
    stop_string: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def prompt_opens_think(prompt: str) -> bool:
    """Whether the rendered prompt leaves a ``<think>`` block open, so the output starts inside it.

    Thinking templates (ZAYA1's among them) often write ``<think>`` into the generation prompt
    themselves; the model then emits only the closing tag.
    """
    opened = prompt.rfind(THINK_OPEN)
    return opened >= 0 and opened > prompt.rfind(THINK_CLOSE)


def split_reasoning(text: str, opened_in_prompt: bool = False) -> tuple[str, str]:
    """``(reasoning, content)`` of a generated text.

    Reasoning is what lies inside ``<think>…</think>``: from the start of the output when the prompt
    opened the block, or from a leading ``<think>`` otherwise. A block never closed (the budget ran
    out while thinking) is all reasoning. Text without a think block is all content, untouched.
    """
    body = text
    if not opened_in_prompt:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_OPEN):
            return "", text
        body = stripped[len(THINK_OPEN) :]
    end = body.find(THINK_CLOSE)
    if end < 0:
        return body.strip(), ""
    return body[:end].strip(), body[end + len(THINK_CLOSE) :].lstrip()


def _first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    hits = [(text.find(stop), stop) for stop in stops if stop and stop in text]
    return min(hits) if hits else None


def finish_row(
    generated: Sequence[int],
    max_tokens: int,
    eos_ids: Collection[int],
    stops: Sequence[str],
    decode: Callable[[list[int]], str],
) -> FinishedRow:
    """Cut one generated sequence at its end: the first end-of-sequence token (excluded), the token
    that completes a stop string, or its own ``max_tokens``, whichever comes first.

    The returned ids always decode to the returned text. A stop string is cut at token boundaries:
    the tokens before the one that completes it are kept, so a stop string that starts inside a
    token may leave its first characters in the text.
    """
    ids = list(generated[:max_tokens])
    finish = "length"
    for position, token in enumerate(ids):
        if token in eos_ids:
            ids, finish = ids[:position], "stop"
            break
    text = decode(ids)
    hit = _first_stop(text, stops) if stops else None
    if hit is None:
        return FinishedRow(ids, text, finish)
    # Decoded prefixes grow with the number of tokens, so the first prefix that shows a stop string
    # is found by bisection; the token that completes it and everything after it go.
    low, high = 1, len(ids)
    while low < high:
        middle = (low + high) // 2
        if _first_stop(decode(ids[:middle]), stops) is None:
            low = middle + 1
        else:
            high = middle
    kept = ids[: low - 1]
    return FinishedRow(kept, decode(kept), "stop", stop_string=hit[1])


def stop_list(value: Any) -> list[str]:
    """The ``stop`` field of a request as a list (OpenAI accepts a string or a list)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(item) for item in value if item]


def plain_messages(messages: Sequence[Message]) -> list[Message]:
    """Messages whose content is a string: OpenAI's list-of-parts content joined as text.

    Most chat templates concatenate ``message['content']`` and break on a list.
    """
    result = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"]
            message = {**message, "content": "".join(parts)}
        elif content is None:
            message = {**message, "content": ""}
        result.append(message)
    return result


def chatml(messages: Sequence[Message]) -> str:
    """A ChatML rendering, for models whose tokenizer carries no chat template."""
    turns = "".join(f"<|im_start|>{m.get('role', 'user')}\n{m.get('content', '')}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"
