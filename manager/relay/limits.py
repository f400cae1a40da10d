"""Bounds on call creation from the public listener: a token bucket per
source (manager.protocol.sources.SourceKey: an IPv4 address, an IPv6 /64),
and caps on calls being placed at once (per source and overall)."""

from __future__ import annotations

import time
from collections.abc import Callable

from manager.protocol.api import ApiError
from manager.protocol.sources import SourceKey, Tally, TokenBuckets

MAX_SOURCES = 65536  # buckets kept; the least recently seen are forgotten first


class CreateLimits:
    """Admit or refuse a call creation (ApiError 429 or 503 with the reason);
    release() when its placement ends. Both take the client's address."""

    def __init__(self, *, rate: float, burst: int, max_pending: int, max_pending_per_source: int,
                 source_key: SourceKey | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.max_pending = max_pending
        self.max_pending_per_source = max_pending_per_source
        self.source_key = source_key or SourceKey()
        self._clock = clock
        self._buckets = TokenBuckets(rate, burst, max_keys=MAX_SOURCES)
        self._pending = Tally()
        self.pending = 0

    def retune(self, *, rate: float, burst: int, max_pending: int, max_pending_per_source: int) -> None:
        """New bounds (a reload); the sources' buckets keep their tokens."""
        self.rate, self.burst = rate, burst
        self.max_pending, self.max_pending_per_source = max_pending, max_pending_per_source
        self._buckets.rate, self._buckets.burst = rate, float(burst)

    def admit(self, addr: str) -> None:
        source = self.source_key(addr)
        if self.pending >= self.max_pending:
            raise ApiError(503, f"too many calls are being set up ({self.max_pending}); retry shortly")
        if self._pending[source] >= self.max_pending_per_source:
            raise ApiError(429, f"too many calls being set up from this address "
                                     f"(at most {self.max_pending_per_source} at once)")
        if not self._buckets.take(source, self._clock()):
            raise ApiError(429, f"too many calls from this address (at most {self.rate:g} per second, "
                                     f"bursts of {self.burst})")
        self._pending.add(source)
        self.pending += 1

    def release(self, addr: str) -> None:
        self._pending.remove(self.source_key(addr))
        self.pending = max(0, self.pending - 1)
