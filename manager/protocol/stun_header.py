"""The fixed 20-byte STUN message header (RFC 8489 section 5).

What the slow path needs of most STUN packets it relays, the class, the
method and the transaction id, without decoding the attributes: an owner's
reply to a check (whose transaction id says the check succeeded) and a
client's check on a leg not yet installed.

    0                   1                   2                   3
    0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
   |0 0|     STUN Message Type     |         Message Length        |
   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
   |                         Magic Cookie                          |
   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
   |                     Transaction ID (96 bits)                  |
   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

The message type interleaves the class bits C1 C0 with the method bits
M11..M0: M11-M7 C1 M6-M4 C0 M3-M0.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct("!HHI12s")
HEADER_SIZE = HEADER.size  # 20
MAGIC_COOKIE = 0x2112A442
TRANSACTION_ID_SIZE = 12

# Classes (RFC 8489 section 5).
CLASS_REQUEST = 0b00
CLASS_INDICATION = 0b01
CLASS_SUCCESS = 0b10
CLASS_ERROR = 0b11

METHOD_BINDING = 0x001
MAX_METHOD = 0xFFF


@dataclass(frozen=True)
class StunHeader:
    """A STUN message's header: class, method, length of the attributes and
    transaction id."""

    message_class: int
    method: int
    length: int
    transaction_id: bytes


def message_type(message_class: int, method: int) -> int:
    return ((method & 0xF80) << 2) | ((method & 0x070) << 1) | (method & 0x00F) \
        | ((message_class & 0b10) << 7) | ((message_class & 0b01) << 4)


def parse_header(data: bytes) -> StunHeader:
    """The header of the STUN message `data` (one whole datagram); ValueError
    saying what is wrong if it is not one."""
    if len(data) < HEADER_SIZE:
        raise ValueError(f"STUN message needs {HEADER_SIZE} bytes of header, got {len(data)}")
    mtype, length, cookie, txid = HEADER.unpack_from(data)
    if mtype & 0xC000:
        raise ValueError("STUN message type must start with two zero bits")
    if cookie != MAGIC_COOKIE:
        raise ValueError(f"STUN magic cookie is 0x{cookie:08x}, not 0x{MAGIC_COOKIE:08x}")
    if length % 4:
        raise ValueError(f"STUN message length {length} is not a multiple of 4")
    if length != len(data) - HEADER_SIZE:
        raise ValueError(f"STUN message length {length} disagrees with the {len(data) - HEADER_SIZE} bytes "
                         "after the header")
    cls = ((mtype >> 7) & 0b10) | ((mtype >> 4) & 0b01)
    method = (mtype & 0x000F) | ((mtype >> 1) & 0x0070) | ((mtype >> 2) & 0x0F80)
    return StunHeader(message_class=cls, method=method, length=length, transaction_id=txid)


def serialize_header(h: StunHeader) -> bytes:
    if not 0 <= h.message_class <= CLASS_ERROR:
        raise ValueError(f"STUN class {h.message_class} is not 0-3")
    if not 0 <= h.method <= MAX_METHOD:
        raise ValueError(f"STUN method 0x{h.method:x} does not fit 12 bits")
    if len(h.transaction_id) != TRANSACTION_ID_SIZE:
        raise ValueError(f"STUN transaction id needs {TRANSACTION_ID_SIZE} bytes, got {len(h.transaction_id)}")
    if h.length % 4 or not 0 <= h.length <= 0xFFFF:
        raise ValueError(f"STUN message length {h.length} is not a multiple of 4 in 0-65535")
    return HEADER.pack(message_type(h.message_class, h.method), h.length, MAGIC_COOKIE, h.transaction_id)
