"""Per-flow media figures the XDP program keeps (struct rtp_stats in each
flow's entries), read for call records and `relayctl`: packets and bytes
both ways, and per direction the highest RTP sequence, packets expected and
received, reordering and the RFC 3550 jitter estimate.

Up is client → owner (the flows entry: loss between the client and the
relay), down is owner → client (the return entries: loss between the
transceiver and the relay).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from manager.relay.kernel.structs import ReverseKey, RtpStats, flow_key

# The program measures arrival in ticks of a 48 kHz clock (Opus's RTP clock).
TICKS_PER_MS = 48


@dataclass(frozen=True)
class DirectionMedia:
    packets: int       # every packet forwarded in XDP (STUN, DTLS, RTP, RTCP)
    bytes: int
    ssrc: int          # the RTP stream counted (host order); 0: none yet
    highest_seq: int   # extended: wraps × 65536 + sequence
    expected: int
    received: int
    lost: int          # expected - received (negative: duplicates)
    reordered: int
    jitter_ms: float   # RFC 3550 interarrival jitter, in ms

    def as_dict(self) -> dict:
        return asdict(self)


def direction_media(packets: int, nbytes: int, s: RtpStats) -> DirectionMedia:
    if not s.ssrc:
        return DirectionMedia(packets, nbytes, 0, 0, 0, 0, 0, 0, 0.0)
    expected = (s.max_seq - s.base_seq) % (1 << 32) + 1
    return DirectionMedia(packets=packets, bytes=nbytes, ssrc=int.from_bytes(s.ssrc.to_bytes(4, "little"), "big"),
                          highest_seq=s.max_seq, expected=expected, received=s.received,
                          lost=expected - s.received, reordered=s.reordered,
                          jitter_ms=round(s.jitter / 16 / TICKS_PER_MS, 3))


@dataclass(frozen=True)
class FlowMedia:
    up: DirectionMedia     # client → owner
    down: DirectionMedia   # owner → client (the return entry with the most RTP, counts summed)

    def as_dict(self) -> dict:
        return {"up": self.up.as_dict(), "down": self.down.as_dict()}


class MediaReader:
    """Reading a flow's media figures (a Datapath mixin: it holds the maps
    and the index of return entries by client tuple)."""

    def flow_media(self, client: tuple[str, int], vip: tuple[str, int]) -> FlowMedia | None:
        """The kernel's figures of one flow, both ways; None without such a flow."""
        m = self._m()
        key = flow_key(client, vip)
        info = m.flows.lookup(key)
        if info is None:
            return None
        with self._rev_lock:
            rkeys = list(self._rev_index.get(bytes(key), ()))
        rev = [r for r in (m.reverse.lookup(ReverseKey.from_buffer_copy(rk)) for rk in rkeys) if r is not None]
        best = max(rev, key=lambda r: r.rtp.received, default=None)
        down = direction_media(sum(r.packets for r in rev), sum(r.bytes for r in rev),
                               best.rtp if best is not None else RtpStats())
        return FlowMedia(up=direction_media(info.packets, info.bytes, info.rtp), down=down)
