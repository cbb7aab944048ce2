"""CPU work on text of any size without stalling the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

INLINE_LIMIT = 8 * 1024
"""Inputs up to this size (characters, or token ids) are handled on the loop: handing work to a
thread costs more than a few milliseconds' worth of it, and most traces are this short. Past it,
the work goes to a worker thread (tokenizing 400 kB without spaces takes tiktoken about a second)."""


async def offload(func: Callable[..., T], *args: object, size: int) -> T:
    """``func(*args)``, inline when ``size`` is small, else in a worker thread."""
    if size <= INLINE_LIMIT:
        return func(*args)
    return await asyncio.to_thread(func, *args)
