"""RTP headers (RFC 3550 5.1) read and written without building objects: what the
media engine does once per packet.

:func:`parse` checks every length the header claims (CSRC count, extension
length, padding) against the datagram, so a header that lies about its
length is refused (None) rather than read past. :func:`build` writes a
header with RFC 8285 one-byte extensions (``mid``, ``ssrc-audio-level``).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

_FIXED = struct.Struct("!BBHII")
HEADER_LEN = 12


class RtpHeader(NamedTuple):
    payload_type: int
    marker: bool
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes


def parse(data: bytes) -> RtpHeader | None:
    """The header and payload of one RTP packet; None if it is not RTP version
    2 or any length it claims does not fit the datagram."""
    if len(data) < HEADER_LEN:
        return None
    b0, b1, seq, ts, ssrc = _FIXED.unpack_from(data)
    if b0 >> 6 != 2:
        return None
    offset = HEADER_LEN + 4 * (b0 & 0x0F)
    if b0 & 0x10:  # extension: 4 bytes of profile and length, then length words
        if len(data) < offset + 4:
            return None
        offset += 4 + 4 * int.from_bytes(data[offset + 2:offset + 4], "big")
    end = len(data)
    if b0 & 0x20:  # padding: its count is the last byte and includes itself
        pad = data[-1]
        if pad == 0:
            return None
        end -= pad
    if offset > end:
        return None
    return RtpHeader(b1 & 0x7F, bool(b1 & 0x80), seq, ts, ssrc, data[offset:end])


def one_byte_extensions(items: list[tuple[int, bytes]]) -> bytes:
    """RFC 8285 one-byte-header extension block (profile 0xBEDE), padded to words."""
    body = b"".join(bytes([(ext_id << 4) | (len(value) - 1)]) + value for ext_id, value in items)
    body += bytes(-len(body) % 4)
    return b"\xbe\xde" + (len(body) // 4).to_bytes(2, "big") + body


def build(payload_type: int, marker: bool, sequence: int, timestamp: int, ssrc: int, payload: bytes,
          extensions: bytes = b"") -> bytes:
    """One RTP packet; ``extensions`` as :func:`one_byte_extensions` returns it."""
    b0 = 0x90 if extensions else 0x80
    return _FIXED.pack(b0, (0x80 if marker else 0) | payload_type, sequence & 0xFFFF, timestamp & 0xFFFFFFFF,
                       ssrc) + extensions + payload
