"""RTCP sender and receiver reports (RFC 3550 section 6.4) and source
descriptions (section 6.5) and goodbyes (BYE, section 6.6), read and written.

Only what call quality and our own reports need is decoded: a sender
report's sender info, the report blocks of sender and receiver reports (loss
fraction, cumulative loss, extended highest sequence, interarrival jitter,
LSR, DLSR), the CNAME items of SDES chunks and a BYE's sources and reason.
Every other packet of a compound (APP, feedback, XR) is skipped by its
length. :func:`serialize` writes a compound from the same classes
:func:`parse` returns.
:func:`parse` checks each length a header claims against the datagram and
raises :class:`RtcpError` for one that does not fit: a malformed compound is
dropped whole (the caller counts it), never read past.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

SR, RR, SDES, BYE = 200, 201, 202, 203
SDES_END, SDES_CNAME = 0, 1  # item types (RFC 3550 6.5)
_HEADER = struct.Struct("!BBH")
_SENDER_INFO = struct.Struct("!IIIII")  # NTP msw, NTP lsw, RTP timestamp, packets, octets
_BLOCK = struct.Struct("!IIIIII")  # SSRC, fraction|cumulative, highest seq, jitter, LSR, DLSR
BLOCK_LEN = _BLOCK.size
MAX_BLOCKS = 31  # the 5-bit report count
_SSRC = struct.Struct("!I")
_ITEM = struct.Struct("!BB")  # SDES item: type, length
MAX_ITEM = 255


class RtcpError(ValueError):
    """A compound RTCP packet that does not hold together."""


@dataclass(frozen=True)
class ReportBlock:
    """One reception report: what the sender of the report saw of ``ssrc``'s stream."""

    ssrc: int
    fraction_lost: int  # 0..255, lost / expected in the last interval, times 256
    cumulative_lost: int  # signed 24 bits (duplicates can make it negative)
    highest_seq: int  # extended: cycles << 16 | sequence
    jitter: int  # RTP timestamp units
    lsr: int  # middle 32 bits of the NTP time of the last SR received from ``ssrc``
    dlsr: int  # 1/65536 s since that SR

    def pack(self) -> bytes:
        lost = self.cumulative_lost & 0xFFFFFF
        return _BLOCK.pack(self.ssrc, (self.fraction_lost & 0xFF) << 24 | lost, self.highest_seq & 0xFFFFFFFF,
                           self.jitter & 0xFFFFFFFF, self.lsr & 0xFFFFFFFF, self.dlsr & 0xFFFFFFFF)

    @classmethod
    def unpack(cls, data: bytes, offset: int) -> ReportBlock:
        ssrc, word, highest, jitter, lsr, dlsr = _BLOCK.unpack_from(data, offset)
        lost = word & 0xFFFFFF
        if lost & 0x800000:
            lost -= 1 << 24
        return cls(ssrc, word >> 24, lost, highest, jitter, lsr, dlsr)


@dataclass(frozen=True)
class SenderInfo:
    ntp: int  # 64-bit NTP timestamp
    rtp_timestamp: int
    packets: int
    octets: int

    @property
    def middle32(self) -> int:
        """What a receiver echoes as LSR."""
        return (self.ntp >> 16) & 0xFFFFFFFF


