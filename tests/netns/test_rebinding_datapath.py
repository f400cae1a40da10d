"""The kernel side of NAT rebinding, on the real XDP program: a flow learns
its client's SSRC once; media with that SSRC from an unknown tuple goes to
the slow path (and nothing else does); rebind_flow moves the flow in one
step so the new tuple forwards both ways and the old one no longer does."""

from __future__ import annotations

import ctypes
import sys

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from manager.lab import xdp_harness as hx
from manager.protocol.addresses import OwnerAddr

pytestmark = pytest.mark.netns

VIP = (hx.VIP4, hx.VIP_PORT)
OLD, NEW, OTHER = (hx.CLIENT4, 40100), (hx.CLIENT4, 40101), (hx.CLIENT4, 40102)
FLOW_PORT, OWNER_PORT = 20100, 5000
SSRC = 0x1234ABCD


def rtp(ssrc: int, seq: int = 1) -> bytes:
    return bytes([0x80, 111]) + seq.to_bytes(2, "big") + b"\x00" * 4 + ssrc.to_bytes(4, "big") + b"r" * 40


def from_client(client: tuple[str, int], payload: bytes) -> bytes:
    return bytes(Ether(src=hx.MAC["client"], dst=hx.MAC["pub"]) / IP(src=client[0], dst=hx.VIP4)
                 / UDP(sport=client[1], dport=hx.VIP_PORT) / Raw(payload))


def from_owner(payload: bytes) -> bytes:
    return bytes(Ether(src=hx.MAC["tx1"], dst=hx.MAC["int"]) / IP(src=hx.TX1_4, dst=hx.INT4)
                 / UDP(sport=OWNER_PORT, dport=FLOW_PORT) / Raw(payload))


@pytest.fixture()
def h():
    h = hx.build()
    try:
        h.dp.set_owner(7, OwnerAddr(addr4=hx.TX1_4, port4=OWNER_PORT))
        h.dp.add_flow(OLD, VIP, 7, FLOW_PORT)
        yield h
    finally:
        hx.teardown(h)


def counts(h) -> dict[str, int]:
    return {k: v[0] for k, v in h.dp.counters().items()}


def test_a_flow_learns_its_first_ssrc_once(h):
    assert h.run(from_client(OLD, rtp(SSRC)))[0] == hx.XDP_REDIRECT
    assert h.run(from_client(OLD, rtp(0x0BADBEEF)))[0] == hx.XDP_REDIRECT  # a second SSRC: not indexed
    flow = h.dp.get_flow(OLD, VIP)
    assert flow.ssrc == SSRC
    assert h.dp.ssrc_flow(rtp(SSRC)) == (OLD, VIP)
    assert h.dp.ssrc_flow(rtp(0x0BADBEEF)) is None
    # RTCP carries no media SSRC here: it teaches nothing.
    rtcp = bytes([0x80, 200]) + b"\x00\x06" + (0x55555555).to_bytes(4, "big") + b"\x00" * 24
    h.dp.add_flow(OTHER, VIP, 7, FLOW_PORT + 1)
    h.run(from_client(OTHER, rtcp))
    assert h.dp.get_flow(OTHER, VIP).ssrc == 0


def test_only_media_with_a_known_ssrc_from_an_unknown_tuple_reaches_the_slow_path(h):
    h.run(from_client(OLD, rtp(SSRC)))
    before = counts(h)
    assert h.run(from_client(NEW, rtp(SSRC)))[0] == hx.XDP_PASS
    assert h.run(from_client(NEW, rtp(0x77777777)))[0] == hx.XDP_DROP
    after = counts(h)
    assert after["pass_rebind"] - before["pass_rebind"] == 1
    assert after["drop_unknown_not_stun"] - before["drop_unknown_not_stun"] == 1


def test_rebind_moves_both_directions_in_one_step(h):
    h.run(from_client(OLD, rtp(SSRC)))
    assert h.dp.rebind_flow(OLD, NEW, VIP)
    assert h.dp.get_flow(OLD, VIP) is None and h.dp.get_flow(NEW, VIP).ssrc == SSRC
    assert h.dp.ssrc_flow(rtp(SSRC)) == (NEW, VIP)
    assert h.dp.reverse_index_size() == 1
    verdict, out, _ = h.run(from_client(NEW, rtp(SSRC, 2)))
    assert verdict == hx.XDP_REDIRECT and Ether(out)[UDP].sport == FLOW_PORT  # same flow source
    verdict, out, _ = h.run(from_owner(rtp(0x42)), "int")
    assert verdict == hx.XDP_REDIRECT and Ether(out)[UDP].dport == NEW[1]  # the owner's packets go to the new tuple
    # The old tuple is unknown now: its media is a rebinding candidate, not forwarded.
    assert h.run(from_client(OLD, rtp(SSRC, 3)))[0] == hx.XDP_PASS
    assert not h.dp.rebind_flow(OLD, OTHER, VIP)  # nothing left to move
    assert h.dp.remove_flow(NEW, VIP) and h.dp.reverse_index_size() == 0
    key = h.dp.maps.ssrcs.lookup(ctypes.c_uint32(int.from_bytes(SSRC.to_bytes(4, "big"), sys.byteorder)))
    assert key is None  # the index entry went with its flow
