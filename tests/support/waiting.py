"""Wait for a condition, never for a time.

``eventually`` polls a predicate until it holds or a deadline passes, then
fails with what was awaited and the last value seen. Tests use it wherever
they would otherwise sleep "long enough" before asserting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

POLL_S = 0.02


class NotYet(AssertionError):
    """The awaited condition did not hold before the deadline."""


class Hopeless(RuntimeError):
    """Raised by a predicate when its condition can no longer hold (the
    process it waits for exited): the wait ends at once with it."""


def eventually(predicate: Callable[[], T], timeout: float = 5.0, what: str = "condition",
               interval: float = POLL_S) -> T:
    """Poll ``predicate`` until it returns a truthy value; return that value.

    An exception raised by the predicate counts as "not yet" and is shown if
    the deadline passes, except Hopeless, which ends the wait at once."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except Hopeless:
            raise
        except Exception as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise NotYet(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")
        time.sleep(interval)  # pacing the poll


async def eventually_async(predicate: Callable[[], T | Awaitable[T]], timeout: float = 5.0,
                           what: str = "condition", interval: float = POLL_S) -> T:
    """``eventually`` for a running event loop; the predicate may be a coroutine function."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
            if asyncio.iscoroutine(last):
                last = await last
        except Hopeless:
            raise
        except Exception as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise NotYet(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)  # pacing the poll
