"""Media accounting of an ICE-TCP leg, as the XDP program keeps it for a UDP
flow (struct rtp_stats in bpf/structs.h, kernel/media.py): the bridge
carries every packet of such a leg through userspace, so it counts them.

Per direction: packets and bytes (every packet after the leg's install:
STUN, DTLS, RTP, RTCP; the bytes are the packets', without the RFC 4571
framing), and for the RTP stream of the first SSRC seen, the extended
highest sequence, packets received, reordering and the RFC 3550 (A.8)
interarrival jitter against a 48 kHz media clock, held as 16 J in ticks as
the kernel holds it. RTCP (payload type byte 192-223) and other SSRCs are
left out, as in the kernel.

On TCP the client ⇄ relay hop retransmits: its loss is 0 by construction,
and what the count shows as lost was lost before the client's stack (or is
a sender's gap).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from manager.protocol.rfc7983 import PacketClass, classify

RTP_HEADER = 12
TICKS_PER_S = 48000  # Opus's RTP clock: the kernel's arrival ticks
U32 = 0xFFFFFFFF
RTCP_TYPES = range(192, 224)  # the second byte of RTCP (RFC 5761 §4)


def _s32(v: int) -> int:
    v &= U32
    return v - (1 << 32) if v & 0x80000000 else v


def _s16(v: int) -> int:
    v &= 0xFFFF
    return v - (1 << 16) if v & 0x8000 else v


@dataclass
class RtpCount:
    """One direction's counts (see the module docstring)."""

    packets: int = 0
    bytes: int = 0
    ssrc: int = 0  # host order; 0: no RTP yet
    base_seq: int = 0
    max_seq: int = 0  # extended: wraps << 16 | seq
    received: int = 0
    reordered: int = 0
    jitter: int = 0  # 16 J, in 48 kHz ticks
    transit: int = 0  # last arrival - RTP timestamp, in ticks (mod 2^32)

    def count(self, data: bytes, now: float) -> None:
        """One packet forwarded at `now` (seconds, any monotonic origin)."""
        self.packets += 1
        self.bytes += len(data)
        if len(data) < RTP_HEADER or classify(data) is not PacketClass.RTP or data[1] in RTCP_TYPES:
            return
        ssrc = int.from_bytes(data[8:12], "big")
        seq = int.from_bytes(data[2:4], "big")
        transit = (int(now * TICKS_PER_S) - int.from_bytes(data[4:8], "big")) & U32
        if ssrc != self.ssrc:
            if self.ssrc:
                return
            self.ssrc, self.base_seq, self.max_seq, self.received, self.transit = ssrc, seq, seq, 1, transit
            return
        ahead = _s16(seq - self.max_seq)
        if ahead > 0:
            self.max_seq = (self.max_seq + ahead) & U32  # carries into the wrap count
        elif ahead < 0:
            self.reordered += 1
        self.received += 1
        d = abs(_s32(transit - self.transit))
        self.transit = transit
        self.jitter = (self.jitter + d - ((self.jitter + 8) >> 4)) & U32

    @property
    def highest_seq(self) -> int:
        return self.max_seq

    @property
    def expected(self) -> int:
        return ((self.max_seq - self.base_seq) & U32) + 1 if self.ssrc else 0

    @property
    def lost(self) -> int:
        return self.expected - self.received if self.ssrc else 0

    @property
    def jitter_ms(self) -> float:
        return round(self.jitter / 16 / (TICKS_PER_S / 1000), 3)


@dataclass
class StreamMedia:
    """Both directions of one ICE-TCP leg: up is client → owner, down owner →
    client (read as a UDP flow's kernel/media.py FlowMedia is: record_build.pack_counts)."""

    up: RtpCount = field(default_factory=RtpCount)
    down: RtpCount = field(default_factory=RtpCount)
