"""The transceiver process's runtime: its event loop and its garbage collector.

The media engine runs every call's per-packet work as event-loop callbacks
(socket reads, the answer pass, the agents' tasks), so the loop's own cost
per callback is part of every frame: uvloop (libuv, in C) runs the same
callbacks for less than asyncio's pure-Python loop (docs/media-engine.md,
"Profile"). aiortc, aioice and aiohttp run on it unchanged.

The collector: each frame allocates a few short-lived objects (an audio
frame, futures, tuples), which trips CPython's youngest-generation collection
every 700 net allocations, and a full collection walks every object the
process holds, a pause of tens of milliseconds with many calls, which is
exactly the tail the added latency's p99 sees. So, once the transceiver has
started, everything alive (modules, aiortc's tables) is moved out of the
collector's sight (``gc.freeze``), so a full collection walks only what the
calls hold, and the young generation is collected ten times less often
(the older ones keep their ratios to it).
Reference counting frees almost all of the per-frame objects anyway; the
collector is only for cycles. :class:`GcPauses` measures what is left.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: gc.set_threshold after start (CPython's defaults: 700, 10, 10).
GC_THRESHOLDS = (7000, 10, 10)

try:
    import uvloop
except ImportError:  # not installed (a minimal environment): asyncio's own loop
    uvloop = None


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """Run `main` to completion on a new event loop (uvloop where installed),
    as :func:`asyncio.run` does."""
    if use_uvloop and uvloop is not None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)


def loop_name() -> str:
    """The running loop's kind ("uvloop" or "asyncio"), for health."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


class GcPauses:
    """Collections since :meth:`install`, their longest pause and their total time."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.max_pause_ms = 0.0
        self.total_ms = 0.0
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = (time.perf_counter() - self._started) * 1000
        self.collections[info["generation"]] += 1
        self.total_ms += pause
        self.max_pause_ms = max(self.max_pause_ms, pause)

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def info(self) -> dict[str, Any]:
        return {"collections": list(self.collections), "max_pause_ms": round(self.max_pause_ms, 2),
                "total_ms": round(self.total_ms, 1)}


#: This process's collections since :func:`tune_gc` (health's ``runtime``).
PAUSES = GcPauses()


def tune_gc(thresholds: tuple[int, int, int] = GC_THRESHOLDS) -> None:
    """Freeze what is alive now (call once, after start-up), raise the
    thresholds and start measuring the pauses.

    Only live objects are frozen (a full collection runs first); a frozen
    object freed later by reference counting is freed as usual."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)
    PAUSES.install()


def info() -> dict[str, Any]:
    """The running loop's kind and the collector's figures."""
    return {"loop": loop_name(), "gc_thresholds": list(gc.get_threshold()), "gc_frozen": gc.get_freeze_count(),
            "gc": PAUSES.info()}
