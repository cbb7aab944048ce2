"""Aggregation prompts: plain-text templates from ``prompts/``, filled by plain substitution.

Candidate text is full of braces (LaTeX, JSON, code), so nothing here goes through ``str.format``
and inserted text is never scanned for placeholders again.

Candidates cannot forge the prompt's structure: a line of a candidate that equals a line the
template itself writes into the prompt (a ``=== Candidate i ===`` header for any ``i``, a section
title such as ``Problem:``, an instruction line) is prefixed with :data:`QUOTE_PREFIX`. The change
is visible to the model, and reported (:class:`Neutralised`) so a run log can record it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ._errors import ConfigError
from ._params import Task
from ._types import Message

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
FINAL_TEMPLATE = "final"
SUMMARY_TEMPLATE = "summary"
SUMMARY_INSTRUCTIONS = "summary_instructions"
TEMPLATE_NAMES = ("math", "code", "general", FINAL_TEMPLATE, "candidate", SUMMARY_TEMPLATE, SUMMARY_INSTRUCTIONS)
"""Every packaged template."""
CANDIDATE_KINDS = {"tail": "reasoning tail", "answer": "final answer", "summary": "summary"}
"""How a candidate's header names what it shows, by the kind of text its trace carried."""
QUOTE_PREFIX = "> "
"""Put before a candidate's line that would read as a line of the prompt's own structure."""


@dataclass(frozen=True)
class Neutralised:
    """A candidate line that was quoted because it equals a line of the prompt's template."""

    candidate: int
    """The candidate's label (1..K)."""
    line: int
    """The line number inside the candidate's text (1-based)."""
    text: str
    """The line as the candidate wrote it; the prompt carries ``QUOTE_PREFIX + text``."""

    def to_dict(self) -> dict[str, int | str]:
        """A JSON-ready dict."""
        return {"candidate": self.candidate, "line": self.line, "text": self.text}


@functools.cache
def _read_packaged(name: str) -> str:
    return resources.files("markov_rsa.prompts").joinpath(f"{name}.txt").read_text(encoding="utf-8")


