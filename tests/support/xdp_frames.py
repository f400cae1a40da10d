"""Frames and addresses of the XDP fixture harness (katran-style packet fixtures)."""

from __future__ import annotations

from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from manager.lab import xdp_harness as hx
from manager.lab.xdp_harness import (
    CLIENT4,
    CLIENT6,
    INT4,
    MAC,
    TX1_4,
    VIP4,
    VIP6,
    VIP_PORT,
)

OWNER_PORT = 5000


STUN = hx.STUN_CHECK


DTLS = bytes([22, 0xFE, 0xFD]) + b"\x00" * 10 + b"\x00\x10" + b"d" * 16


RTP = bytes([0x80, 111]) + b"\x00\x01" + b"\x00" * 8 + b"r" * 40


# Flows installed before the table runs.
C4 = (CLIENT4, 40000)          # conn 7, flow port 20001, owner tx1 (both families)


C6 = (CLIENT6, 40000)          # conn 7, flow port 20002


C4_MIGRATED = (CLIENT4, 40001)  # conn 8: reverse entry for tx1, owner is now tx2


FLOW4, FLOW6, FLOW_MIGRATED = 20001, 20002, 20003


C4_POOL, C6_POOL = (CLIENT4, 40004), (CLIENT6, 40004)  # conn 7, flow source: third pool address, port 20006


FLOW_POOL, POOL_IDX = 20006, 2


def eth(src: str, dst: str) -> Ether:
    return Ether(src=MAC[src], dst=MAC[dst])


def c2r4(payload: bytes, sport: int = 40000, **ip) -> Ether:
    return eth("client", "pub") / IP(src=CLIENT4, dst=VIP4, **ip) / UDP(sport=sport, dport=VIP_PORT) / Raw(payload)


def c2r6(payload: bytes, **ip) -> Ether:
    return eth("client", "pub") / IPv6(src=CLIENT6, dst=VIP6, **ip) / UDP(sport=40000, dport=VIP_PORT) / Raw(payload)


def o2r4(payload: bytes, src: str = TX1_4, flow_port: int = FLOW4) -> Ether:
    return eth("tx1", "int") / IP(src=src, dst=INT4) / UDP(sport=OWNER_PORT, dport=flow_port) / Raw(payload)
