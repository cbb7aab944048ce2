"""Aggregation prompts: plain-text templates from ``prompts/``, filled by plain substitution.

Candidate text is full of braces (LaTeX, JSON, code), so nothing here goes through ``str.format``
and inserted text is never scanned for placeholders again.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from ._errors import ConfigError
from ._params import Task
from ._types import Message

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
FINAL_TEMPLATE = "final"


@functools.cache
def _read_packaged(name: str) -> str:
    return resources.files("markov_rsa.prompts").joinpath(f"{name}.txt").read_text(encoding="utf-8")


def load_template(name: str, prompt_dir: str | Path | None = None) -> str:
    """The template ``name`` (``math``, ``code``, ``general``, ``final``, ``candidate``).

    ``prompt_dir`` overrides the packaged templates with files ``NAME.txt`` from a directory.
    """
    if prompt_dir is not None:
        path = Path(prompt_dir) / f"{name}.txt"
        if path.is_file():
            return path.read_text(encoding="utf-8")
    try:
        return _read_packaged(name)
    except FileNotFoundError:
        raise ConfigError(f"no prompt template named {name!r}", param="prompt") from None


def fill(template: str, values: dict[str, str]) -> str:
    """Replace each ``{{name}}`` in ``template`` by ``values[name]`` in one pass."""

    def substitute(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise ConfigError(f"prompt template uses unknown placeholder {{{{{key}}}}}", param="prompt")
        return values[key]

    return _PLACEHOLDER.sub(substitute, template)


def render_candidates(tails: Sequence[str], prompt_dir: str | Path | None = None) -> str:
    """The candidate blocks, labelled 1..K."""
    block = load_template("candidate", prompt_dir)
    return "\n".join(fill(block, {"index": str(i), "tail": tail.rstrip()}) for i, tail in enumerate(tails, 1))


def problem_text(messages: Sequence[Message]) -> str:
    """The problem of a conversation: the text of its last user message."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return content_text(message.get("content"))
    raise ConfigError("the conversation has no user message to solve", param="messages")


def content_text(content: object) -> str:
    """Text of a message content, which may be a string or a list of typed parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return str(content)


def aggregation_messages(
    messages: Sequence[Message],
    tails: Sequence[str],
    task: Task,
    *,
    final: bool = False,
    prompt_dir: str | Path | None = None,
) -> list[Message]:
    """The conversation of one aggregation call.

    Earlier turns (system prompt, history) are kept as they are; the last user message becomes the
    aggregation prompt: instructions, the problem, then the candidates, so the shared prefix is as
    long as possible for backends with prefix caching.
    """
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        raise ConfigError("the conversation has no user message to solve", param="messages")
    template = load_template(FINAL_TEMPLATE if final else task.value, prompt_dir)
    prompt = fill(
        template,
        {"problem": problem_text(messages).strip(), "candidates": render_candidates(tails, prompt_dir)},
    )
    head = [dict(m) for m in messages[:last_user]]
    return [*head, {"role": "user", "content": prompt}]
