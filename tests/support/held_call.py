"""An established aiortc call held through a lab while something else runs
(a flood), its RTP counted on the wire both ways, so what it lost can be told.

    with HeldCall(lab, ctl) as call:       # connected, its session known, capture on
        t0 = time.monotonic(); ...; t1 = time.monotonic()
    call.loss(t0, t1)                      # its RTP and sequence gaps in [t0, t1]

Only the held call's streams are counted: those seen on the wire before the
window opens (calls placed inside the window are not it).
"""

from __future__ import annotations

import asyncio
import threading
import time

from manager.lab.capture import WireClock, is_rtp
from manager.lab.client import client_call
from manager.lab.netns import NetnsExecutor
from tests.support.waiting import eventually


def rtp_streams(clock: WireClock, start: float, end: float) -> dict[bytes, set[int]]:
    """Each RTP stream's (by SSRC) sequence numbers seen in [start, end] (RTCP left out)."""
    seqs: dict[bytes, set[int]] = {}
    for t, d in list(clock.arrivals):
        if start <= t <= end and is_rtp(d) and len(d.payload) >= 12 and not 192 <= d.payload[1] <= 223:
            seqs.setdefault(d.payload[8:12], set()).add(int.from_bytes(d.payload[2:4], "big"))
    return seqs


def rtp_lost(clock: WireClock, start: float, end: float, only: set[bytes] | None = None) -> tuple[int, int]:
    """(packets, lost) of the RTP streams seen in [start, end] (those in `only`, if given), by sequence gaps."""
    seqs = {k: s for k, s in rtp_streams(clock, start, end).items() if only is None or k in only}
    packets = sum(len(s) for s in seqs.values())
    lost = sum(max(s) - min(s) + 1 - len(s) for s in seqs.values() if s)
    return packets, lost


class HeldCall:
    """One aiortc call from the lab's client, held until the context exits."""

    def __init__(self, lab, ctl, connect_timeout: float = 20.0) -> None:
        self.lab, self.ctl, self.timeout = lab, ctl, connect_timeout
        self.session: dict = {}
        self.report = None
        self._connected, self._release = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.to_client = WireClock(lab.client_ns, lab.client.ifname, lambda d: d.src[1] == lab.port)
        self.to_owners = [WireClock(t.ns, t.ifname, lambda d: True) for t in lab.transceivers]
        self._opened_at = 0.0

    def _run(self) -> None:
        async def hold(pc, rep) -> None:
            self._connected.set()
            await asyncio.to_thread(self._release.wait)

        with NetnsExecutor(self.lab.client_ns) as ex:
            self.report = ex.call(asyncio.run, client_call(self.lab.signaling_url, on_connected=hold, messages=0,
                                                           duration=0.2))

    def __enter__(self) -> HeldCall:
        for c in (self.to_client, *self.to_owners):
            c.__enter__()
        self._opened_at = time.monotonic()
        self._thread.start()
        if not self._connected.wait(self.timeout):
            self.__exit__()
            raise RuntimeError(f"the held call did not connect ({self.report})")
        self.session = eventually(
            lambda: next((s for s in self.ctl.sessions()["sessions"] if s["state"] == "active"), None),
            10, what="the held call active")
        # Its streams are on the wire in both directions before any window opens.
        eventually(lambda: self._streams(time.monotonic()), 10, what="the held call's RTP both ways")
        return self

    def _streams(self, before: float) -> tuple[set[bytes], set[bytes]] | None:
        up = set().union(*(rtp_streams(c, self._opened_at, before) for c in self.to_owners))
        down = set(rtp_streams(self.to_client, self._opened_at, before))
        return (up, down) if up and down else None

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._thread.join(30)
        for c in (self.to_client, *self.to_owners):
            c.__exit__()

    def loss(self, start: float, end: float) -> dict:
        """The held call's RTP in [start, end]: packets and sequence gaps, to the owner and to the client."""
        up, down = self._streams(start) or (set(), set())
        p_in, lost_in = map(sum, zip(*(rtp_lost(c, start, end, up) for c in self.to_owners), strict=True))
        p_out, lost_out = rtp_lost(self.to_client, start, end, down)
        rep = self.report
        return {"connected": rep.connected if rep else self._connected.is_set(),  # None: still held
                "error": rep.error if rep else None,
                "rtp_to_owner": p_in, "lost_to_owner": lost_in, "rtp_to_client": p_out, "lost_to_client": lost_out}
