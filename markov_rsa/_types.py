"""Data passed between the controller and backends: requests, traces, usage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]
"""One chat message in OpenAI's shape (``role``, ``content``, and whatever else the client sent)."""


@dataclass
class Usage:
    """Token counts, summed over calls."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def add(self, other: Usage) -> None:
        """Add another usage into this one, in place."""
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.total_tokens += other.total_tokens

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Usage:
        """Read an OpenAI ``usage`` object; missing fields count as zero."""
        data = data or {}
        prompt = int(data.get("prompt_tokens") or 0)
        completion = int(data.get("completion_tokens") or 0)
        total = int(data.get("total_tokens") or prompt + completion)
        return cls(prompt, completion, total)

    def to_dict(self) -> dict[str, int]:
        """OpenAI's ``usage`` shape."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass
class GenerationRequest:
    """One rollout to generate: a chat conversation and its sampling settings."""

    messages: list[Message]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Extra request fields passed through to the backend as they are (``stop``, ``min_p``, ...)."""


@dataclass
class Trace:
    """One finished rollout."""

    content: str
    reasoning: str = ""
    token_ids: list[int] | None = None
    """Completion token ids (reasoning and answer) when the backend returned them."""
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    attempts: int = 1
    latency_s: float = 0.0
    raw: dict[str, Any] | None = None
    """The backend's response message, for callers that need fields this class does not model."""

    @property
    def text(self) -> str:
        """The whole output, reasoning first, then the answer."""
        if self.reasoning and self.content:
            return f"{self.reasoning}\n\n{self.content}"
        return self.reasoning or self.content

    @property
    def finished(self) -> bool:
        """Whether the model stopped on its own rather than on the token budget."""
        return self.finish_reason == "stop"
