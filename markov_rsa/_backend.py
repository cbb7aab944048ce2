"""The Backend protocol: everything above it is backend-agnostic."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from ._errors import BackendError
from ._tokenizers import Tokenizer
from ._types import GenerationRequest, Trace

Outcome = Trace | BackendError
"""What one rollout ends in: a trace, or the error it failed with after retries."""


@runtime_checkable
class Backend(Protocol):
    """Generates rollouts. The HTTP backend and the local engine implement it.

    A backend may also offer ``async def context_length() -> int | None``, the model's context
    length in tokens; the controller then fits every call into it.
    """

    name: str
    """A short description of where rollouts run (a URL, a model path)."""

    def generate(self, requests: Sequence[GenerationRequest]) -> AsyncIterator[tuple[int, Outcome]]:
        """Run every request; yield ``(index, outcome)`` as each one finishes, in completion order.

        A backend may batch the requests. Closing the iterator early cancels what is still running.
        Failures are yielded, not raised, so that one bad rollout does not sink the batch.
        """
        ...

    async def get_tokenizer(self) -> Tokenizer:
        """The best tokenizer this backend can offer for counting tails."""
        ...

    async def aclose(self) -> None:
        """Release connections, threads or model memory."""
        ...
