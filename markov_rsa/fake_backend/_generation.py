"""Generation requests: validation, prompts, and the choices the server will answer with."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import tiktoken

from .._prompts import content_text
from ._solver import compose, encoding
from ._state import ServerState

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_ROLE_HEADER_TOKENS = 4
_SCRIPTED_REASONING = "Following the scripted answer."
# Tokens written past the budget before a capped trace stops; the cut is then certain to fall
# inside text identical to the uncapped trace.
_CAP_MARGIN_TOKENS = 64


class BadRequest(Exception):
    """A request the server refuses with an OpenAI-shaped error (400 unless said otherwise)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


def _int_field(body: dict[str, Any], name: str, minimum: int, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BadRequest(f"{name} must be an integer >= {minimum}, got {value!r}.", name)
    return value


def _number_field(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadRequest(f"{name} must be a number in [{low}, {high}], got {value!r}.", name)
    return float(value)


def _role_header(enc: tiktoken.Encoding, role: str) -> list[int]:
    # A fixed-size stand-in for a chat template's per-message tokens.
    ids = enc.encode_ordinary(f"\n{role}: ")[:_ROLE_HEADER_TOKENS]
    return ids + [198] * (_ROLE_HEADER_TOKENS - len(ids))


def chat_prompt_ids(messages: Sequence[dict[str, Any]]) -> list[int]:
    """Prompt token ids of a conversation: each message's content plus 4 header tokens."""
    enc = encoding()
    ids: list[int] = []
    for message in messages:
        ids += _role_header(enc, str(message.get("role", "")))
        ids += enc.encode_ordinary(content_text(message.get("content")))
    return ids


def validate_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``messages`` of a chat request, checked to be a non-empty list of messages with roles."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of messages.", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string 'role'.", "messages")
    return messages


def _last_user_text(messages: Sequence[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return content_text(message.get("content"))
    return content_text(messages[-1].get("content"))


# -- generation plans ------------------------------------------------------------------------------

Mode = Literal["reasoning", "reasoning_content", "inline", "none", "text"]


@dataclass
class Choice:
    """One finished choice: its token ids, their text, and where reasoning and content lie in it."""

    ids: list[int]
    text: str
    finish_reason: str
    reasoning_span: tuple[int, int]
    content_start: int | None  # None: generation stopped inside the reasoning, there is no content

    @property
    def reasoning(self) -> str:
        """The reasoning field's text."""
        return self.text[self.reasoning_span[0] : self.reasoning_span[1]]

    @property
    def content(self) -> str | None:
        """The content field's text; None when generation stopped inside the reasoning."""
        return None if self.content_start is None else self.text[self.content_start :]


def _split(text: str, mode: Mode) -> tuple[tuple[int, int], int | None]:
    """Where reasoning and content lie in a (possibly cut) raw output."""
    if mode not in ("reasoning", "reasoning_content"):
        return (0, 0), 0
    if not text.startswith(_THINK_OPEN):
        return (len(text), len(text)), None  # cut inside the opening tag
    close = text.find(_THINK_CLOSE, len(_THINK_OPEN))
    if close == -1:
        return (len(_THINK_OPEN), len(text)), None
    return (len(_THINK_OPEN), close), close + len(_THINK_CLOSE)


def _finish(raw: str, max_tokens: int, mode: Mode) -> Choice:
    enc = encoding()
    ids = enc.encode_ordinary(raw)
    finish = "stop"
    if len(ids) > max_tokens:
        ids = ids[:max_tokens]
        raw = enc.decode(ids)
        finish = "length"
    span, content_start = _split(raw, mode)
    return Choice(ids, raw, finish, span, content_start)


def _raw_output(reasoning: str, final: str, raw_mode: Mode) -> str:
    if raw_mode == "none":
        return reasoning + final
    return _THINK_OPEN + reasoning + _THINK_CLOSE + final


def _generate(state: ServerState, seed: int, prompt: str, max_tokens: int, mode: Mode, raw_mode: Mode) -> Choice:
    """A rule-solver choice for ``prompt``, cut to ``max_tokens``.

    ``raw_mode`` decides the raw output (think tags or not), ``mode`` how it splits into fields.
    """
    config = state.config
    sample = compose(seed, prompt, config, cap_tokens=max_tokens + _CAP_MARGIN_TOKENS)
    choice = _finish(_raw_output(sample.reasoning, sample.final, raw_mode), max_tokens, mode)
    if not sample.complete and choice.finish_reason != "length":
        # Token counts of separate lines overestimate the joined text slightly; rare, so redo in full.
        sample = compose(seed, prompt, config)
        choice = _finish(_raw_output(sample.reasoning, sample.final, raw_mode), max_tokens, mode)
    return choice


def _scripted(state: ServerState, index: int, max_tokens: int, mode: Mode, raw_mode: Mode) -> Choice:
    script = state.config.script or [""]
    answer = script[index % len(script)]
    raw = answer if raw_mode in ("none", "text") else _THINK_OPEN + _SCRIPTED_REASONING + _THINK_CLOSE + answer
    return _finish(raw, max_tokens, mode)


def _sample_seed(config_seed: int, request_seed: int | None, prompt_key: Any) -> bytes:
    blob = json.dumps([config_seed, request_seed, prompt_key], sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(blob.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _choice_seed(digest: bytes, index: int) -> int:
    return int.from_bytes(digest, "big") + index


@dataclass
class Job:
    """Everything needed to answer one generation request."""

    kind: Literal["chat", "text"]
    id: str
    created: int
    model: str
    choices: list[Choice]
    prompt_ids: list[int]
    prompt_tokens: int
    stream: bool
    include_usage: bool
    return_ids: bool
    mode: Mode

    @property
    def completion_tokens(self) -> int:
        """Tokens generated over all choices."""
        return sum(len(c.ids) for c in self.choices)

    def usage(self) -> dict[str, int]:
        """OpenAI's usage object; the prompt counts once however many choices there are."""
        completion = self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }


def _request_basics(
    state: ServerState, body: dict[str, Any], prompt_tokens: int, default_max: int | None
) -> dict[str, Any]:
    config = state.config
    for name in ("max_tokens", "max_completion_tokens"):
        _int_field(body, name, 1, None)
    max_tokens = _int_field(body, "max_completion_tokens", 1, None)
    if max_tokens is None:
        max_tokens = _int_field(body, "max_tokens", 1, None)
    room = config.max_model_len - prompt_tokens
    if max_tokens is None:
        max_tokens = default_max if default_max is not None else room
    if max_tokens > room or room < 1:
        raise BadRequest(
            f"This model's maximum context length is {config.max_model_len} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion.",
            "max_tokens",
        )
    n = _int_field(body, "n", 1, 1)
    assert n is not None
    if n > 128:
        raise BadRequest("n must be at most 128.", "n")
    temperature = _number_field(body, "temperature", 0.0, 100.0)
    _number_field(body, "top_p", 1e-9, 1.0)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"seed must be an integer, got {seed!r}.", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise BadRequest("stream must be a boolean.", "stream")
    options = body.get("stream_options") or {}
    include_usage = bool(stream) and isinstance(options, dict) and bool(options.get("include_usage"))
    return {
        "max_tokens": max_tokens,
        "n": n,
        # Greedy decoding does not depend on the sampling seed.
        "seed": None if temperature == 0 else seed,
        "stream": bool(stream),
        "include_usage": include_usage,
        "return_ids": bool(body.get("return_token_ids")) and config.support_token_ids,
    }


def build_job(
    state: ServerState,
    kind: Literal["chat", "text"],
    prompts: list[tuple[str, Any, list[int]]],
    body: dict[str, Any],
    default_max: int | None,
) -> Job:
    """``prompts``: (solver text, what identifies the prompt for seeding, prompt ids) per prompt."""
    config = state.config
    prompt_ids = [t for _, _, ids in prompts for t in ids]
    basics = _request_basics(state, body, max(len(ids) for _, _, ids in prompts), default_max)
    # Plain completions carry the raw output, think tags included, as vLLM's /v1/completions does.
    mode: Mode = "text" if kind == "text" else config.reasoning_field
    raw_mode: Mode = "none" if config.reasoning_field == "none" else mode
    choices: list[Choice] = []
    digests = []
    for text, key, _ in prompts:
        digest = _sample_seed(config.seed, basics["seed"], key)
        digests.append(digest)
        for i in range(basics["n"]):
            if config.script is not None:
                choice = _scripted(state, state.script_cursor, basics["max_tokens"], mode, raw_mode)
                state.script_cursor += 1
            else:
                seed = _choice_seed(digest, i)
                choice = _generate(state, seed, text, basics["max_tokens"], mode, raw_mode)
            choices.append(choice)
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    return Job(
        kind=kind,
        id=prefix + hashlib.blake2b(b"".join(digests), digest_size=12).hexdigest(),
        created=state.created,
        model=config.model,
        choices=choices,
        prompt_ids=prompt_ids,
        prompt_tokens=len(prompt_ids),
        stream=basics["stream"],
        include_usage=basics["include_usage"],
        return_ids=basics["return_ids"],
        mode=mode,
    )


def chat_prompts(body: dict[str, Any]) -> list[tuple[str, Any, list[int]]]:
    """The prompt of a chat request: (text to solve, seeding key, prompt token ids)."""
    messages = validate_messages(body)
    return [(_last_user_text(messages), messages, chat_prompt_ids(messages))]


def text_prompts(body: dict[str, Any]) -> list[tuple[str, Any, list[int]]]:
    """The prompts of a completions request (a string, strings, or token ids), as for chat_prompts."""
    prompt = body.get("prompt")
    enc = encoding()
    if isinstance(prompt, str):
        return [(prompt, prompt, enc.encode_ordinary(prompt))]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        try:
            text = enc.decode(prompt)
        except (KeyError, ValueError, OverflowError):
            raise BadRequest("prompt contains token ids outside the vocabulary.", "prompt") from None
        return [(text, prompt, list(prompt))]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [(p, p, enc.encode_ordinary(p)) for p in prompt]
    raise BadRequest("prompt must be a string, a list of strings, or a list of token ids.", "prompt")