@dataclass(frozen=True)
class Report:
    """A sender report (``sender`` set) or a receiver report."""

    ssrc: int
    blocks: tuple[ReportBlock, ...] = ()
    sender: SenderInfo | None = None

    @property
    def packet_type(self) -> int:
        return SR if self.sender is not None else RR

    def pack(self) -> bytes:
        if len(self.blocks) > MAX_BLOCKS:
            raise RtcpError(f"{len(self.blocks)} report blocks; at most {MAX_BLOCKS} fit one report")
        body = _SSRC.pack(self.ssrc)
        if self.sender is not None:
            s = self.sender
            body += _SENDER_INFO.pack(s.ntp >> 32, s.ntp & 0xFFFFFFFF, s.rtp_timestamp & 0xFFFFFFFF,
                                      s.packets & 0xFFFFFFFF, s.octets & 0xFFFFFFFF)
        body += b"".join(b.pack() for b in self.blocks)
        return _HEADER.pack(0x80 | len(self.blocks), self.packet_type, len(body) // 4) + body


@dataclass(frozen=True)
class Sdes:
    """A source description: each chunk's SSRC and CNAME (None: a chunk without one)."""

    cnames: tuple[tuple[int, str | None], ...]

    def pack(self) -> bytes:
        if len(self.cnames) > MAX_BLOCKS:
            raise RtcpError(f"{len(self.cnames)} SDES chunks; at most {MAX_BLOCKS} fit one packet")
        body = b""
        for ssrc, cname in self.cnames:
            chunk = _SSRC.pack(ssrc)
            if cname is not None:
                item = cname.encode()
                if len(item) > MAX_ITEM:
                    raise RtcpError(f"CNAME of {len(item)} bytes; at most {MAX_ITEM}")
                chunk += _ITEM.pack(SDES_CNAME, len(item)) + item
            # The item list ends with a null octet, and the chunk is padded
            # with more to the next 32-bit boundary.
            chunk += bytes(4 - len(chunk) % 4)
            body += chunk
        return _HEADER.pack(0x80 | len(self.cnames), SDES, len(body) // 4) + body


@dataclass(frozen=True)
class Bye:
    """A goodbye (RFC 3550 6.6): these sources leave the session, and why (optional)."""

    ssrcs: tuple[int, ...]
    reason: str | None = None

    def pack(self) -> bytes:
        if len(self.ssrcs) > MAX_BLOCKS:
            raise RtcpError(f"{len(self.ssrcs)} BYE sources; at most {MAX_BLOCKS} fit one packet")
        body = b"".join(_SSRC.pack(s) for s in self.ssrcs)
        if self.reason is not None:
            text = self.reason.encode()
            if len(text) > MAX_ITEM:
                raise RtcpError(f"BYE reason of {len(text)} bytes; at most {MAX_ITEM}")
            body += bytes([len(text)]) + text
            body += bytes(-len(body) % 4)  # padded with null octets to the 32-bit boundary
        return _HEADER.pack(0x80 | len(self.ssrcs), BYE, len(body) // 4) + body


@dataclass
class Compound:
    """The reports, source descriptions and goodbyes of one compound packet,
    and how many other packets it held."""

    reports: list[Report] = field(default_factory=list)
    sdes: list[Sdes] = field(default_factory=list)
    byes: list[Bye] = field(default_factory=list)
    others: int = 0


def serialize(packets: list[Report | Sdes | Bye]) -> bytes:
    """A compound packet (RFC 3550 6.1: a report first, then an SDES with a
    CNAME; a BYE, when one is sent, last)."""
    return b"".join(p.pack() for p in packets)


def parse(data: bytes) -> Compound:
    """The reports of a (decrypted) compound RTCP packet; RtcpError if any length does not fit."""
    out = Compound()
    offset = 0
    if len(data) < 4:
        raise RtcpError(f"{len(data)} bytes: shorter than an RTCP header")
    while offset < len(data):
        if len(data) - offset < 4:
            raise RtcpError(f"{len(data) - offset} trailing bytes after the last packet")
        b0, pt, words = _HEADER.unpack_from(data, offset)
        if b0 >> 6 != 2:
            raise RtcpError(f"version {b0 >> 6} at byte {offset}, not 2")
        end = offset + 4 * (words + 1)
        if end > len(data):
            raise RtcpError(f"packet at byte {offset} claims {4 * (words + 1)} bytes; {len(data) - offset} left")
        if pt in (SR, RR):
            out.reports.append(_report(data, offset + 4, end, pt, b0 & 0x1F))
        elif pt == SDES:
            out.sdes.append(_sdes(data, offset + 4, end, b0 & 0x1F))
        elif pt == BYE:
            out.byes.append(_bye(data, offset + 4, end, b0 & 0x1F))
        else:
            out.others += 1
        offset = end
    return out


def _report(data: bytes, start: int, end: int, pt: int, count: int) -> Report:
    need = 4 + (_SENDER_INFO.size if pt == SR else 0) + count * BLOCK_LEN
    if end - start < need:  # (profile-specific extensions may follow the blocks)
        raise RtcpError(f"{'SR' if pt == SR else 'RR'} with {count} blocks needs {need} bytes, has {end - start}")
    (ssrc,) = _SSRC.unpack_from(data, start)
    at = start + 4
    sender = None
    if pt == SR:
        msw, lsw, rtp_ts, packets, octets = _SENDER_INFO.unpack_from(data, at)
        sender = SenderInfo(msw << 32 | lsw, rtp_ts, packets, octets)
        at += _SENDER_INFO.size
    blocks = tuple(ReportBlock.unpack(data, at + i * BLOCK_LEN) for i in range(count))
    return Report(ssrc, blocks, sender)


def _sdes(data: bytes, start: int, end: int, count: int) -> Sdes:
    cnames: list[tuple[int, str | None]] = []
    at = start
    for _ in range(count):
        if end - at < 4:
            raise RtcpError(f"SDES chunk {len(cnames) + 1} of {count} starts past the packet's end")
        (ssrc,) = _SSRC.unpack_from(data, at)
        at += 4
        cname = None
        while True:
            if at >= end:
                raise RtcpError(f"SDES chunk for SSRC {ssrc} has no end item")
            kind = data[at]
            if kind == SDES_END:
                at = (at + 4) & ~3  # the null octet and the padding to the boundary
                break
            if end - at < 2 or end - at - 2 < data[at + 1]:
                raise RtcpError(f"SDES item at byte {at} runs past the packet's end")
            length = data[at + 1]
            if kind == SDES_CNAME:
                cname = data[at + 2:at + 2 + length].decode("utf-8", "replace")
            at += 2 + length
        cnames.append((ssrc, cname))
    return Sdes(tuple(cnames))


def _bye(data: bytes, start: int, end: int, count: int) -> Bye:
    at = start + 4 * count
    if at > end:
        raise RtcpError(f"BYE with {count} sources needs {4 * count} bytes, has {end - start}")
    ssrcs = tuple(_SSRC.unpack_from(data, start + 4 * i)[0] for i in range(count))
    reason = None
    if at < end:  # padding alone is no reason: a reason's length octet is not 0
        length = data[at]
        if length:
            if end - at - 1 < length:
                raise RtcpError(f"BYE reason at byte {at} runs past the packet's end")
            reason = data[at + 1:at + 1 + length].decode("utf-8", "replace")
    return Bye(ssrcs, reason)


def ntp_timestamp(unix_seconds: float) -> int:
    """The 64-bit NTP timestamp of a Unix time (RFC 5905: era 0 from 1900)."""
    return int(round((unix_seconds + 2208988800) * (1 << 32)))
