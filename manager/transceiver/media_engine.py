"""The media engine: one per transceiver, one 20 ms clock for all its calls.

Every established call the engine carries (an imported call: migrated in
from another transceiver, or handed over by this one's aiortc right after
its handshake, transceiver.py) has a :class:`~.call_media.CallMedia`. Each
tick plays one frame of every call out of its jitter buffer to its agent,
lets the agents run, then sends one frame of every agent's audio: no task,
timer or thread per call, per frame. See docs/media-engine.md.

Between ticks, a frame a call delivers on arrival (call_media) is answered
without waiting for the tick: the engine collects the calls that delivered
one and, once their agents have run, sends each agent's frame if it has one
(:meth:`CallMedia.answer`). That is two loop callbacks per event-loop pass
that delivered any frame, whatever the number of calls: the first runs in
the pass after the deliveries, among the agents they woke, and schedules
the second, which therefore runs after all of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from manager.protocol.tasks import TaskSet

from .call_media import PACKET_TIME, CallMedia
from .opus import DEFAULT_COMPLEXITY

logger = logging.getLogger(__name__)

#: A clock this far behind (the process was starved) skips ahead instead of
#: bursting the missed frames out at once.
MAX_BEHIND = 0.1


class MediaEngine:
    """The transceiver's media clock (see the module docstring).

    :param complexity: Opus encoder complexity (0-10) of the calls' encoders.
    :param handover: hand every call placed here to the engine after its
        handshake; False keeps placed calls on aiortc (the baseline).
    """

    def __init__(self, *, complexity: int = DEFAULT_COMPLEXITY, handover: bool = True) -> None:
        if not 0 <= complexity <= 10:
            raise ValueError("Opus complexity must be in 0..10")
        self.complexity = complexity
        self.handover = handover
        self._calls: dict[int, CallMedia] = {}
        self._clock = TaskSet("media engine")
        self._task: asyncio.Future | None = None
        self._fresh: list[CallMedia] = []  # delivered a frame on arrival since the collection was armed
        self._armed = False
        self.ticks = 0
        self.late_ticks = 0  # the clock fell MAX_BEHIND behind and skipped ahead
        self.tick_errors = 0
        self.busy_s = 0.0  # time spent in ticks and answer passes
        self.answer_passes = 0
        self.max_tick_s = 0.0

    def add(self, conn_id: int, media: CallMedia) -> None:
        self._calls[conn_id] = media
        media.answer_soon = self._answer_soon
        if self._task is None or self._task.done():
            self._task = self._clock.spawn(self._run())

    def remove(self, conn_id: int, media: CallMedia) -> None:
        if self._calls.get(conn_id) is media:
            del self._calls[conn_id]
        media.answer_soon = None

    async def stop(self) -> None:
        await self._clock.close()
        self._task = None

    async def _run(self) -> None:
        next_at = time.monotonic()
        while self._calls:
            next_at += PACKET_TIME
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing: this is the playout clock
            elif delay < -MAX_BEHIND:
                next_at = time.monotonic()
                self.late_ticks += 1
            else:
                await asyncio.sleep(0)  # behind: still let the sockets and agents run
            started = time.monotonic()
            calls = list(self._calls.items())
            self._each(calls, CallMedia.play)
            # The agents run before the frames go out: an agent that answers
            # a frame at once (an echo, a cached prompt) is heard this tick,
            # not the next (20 ms less latency).
            await asyncio.sleep(0)
            self._each([(c, m) for c, m in calls if self._calls.get(c) is m], CallMedia.send)
            spent = time.monotonic() - started
            self.busy_s += spent
            self.max_tick_s = max(self.max_tick_s, spent)
            self.ticks += 1

    # -- answers between ticks ---------------------------------------------------------

    def _answer_soon(self, media: CallMedia) -> None:
        self._fresh.append(media)
        if not self._armed:
            self._armed = True
            asyncio.get_running_loop().call_soon(self._collect)

    def _collect(self) -> None:
        # Every agent woken by the deliveries in `batch` was scheduled before
        # this callback ran, so the one scheduled now runs after them all.
        batch, self._fresh, self._armed = self._fresh, [], False
        asyncio.get_running_loop().call_soon(self._answer, batch)

    def _answer(self, batch: list[CallMedia]) -> None:
        started = time.monotonic()
        self._each([(m.plan.conn_id, m) for m in batch if m.answer_soon is not None], CallMedia.answer)
        self.busy_s += time.monotonic() - started
        self.answer_passes += 1

    def _each(self, calls: list[tuple[int, CallMedia]], step) -> None:
        for conn_id, media in calls:
            try:
                step(media)
            except Exception:
                self.tick_errors += 1
                logger.exception("media engine: call %d", conn_id)

    def info(self) -> dict[str, Any]:
        return {"handover": self.handover, "complexity": self.complexity, "calls": len(self._calls),
                "ticks": self.ticks, "answer_passes": self.answer_passes, "late_ticks": self.late_ticks,
                "tick_errors": self.tick_errors,
                "busy_s": round(self.busy_s, 3), "max_tick_ms": round(self.max_tick_s * 1000, 2)}
