"""Round trips of the raw sender's datagrams, checked against scapy (an
implementation of its own) and the exact refusals of the parser."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6

from manager.protocol.udpip import DatagramError, build_datagram, checksum, parse_datagram

CASES = [
    (("10.10.0.2", 20001), ("10.10.2.2", 5000), b"stun check"),
    (("10.10.0.2", 20001), ("10.10.2.2", 5000), b"odd"),
    (("fd00:10::2", 20001), ("fd00:10:2::2", 5000), b"\x00\x01" * 300),
    (("fd00:10::3", 65535), ("fd00:10:2::2", 1), b""),
]


@pytest.mark.parametrize("src,dst,payload", CASES)
def test_round_trip_and_scapy_agrees(src, dst, payload):
    data = build_datagram(src, dst, payload)
    d = parse_datagram(data)
    assert (d.src, d.dst, d.payload) == (src, dst, payload)
    pkt = (IP if ":" not in src[0] else IPv6)(data)
    assert (pkt.src, pkt[UDP].sport, pkt.dst, pkt[UDP].dport, bytes(pkt[UDP].payload)) == (*src, *dst, payload)
    # scapy recomputes every checksum and length: the same bytes come out.
    if ":" not in src[0]:
        del pkt[IP].chksum
        del pkt[IP].len
    else:
        del pkt[IPv6].plen
    del pkt[UDP].chksum
    del pkt[UDP].len
    assert bytes(pkt.__class__(bytes(pkt))) == data


def test_rfc1071_example():
    # RFC 1071 section 3: the sum of 0001 f203 f4f5 f6f7 is ddf2; its complement 220d.
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


@pytest.mark.parametrize("data,message", [
    (b"", "empty packet"),
    (b"\x45" + b"\x00" * 10, "IPv4 packet of 11 bytes is shorter than its header"),
    (b"\x60" + b"\x00" * 10, "IPv6 packet of 11 bytes is shorter than its header"),
    (b"\x55" + b"\x00" * 30, "IP version 5 is neither 4 nor 6"),
])
def test_refusals_name_the_problem(data, message):
    with pytest.raises(DatagramError, match=message):
        parse_datagram(data)


def test_corruption_is_caught():
    good = build_datagram(("10.10.0.2", 20001), ("10.10.2.2", 5000), b"payload")
    with pytest.raises(DatagramError, match="IPv4 header checksum is wrong"):
        parse_datagram(good[:8] + b"\x10" + good[9:])  # TTL changed, checksum not
    with pytest.raises(DatagramError, match="UDP checksum is wrong"):
        parse_datagram(good[:-1] + b"X")
    with pytest.raises(DatagramError, match="different families"):
        build_datagram(("10.10.0.2", 1), ("fd00::1", 2), b"")
