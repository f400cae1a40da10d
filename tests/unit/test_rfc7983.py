"""RFC 7983 first-byte classes and the STUN header reads, on real aioice messages."""

from __future__ import annotations

import pytest
from aioice import stun

from manager.protocol.rfc7983 import (
    STUN_ERROR,
    STUN_INDICATION,
    STUN_REQUEST,
    STUN_SUCCESS,
    PacketClass,
    classify,
    is_stun,
    stun_class,
    stun_username,
)


@pytest.mark.parametrize(("first", "expected"), [
    (0, PacketClass.STUN), (3, PacketClass.STUN), (4, PacketClass.OTHER), (19, PacketClass.OTHER),
    (20, PacketClass.DTLS), (63, PacketClass.DTLS), (64, PacketClass.OTHER), (127, PacketClass.OTHER),
    (128, PacketClass.RTP), (191, PacketClass.RTP), (192, PacketClass.OTHER), (255, PacketClass.OTHER),
])
def test_first_byte_ranges(first: int, expected: PacketClass) -> None:
    assert classify(bytes([first]) + b"\x00" * 20) is expected
    assert is_stun(bytes([first])) == (expected is PacketClass.STUN)


def test_empty_is_other() -> None:
    assert classify(b"") is PacketClass.OTHER
    assert not is_stun(b"")
    assert stun_class(b"") is None


@pytest.mark.parametrize(("cls", "bits"), [
    (stun.Class.REQUEST, STUN_REQUEST), (stun.Class.INDICATION, STUN_INDICATION),
    (stun.Class.RESPONSE, STUN_SUCCESS), (stun.Class.ERROR, STUN_ERROR),
])
def test_stun_class_and_username_of_real_messages(cls: stun.Class, bits: int) -> None:
    msg = stun.Message(message_method=stun.Method.BINDING, message_class=cls)
    msg.attributes["USERNAME"] = "abcd:efgh"
    msg.add_message_integrity(b"password")
    data = bytes(msg)
    assert stun_class(data) == bits
    assert stun_username(data) == "abcd:efgh"


def test_not_stun_without_cookie_or_header() -> None:
    data = bytearray(bytes(stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)))
    assert stun_class(bytes(data)) == STUN_REQUEST
    assert stun_class(bytes(data[:19])) is None
    data[4] ^= 0xFF
    assert stun_class(bytes(data)) is None


def test_username_absent_truncated_or_not_utf8() -> None:
    msg = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    assert stun_username(bytes(msg)) is None
    msg.attributes["USERNAME"] = "abcd:efgh"
    data = bytes(msg)
    assert stun_username(data[:-4]) is None  # the attribute runs past the end
    bad = data[:24] + b"\xff\xfe" + data[26:]
    assert stun_username(bad) is None
