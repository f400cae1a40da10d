"""A set of background tasks owned by one object (a call, the slow path, a
migrator, the signaling API). In the lowest layer so the relay and the
transceiver share one copy.

The loop holds tasks weakly, so an owner must keep its fire-and-forget tasks
until they are done; a task that fails must be logged, not lost until the
garbage collector notices; and the owner's end cancels what is left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator

log = logging.getLogger(__name__)


class TaskSet:
    def __init__(self, owner: str | Callable[[], str], logger: logging.Logger | None = None) -> None:
        self._owner = owner  # names the tasks' owner in a failure's log line (a callable: read then)
        self._log = logger or log
        self._tasks: set[asyncio.Future] = set()

    def spawn(self, coro: Awaitable[object]) -> asyncio.Future:
        """Run `coro` in the running loop, kept until done."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def adopt(self, task: asyncio.Future) -> None:
        """Keep a task another owner started (it moved here, see release)."""
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def release(self, task: asyncio.Future) -> None:
        """Stop keeping `task`: it moves to another owner, which adopts it."""
        self._tasks.discard(task)
        task.remove_done_callback(self._done)

    def _done(self, task: asyncio.Future) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            name = task.get_name() if isinstance(task, asyncio.Task) else repr(task)
            owner = self._owner() if callable(self._owner) else self._owner
            self._log.error("%s: background task %s failed", owner, name, exc_info=exc)

    def cancel(self) -> None:
        """Cancel every task but the one running this (it may be the one ending the owner)."""
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()

    async def wait(self) -> None:
        """Wait for the tasks still under way (their failures are logged, not raised)."""
        current = asyncio.current_task()
        await asyncio.gather(*(t for t in self._tasks if t is not current), return_exceptions=True)

    async def close(self) -> None:
        """Cancel the tasks and wait until they are gone."""
        self.cancel()
        await self.wait()

    def __iter__(self) -> Iterator[asyncio.Future]:
        return iter(set(self._tasks))

    def __len__(self) -> int:
        return len(self._tasks)
