"""The STUN header codec against aioice's messages, round trips and refusals."""

from __future__ import annotations

import os

import pytest
from aioice import stun

from manager.protocol.stun_header import (
    CLASS_ERROR,
    CLASS_INDICATION,
    CLASS_REQUEST,
    CLASS_SUCCESS,
    METHOD_BINDING,
    StunHeader,
    parse_header,
    serialize_header,
)

AIOICE_CLASSES = {stun.Class.REQUEST: CLASS_REQUEST, stun.Class.INDICATION: CLASS_INDICATION,
                  stun.Class.RESPONSE: CLASS_SUCCESS, stun.Class.ERROR: CLASS_ERROR}


@pytest.mark.parametrize("method", list(stun.Method))
@pytest.mark.parametrize("cls", list(stun.Class))
def test_reads_what_aioice_writes(method, cls):
    msg = stun.Message(message_method=method, message_class=cls)
    msg.attributes["USERNAME"] = "abcd:efgh"
    msg.add_message_integrity(b"secret")
    msg.add_fingerprint()
    data = bytes(msg)
    h = parse_header(data)
    assert (h.method, h.message_class) == (int(method), AIOICE_CLASSES[cls])
    assert h.transaction_id == msg.transaction_id and h.length == len(data) - 20
    assert serialize_header(h) == data[:20]


@pytest.mark.parametrize("method", [0x000, 0x001, 0x00F, 0x010, 0x070, 0x080, 0xF80, 0xABC, 0xFFF])
@pytest.mark.parametrize("cls", [CLASS_REQUEST, CLASS_INDICATION, CLASS_SUCCESS, CLASS_ERROR])
def test_round_trip_every_bit(method, cls):
    h = StunHeader(message_class=cls, method=method, length=8, transaction_id=os.urandom(12))
    assert parse_header(serialize_header(h) + bytes(8)) == h


@pytest.mark.parametrize("cls", [CLASS_REQUEST, CLASS_INDICATION, CLASS_SUCCESS, CLASS_ERROR])
def test_aioice_reads_what_we_write(cls):
    h = StunHeader(message_class=cls, method=METHOD_BINDING, length=0, transaction_id=os.urandom(12))
    msg = stun.parse_message(serialize_header(h))
    assert (int(msg.message_method), AIOICE_CLASSES[msg.message_class]) == (METHOD_BINDING, cls)
    assert msg.transaction_id == h.transaction_id


def _check() -> bytes:
    msg = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    msg.attributes["PRIORITY"] = 1
    return bytes(msg)


@pytest.mark.parametrize("data,error", [
    (b"", "needs 20 bytes of header, got 0"),
    (_check()[:19], "needs 20 bytes of header, got 19"),
    (b"\x40" + _check()[1:], "must start with two zero bits"),
    (_check()[:4] + b"\x21\x12\xa4\x43" + _check()[8:], "magic cookie is 0x2112a443"),
    (_check()[:2] + b"\x00\x07" + _check()[4:], "length 7 is not a multiple of 4"),
    (_check() + b"\0\0\0\0", "length 8 disagrees with the 12 bytes after the header"),
    (_check()[:-4], "length 8 disagrees with the 4 bytes after the header"),
])
def test_refusals_say_what_is_wrong(data, error):
    with pytest.raises(ValueError, match=error):
        parse_header(data)


@pytest.mark.parametrize("h,error", [
    (StunHeader(4, 1, 0, bytes(12)), "class 4 is not 0-3"),
    (StunHeader(0, 0x1000, 0, bytes(12)), "method 0x1000 does not fit 12 bits"),
    (StunHeader(0, 1, 0, bytes(11)), "transaction id needs 12 bytes, got 11"),
    (StunHeader(0, 1, 6, bytes(12)), "length 6 is not a multiple of 4"),
])
def test_serialize_refuses_what_does_not_fit(h, error):
    with pytest.raises(ValueError, match=error):
        serialize_header(h)
