"""The RTCP a media-engine call sends: a compound SR + SDES at RFC 3550's
interval, and SR + SDES + BYE when the call ends here.

Each report is one compound packet (RFC 3550 6.1): a sender report with our
sender info (NTP time now, the RTP timestamp of that instant on our stream's
clock, packets and payload octets sent on our SSRC) and one report block
about the client's stream (rtcp_stats.CallQuality.reception_block: loss,
highest sequence, jitter, LSR/DLSR of the client's last SR), then an SDES
with our CNAME. The client's receiver reports cite the SR, and
:class:`~.rtcp_stats.CallQuality` turns their LSR/DLSR into the call's RTT.
When the call ends here (hung up, ended by the relay, a drain's deadline)
the last compound adds a BYE (RFC 3550 6.6); a call that moves to another
owner sends none: its SSRC goes on there.

When: RFC 3550 6.2 and 6.3 with the 5 s minimum for a two-party call (the
bandwidth share of one Opus stream always gives less): the first report after
half of it, each interval drawn from 0.5-1.5 times it and divided by
``e - 3/2`` (the compensation of 6.3.1). Nothing here has a timer: the media
engine's clock asks :meth:`RtcpSender.due` at each tick.

SRTCP index: libsrtp numbers a stream's SRTCP packets from 1 and the
client's replay window refuses an index it has seen. A call that continues
another owner's SSRC (a migration, or aiortc's hand-over) starts its fresh
session past the indices that owner used (:func:`skip_srtcp_indices`).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable

import pylibsrtp

from manager.protocol import rtcp

from .rtcp_stats import CallQuality

#: RFC 3550 6.2: the minimum interval between a participant's reports (s).
T_MIN = 5.0
#: RFC 3550 6.3.1: the randomised interval is divided by this, so the mean
#: interval is T_MIN again once timer reconsideration's bias is accounted for.
COMPENSATION = math.e - 1.5
#: RFC 3550 6.5.1 allows 255 bytes; ours are 24 (cname_for), an imported one is cut here.
MAX_CNAME = 64


def cname_for(keying_material: bytes, ssrc: int) -> str:
    """A CNAME that stays the same for the call on every owner (it is derived
    from the call's DTLS-SRTP keying material, which moves with it) and says
    nothing about it (a one-way hash)."""
    digest = hashlib.sha256(b"splitrelay cname" + keying_material + ssrc.to_bytes(4, "big")).hexdigest()
    return digest[:24]


def skip_srtcp_indices(session: pylibsrtp.Session, ssrc: int, used: int) -> None:
    """Move `session`'s outbound SRTCP index for `ssrc` past the `used` ones
    another owner sent: libsrtp has no call to set it, so `used` throw-away
    packets are protected (a few µs each: an hour of aiortc's RTCP, ~7000
    indices, takes a few ms)."""
    empty_rr = rtcp.Report(ssrc=ssrc).pack()
    for _ in range(used):
        session.protect_rtcp(empty_rr)


class RtcpSender:
    """When a call sends its reports, and what they say (see the module docstring)."""

    def __init__(self, ssrc: int, cname: str, quality: CallQuality, *, sent_before: int = 0,
                 rng: Callable[[], float] = random.random) -> None:
        self.ssrc, self.cname, self.quality = ssrc, cname[:MAX_CNAME], quality
        self._rng = rng
        self.next_at: float | None = None  # monotonic
        self.sent_before = sent_before  # SRTCP indices the call's previous owners used
        self.sent = 0

    @property
    def srtcp_used(self) -> int:
        """SRTCP packets sent on our SSRC by every owner so far (what an export carries)."""
        return self.sent_before + self.sent

    def interval(self, initial: bool = False) -> float:
        base = T_MIN / 2 if initial else T_MIN
        return base * (0.5 + self._rng()) / COMPENSATION

    def due(self, now: float) -> bool:
        """Whether a report is due at monotonic time `now` (the first call schedules the first one)."""
        if self.next_at is None:
            self.next_at = now + self.interval(initial=True)
            return False
        return now >= self.next_at

    def report(self, now: float, *, rtp_timestamp: Callable[[float], int], packets: int, octets: int) -> bytes:
        """The compound to send at monotonic `now` (plain: the caller protects
        it); `rtp_timestamp(now)` is our stream's RTP clock at that instant."""
        self.next_at = now + self.interval()
        return self._compound(now, rtp_timestamp, packets, octets, [])

    def bye(self, now: float, *, rtp_timestamp: Callable[[float], int], packets: int, octets: int,
            reason: str | None = None) -> bytes:
        """The call's last compound (RFC 3550 6.6): the report, then a BYE for
        our SSRC, so the client's stats end here rather than time out."""
        return self._compound(now, rtp_timestamp, packets, octets, [rtcp.Bye((self.ssrc,), reason)])

    def _compound(self, now: float, rtp_timestamp: Callable[[float], int], packets: int, octets: int,
                  tail: list[rtcp.Bye]) -> bytes:
        self.sent += 1
        ntp = rtcp.ntp_timestamp(self.quality.clock())
        block = self.quality.reception_block()
        sr = rtcp.Report(ssrc=self.ssrc, blocks=() if block is None else (block,),
                         sender=rtcp.SenderInfo(ntp=ntp, rtp_timestamp=rtp_timestamp(now) & 0xFFFFFFFF,
                                                packets=packets & 0xFFFFFFFF, octets=octets & 0xFFFFFFFF))
        return rtcp.serialize([sr, rtcp.Sdes(((self.ssrc, self.cname),)), *tail])
