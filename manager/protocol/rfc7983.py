"""RFC 7983 demultiplexing: what a datagram on a WebRTC 5-tuple is, by its
first byte, and the few STUN fields (RFC 8489) read without parsing the whole
message. The XDP program applies the same ranges (bpf/parse.h).

    first byte   0..3     STUN
                 20..63   DTLS
                 128..191 RTP/RTCP (SRTP/SRTCP)
"""

from __future__ import annotations

import enum

STUN_HEADER_LENGTH = 20
STUN_MAGIC_COOKIE = b"\x21\x12\xa4\x42"
STUN_ATTR_USERNAME = 0x0006

# STUN class bits of the message type (RFC 8489 5: C1 at 0x0100, C0 at 0x0010).
STUN_CLASS_MASK = 0x0110
STUN_REQUEST = 0x0000
STUN_INDICATION = 0x0010
STUN_SUCCESS = 0x0100
STUN_ERROR = 0x0110
STUN_METHOD_BINDING = 0x0001


class PacketClass(enum.Enum):
    """A datagram's protocol by RFC 7983's first-byte ranges."""

    STUN = "stun"
    DTLS = "dtls"
    RTP = "rtp"  # RTP or RTCP: the same range
    OTHER = "other"


def classify(data: bytes) -> PacketClass:
    """The RFC 7983 class of a datagram (OTHER when empty or out of range)."""
    if not data:
        return PacketClass.OTHER
    first = data[0]
    if first <= 3:
        return PacketClass.STUN
    if 20 <= first <= 63:
        return PacketClass.DTLS
    if 128 <= first <= 191:
        return PacketClass.RTP
    return PacketClass.OTHER


def is_stun(data: bytes) -> bool:
    """First byte in STUN's range (cheap; no cookie check)."""
    return bool(data) and data[0] <= 3


def stun_class(data: bytes) -> int | None:
    """STUN class bits (STUN_REQUEST, STUN_INDICATION, STUN_SUCCESS, STUN_ERROR),
    or None if `data` is not a STUN message (first byte 0-3, full header, magic cookie)."""
    if len(data) < STUN_HEADER_LENGTH or data[0] > 3 or data[4:8] != STUN_MAGIC_COOKIE:
        return None
    return int.from_bytes(data[0:2], "big") & STUN_CLASS_MASK


def stun_username(data: bytes) -> str | None:
    """The USERNAME attribute of a STUN message, verifying nothing else; None
    when absent or not UTF-8."""
    pos = STUN_HEADER_LENGTH
    end = min(len(data), STUN_HEADER_LENGTH + int.from_bytes(data[2:4], "big"))
    while pos + 4 <= end:
        attr_type = int.from_bytes(data[pos : pos + 2], "big")
        attr_len = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if attr_type == STUN_ATTR_USERNAME:
            if pos + 4 + attr_len > end:
                return None
            try:
                return data[pos + 4 : pos + 4 + attr_len].decode("utf8")
            except UnicodeDecodeError:
                return None
        pos += 4 + attr_len + (-attr_len % 4)
    return None
