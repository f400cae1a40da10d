"""The flow sources of one family: pool addresses x flow ports."""

from __future__ import annotations

import collections
import errno

Addr = tuple[str, int]


class FlowSources:
    """The flow sources of one family: `addresses` pool addresses x the ports
    lo..hi. Never-used sources go first (spread over the addresses), then
    freed ones in the order they were freed, so a source is reused as late as
    possible (late packets of an old call find no entry rather than a new
    call). Nothing is materialised up front: a million sources cost nothing
    until used."""

    def __init__(self, addresses: int, lo: int, hi: int):
        self.addresses = addresses
        self.lo = lo
        self.size = addresses * (hi - lo + 1)
        self._next = 0                       # ids from here on were never handed out
        self._freed: collections.deque[int] = collections.deque()
        self._in_use: set[int] = set()

    def _id(self, source: tuple[int, int]) -> int:
        port, addr = source
        return (port - self.lo) * self.addresses + addr

    def take(self) -> tuple[int, int]:
        """A free (port, pool index)."""
        while True:
            if self._next < self.size:
                sid = self._next
                self._next += 1
            elif self._freed:
                sid = self._freed.popleft()
            else:
                raise OSError(errno.EADDRNOTAVAIL, f"all {self.size} flow sources are in use")
            if sid not in self._in_use:  # a reserved id, or a duplicate after reserve+free
                self._in_use.add(sid)
                return self.lo + sid // self.addresses, sid % self.addresses

    def give_back(self, source: tuple[int, int]) -> None:
        sid = self._id(source)
        if sid in self._in_use:
            self._in_use.discard(sid)
            self._freed.append(sid)

    def reserve(self, source: tuple[int, int]) -> bool:
        """Mark a source in use (a flow adopted from the kernel); False if it lies outside."""
        port, addr = source
        if not (0 <= addr < self.addresses and 0 <= port - self.lo < self.size // self.addresses):
            return False
        self._in_use.add(self._id(source))
        return True

    @property
    def in_use(self) -> int:
        return len(self._in_use)

