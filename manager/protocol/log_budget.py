"""Rate-limited logging for lines an attacker can trigger at will (a refused
media check per spoofed packet): a few lines per interval and kind, then a
count of those left out, so a flood costs a line per interval, not one per
packet."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable


class LogBudget:
    """`burst` lines per `interval` seconds per kind; the next line after a
    quiet stretch says how many were left out."""

    def __init__(self, logger: logging.Logger, *, burst: int = 5, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, max_kinds: int = 1024) -> None:
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self.max_kinds = max_kinds
        self._windows: dict[Hashable, list] = {}  # kind -> [window start, lines, suppressed]
        self.suppressed = 0  # lines left out in all (for tests and metrics)

    def log(self, level: int, kind: Hashable, msg: str, *args: object) -> bool:
        """Log `msg % args` unless `kind` is over its budget; True if logged."""
        now = self._clock()
        w = self._windows.get(kind)
        if w is None or now - w[0] >= self.interval:
            left_out = w[2] if w is not None else 0
            if w is None and len(self._windows) >= self.max_kinds:
                self._windows.pop(next(iter(self._windows)))
            w = self._windows[kind] = [now, 0, 0]
            if left_out:
                msg += f" ({left_out} more like it left out in the previous {self.interval:g} s)"
        if w[1] >= self.burst:
            w[2] += 1
            self.suppressed += 1
            return False
        w[1] += 1
        self.logger.log(level, msg, *args)
        return True