def load_template(name: str, prompt_dir: str | Path | None = None) -> str:
    """The template ``name`` (one of :data:`TEMPLATE_NAMES`).

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


def _structure_line(line: str) -> re.Pattern[str] | None:
    """A pattern matching the lines a template line can become, or None for a line that only places
    inserted text (``{{tail}}``, ``{{problem}}``) or is blank. ``{{index}}`` stands for any label."""
    stripped = line.strip()
    if not _PLACEHOLDER.sub("", stripped).strip():
        return None
    parts = []
    pos = 0
    for match in _PLACEHOLDER.finditer(stripped):
        parts.append(re.escape(stripped[pos : match.start()]))
        parts.append(r"\d+" if match.group(1) == "index" else ".*")
        pos = match.end()
    parts.append(re.escape(stripped[pos:]))
    return re.compile("".join(parts))


@functools.cache
def _structure(*templates: str) -> tuple[re.Pattern[str], ...]:
    return tuple(
        pattern for template in templates for line in template.splitlines() if (pattern := _structure_line(line))
    )


@functools.cache
def _screen(structure: tuple[re.Pattern[str], ...]) -> re.Pattern[str] | None:
    """One pattern that finds, anywhere in a text, a line that some structure line matches once stripped."""
    if not structure:
        return None
    alternatives = "|".join(f"(?:{pattern.pattern})" for pattern in structure)
    return re.compile(rf"^[^\S\n]*(?:{alternatives})[^\S\n]*$", re.MULTILINE)


def neutralise(text: str, structure: Sequence[re.Pattern[str]], candidate: int) -> tuple[str, list[Neutralised]]:
    """``text`` with each line that reads as a structure line quoted, and what was quoted."""
    screen = _screen(tuple(structure))
    if screen is None or screen.search(text) is None:
        return text, []  # the usual case, found in one scan of the text instead of one per line and pattern
    lines = text.split("\n")
    found = []
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped and any(pattern.fullmatch(stripped) for pattern in structure):
            found.append(Neutralised(candidate, number, line))
            lines[number - 1] = QUOTE_PREFIX + line
    return ("\n".join(lines), found) if found else (text, found)


def render_candidates(
    tails: Sequence[str],
    prompt_dir: str | Path | None = None,
    structure: Sequence[re.Pattern[str]] = (),
    kinds: Sequence[str] | None = None,
) -> tuple[str, list[Neutralised]]:
    """The candidate blocks, labelled 1..K, with lines matching ``structure`` quoted.

    ``kinds`` (``tail``, ``answer``, ``summary`` per candidate) adds what each candidate shows to
    its header (``=== Candidate 2 (final answer) ===``); without it headers carry no label.
    """
    block = load_template("candidate", prompt_dir)
    blocks = []
    quoted: list[Neutralised] = []
    for i, tail in enumerate(tails, 1):
        safe, found = neutralise(tail.rstrip(), structure, i)
        quoted.extend(found)
        kind = kinds[i - 1] if kinds is not None and i <= len(kinds) else None
        label = f" ({CANDIDATE_KINDS.get(kind, kind)})" if kind else ""
        blocks.append(fill(block, {"index": str(i), "kind": label, "tail": safe}))
    return "\n".join(blocks), quoted


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
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        )
    return str(content)


def aggregation_prompt(
    messages: Sequence[Message],
    tails: Sequence[str],
    task: Task,
    *,
    final: bool = False,
    prompt_dir: str | Path | None = None,
    kinds: Sequence[str] | None = None,
) -> tuple[list[Message], list[Neutralised]]:
    """The conversation of one aggregation call, and the candidate lines that had to be quoted.

    Earlier turns (system prompt, history) are kept as they are; the last user message becomes the
    aggregation prompt: instructions, the problem, then the candidates, so the shared prefix is as
    long as possible for backends with prefix caching. ``kinds`` labels each candidate with what
    it shows (see :func:`render_candidates`).
    """
    template = load_template(FINAL_TEMPLATE if final else task.value, prompt_dir)
    structure = _structure(template, load_template("candidate", prompt_dir))
    candidates, quoted = render_candidates(tails, prompt_dir, structure, kinds)
    prompt = fill(template, {"problem": problem_text(messages).strip(), "candidates": candidates})
    return _replace_last_user(messages, prompt), quoted


def _replace_last_user(messages: Sequence[Message], prompt: str) -> list[Message]:
    """The conversation with its earlier turns as they are and ``prompt`` as its last user turn."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        raise ConfigError("the conversation has no user message to solve", param="messages")
    head = [dict(m) for m in messages[:last_user]]
    return [*head, {"role": "user", "content": prompt}]


def summary_messages(
    messages: Sequence[Message],
    trace_text: str,
    instructions: str | None = None,
    prompt_dir: str | Path | None = None,
) -> list[Message]:
    """The conversation of one summary call (``compaction: summary``): the ``summary`` template
    with ``instructions`` (default: the ``summary_instructions`` template), the problem and the
    trace. The trace's lines that read as the template's own structure are quoted."""
    template = load_template(SUMMARY_TEMPLATE, prompt_dir)
    text = load_template(SUMMARY_INSTRUCTIONS, prompt_dir).strip() if instructions is None else instructions
    safe, _ = neutralise(trace_text.strip(), _structure(template), 1)
    prompt = fill(template, {"instructions": text, "problem": problem_text(messages).strip(), "response": safe})
    return _replace_last_user(messages, prompt)


def aggregation_messages(
    messages: Sequence[Message],
    tails: Sequence[str],
    task: Task,
    *,
    final: bool = False,
    prompt_dir: str | Path | None = None,
    kinds: Sequence[str] | None = None,
) -> list[Message]:
    """The conversation of one aggregation call (see :func:`aggregation_prompt`)."""
    return aggregation_prompt(messages, tails, task, final=final, prompt_dir=prompt_dir, kinds=kinds)[0]
