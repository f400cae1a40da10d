"""RTP headers read and written by the media engine (manager/protocol/rtp_header.py),
checked against aiortc's parser; a header lying about its length is refused."""

from __future__ import annotations

import random

from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket

from manager.protocol import rtp_header


def test_build_matches_aiortc_parse():
    ext = rtp_header.one_byte_extensions([(1, b"0"), (10, bytes([0x80 | 42]))])
    data = rtp_header.build(111, True, 65535, 0xFFFFFFFF, 0x12345678, b"opus!", ext)
    pkt = RtpPacket.parse(data)
    assert (pkt.payload_type, pkt.marker, pkt.sequence_number, pkt.timestamp, pkt.ssrc, pkt.payload) == (
        111, 1, 65535, 0xFFFFFFFF, 0x12345678, b"opus!")
    assert rtp_header.parse(data) == (111, True, 65535, 0xFFFFFFFF, 0x12345678, b"opus!")


def test_parse_matches_aiortc_for_csrc_extension_and_padding():
    pkt = RtpPacket(payload_type=96, sequence_number=7, timestamp=9, ssrc=5, payload=b"x" * 20)
    pkt.padding_size = 3
    pkt.csrc = [1, 2]
    pkt.extensions.mid = "0"
    m = HeaderExtensionsMap()
    m.configure(RTCRtpParameters(headerExtensions=[
        RTCRtpHeaderExtensionParameters(id=1, uri="urn:ietf:params:rtp-hdrext:sdes:mid")]))
    data = pkt.serialize(m)
    assert rtp_header.parse(data) == (96, False, 7, 9, 5, b"x" * 20)


def test_lying_lengths_are_refused():
    good = rtp_header.build(111, False, 1, 2, 3, b"payload")
    assert rtp_header.parse(good[:11]) is None  # shorter than a header
    assert rtp_header.parse(bytes([0x40]) + good[1:]) is None  # version 1
    assert rtp_header.parse(bytes([0x8F]) + good[1:]) is None  # 15 CSRCs claimed, none there
    ext = bytes([0x90]) + good[1:12] + b"\xbe\xde\xff\xff"  # extension of 65535 words
    assert rtp_header.parse(ext) is None
    assert rtp_header.parse(bytes([0x90]) + good[1:12] + b"\xbe") is None  # truncated extension header
    assert rtp_header.parse(bytes([0xA0]) + good[1:-1] + b"\xff") is None  # padding longer than the packet
    assert rtp_header.parse(bytes([0xA0]) + good[1:-1] + b"\x00") is None  # padding count 0


def test_random_and_mutated_input_never_raises():
    rng = random.Random(3)
    good = rtp_header.build(111, False, 1, 2, 3, b"p" * 60, rtp_header.one_byte_extensions([(1, b"0")]))
    for i in range(20000):
        if i % 2:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 80)))
        else:
            data = bytearray(good)
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] = rng.getrandbits(8)
            data = bytes(data[:rng.randint(0, len(data))])
        out = rtp_header.parse(data)
        if out is not None:
            assert len(out.payload) <= len(data) - 12
