"""Next hops XDP forwards through stay resolved (managed neighbours).

The relay namespace of the XDP harness gets a real neighbour: its internal
veth's peer moves into a namespace of its own that answers ARP for owner
addresses. A flow whose owner no packet of the kernel stack has reached is
passed to the stack (`pass_no_neigh`) until the owner's next hop is managed;
then it is forwarded, with nobody else talking to it.
"""

from __future__ import annotations

import subprocess
import uuid

import pytest

from manager.lab import xdp_harness as hx
from manager.protocol.addresses import OwnerAddr
from manager.relay.kernel.next_hops import NextHops
from tests.support.neighbours import neighbour, resolved
from tests.support.waiting import eventually

pytestmark = pytest.mark.netns

OWNER_PORT = 40000
CLIENT = (hx.CLIENT4, 41234)
VIP = (hx.VIP4, hx.VIP_PORT)
# The peer namespace's addresses on the internal link (10.10.2.0/24), and a
# network behind it (reached through GATEWAY).
OWNER_A, OWNER_B, GATEWAY = "10.10.2.50", "10.10.2.51", "10.10.2.60"
BEHIND = "10.77.0.9"
RTP = bytes([0x80, 0x6F, 0, 1]) + bytes(8) + bytes(40)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def lab():
    h = hx.build()
    peer = f"srnh-{uuid.uuid4().hex[:8]}"
    try:
        _ip("netns", "add", peer)
        _ip("-n", h.ns, "link", "set", "intp", "netns", peer)
        for addr in (OWNER_A, OWNER_B, GATEWAY):
            _ip("-n", peer, "addr", "add", f"{addr}/24", "dev", "intp")
        _ip("-n", peer, "link", "set", "intp", "up")
        _ip("-n", h.ns, "route", "add", "10.77.0.0/16", "via", GATEWAY)
        yield h
    finally:
        subprocess.run(["ip", "netns", "del", peer], capture_output=True)
        hx.teardown(h)


@pytest.fixture
def keeper(lab):
    k = NextHops(netns=lab.ns)
    k.start()
    yield k
    k.stop()


def frame() -> bytes:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    return bytes(Ether(src=hx.MAC["client"], dst=hx.MAC["pub"]) / IP(src=CLIENT[0], dst=VIP[0])
                 / UDP(sport=CLIENT[1], dport=VIP[1]) / Raw(RTP))


def verdict(h: hx.Harness) -> str:
    rc, _, _ = h.run(frame())
    return hx.VERDICTS[rc]


def test_an_owner_nobody_talked_to_is_forwarded_once_its_next_hop_is_managed(lab, keeper):
    h = lab
    h.dp.set_owner(20, OwnerAddr(addr4=OWNER_A, port4=OWNER_PORT))
    h.dp.add_flow(CLIENT, VIP, 20, 20020)
    # Without the keeper the kernel never resolves the owner: XDP hands
    # every packet to the stack, where a stopped relayd would lose it.
    assert verdict(h) == "PASS" and neighbour(h.ns, OWNER_A) is None
    assert h.dp.counters().get("pass_no_neigh", (0, 0))[0] >= 1
    # Wired as relayd wires it: a new owner's address reaches the keeper.
    h.dp.on_next_hop = keeper.want
    h.dp.set_owner(20, OwnerAddr(addr4=OWNER_B, port4=OWNER_PORT))
    eventually(lambda: resolved(h.ns, OWNER_B), 10, what="the owner's neighbour to be managed and resolved")
    eventually(lambda: verdict(h) == "REDIRECT", 10, what="XDP to forward to the owner")
    assert neighbour(h.ns, OWNER_A) is None  # only what a flow uses
    assert keeper.stats["managed"] >= 1


def test_a_client_behind_a_gateway_keeps_the_gateway_resolved(lab, keeper):
    h = lab
    keeper.want(BEHIND)
    keeper.want("10.77.5.5")  # the same gateway: one entry
    assert keeper.wait_idle(10)
    eventually(lambda: resolved(h.ns, GATEWAY), 10, what="the gateway to be managed and resolved")
    assert neighbour(h.ns, BEHIND) is None
    assert keeper.stats["managed"] == 1


def test_configured_entries_and_local_addresses_are_left_alone(lab, keeper):
    h = lab
    before = neighbour(h.ns, hx.TX1_4)
    assert "PERMANENT" in before["state"]
    keeper.want(hx.TX1_4)  # the harness's static neighbour
    keeper.want(hx.VIP4)  # a local address: no next hop
    keeper.want("127.0.0.1")
    keeper.want("192.0.2.200")  # no route in the namespace
    assert keeper.wait_idle(10)
    assert neighbour(h.ns, hx.TX1_4) == before
    assert keeper.stats == {"managed": 0, "kept": 1, "skipped": 3, "failed": 0, "over_cap": 0}
