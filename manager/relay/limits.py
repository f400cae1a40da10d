"""Bounds on call creation from the public listener: a token bucket per source
address, and caps on calls being placed at once (per source and overall)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from manager.protocol.api import ApiError

MAX_SOURCES = 65536  # buckets kept; the least recently seen are forgotten first


@dataclass
class _Bucket:
    tokens: float
    at: float


class CreateLimits:
    """Admit or refuse a call creation (ApiError 429 or 503 with the reason);
    release() when its placement ends."""

    def __init__(self, *, rate: float, burst: int, max_pending: int, max_pending_per_source: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.max_pending = max_pending
        self.max_pending_per_source = max_pending_per_source
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._pending: dict[str, int] = {}
        self.pending = 0

    def admit(self, source: str) -> None:
        if self.pending >= self.max_pending:
            raise ApiError(503, f"too many calls are being set up ({self.max_pending}); retry shortly")
        if self._pending.get(source, 0) >= self.max_pending_per_source:
            raise ApiError(429, f"too many calls being set up from this address "
                                     f"(at most {self.max_pending_per_source} at once)")
        now = self._clock()
        b = self._buckets.pop(source, None) or _Bucket(float(self.burst), now)
        b.tokens = min(float(self.burst), b.tokens + (now - b.at) * self.rate)
        b.at = now
        self._buckets[source] = b
        while len(self._buckets) > MAX_SOURCES:
            self._buckets.popitem(last=False)
        if b.tokens < 1.0:
            raise ApiError(429, f"too many calls from this address (at most {self.rate:g} per second, "
                                     f"bursts of {self.burst})")
        b.tokens -= 1.0
        self._pending[source] = self._pending.get(source, 0) + 1
        self.pending += 1

    def release(self, source: str) -> None:
        n = self._pending.get(source, 0) - 1
        if n > 0:
            self._pending[source] = n
        else:
            self._pending.pop(source, None)
        self.pending = max(0, self.pending - 1)
