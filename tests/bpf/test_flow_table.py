"""The flows of both families behind one view (manager/relay/kernel/flow_table.py):
an IPv4 tuple lives in flows4 under its 12-byte key, an IPv6 one in flows6,
and every read gives back the struct flow_key it was written with. Real maps
of the relay program (the XDP harness)."""

from __future__ import annotations

import ctypes
import random

import pytest

from manager.lab import xdp_harness as hx
from manager.protocol.addresses import OwnerAddr
from manager.relay.kernel.structs import flow_key, flow_key4, widen_key4

pytestmark = pytest.mark.netns


def test_widening_a_flows4_key_gives_back_the_flow_key():
    rng = random.Random(4)
    for _ in range(500):
        client = (".".join(str(rng.randrange(256)) for _ in range(4)), rng.randrange(65536))
        vip = (".".join(str(rng.randrange(256)) for _ in range(4)), rng.randrange(65536))
        key = flow_key(client, vip)
        k4 = flow_key4(key)
        assert ctypes.sizeof(k4) == 12
        assert widen_key4(bytes(k4)) == bytes(key)


def test_flows4_key_is_the_packet_order():
    """saddr, daddr, sport, dport as the IPv4 and UDP headers hold them:
    XDP builds the key with plain loads from the frame."""
    k4 = flow_key4(flow_key(("10.1.2.3", 40000), ("10.9.8.7", 3478)))
    assert bytes(k4) == bytes([10, 1, 2, 3, 10, 9, 8, 7]) + (40000).to_bytes(2, "big") + (3478).to_bytes(2, "big")


@pytest.fixture(scope="module")
def h():
    harness = hx.build(max_flows=1024)
    try:
        yield harness
    finally:
        hx.teardown(harness)


def test_each_family_goes_to_its_own_map_and_comes_back_whole(h):
    dp = h.dp
    owner = OwnerAddr(addr4=hx.TX1_4, port4=5000, addr6=hx.TX1_6, port6=5000)
    dp.set_owner(4242, owner)
    four = (("100.64.0.9", 41000), (hx.VIP4, hx.VIP_PORT))
    six = (("fd00:64::9", 41000), (hx.VIP6, hx.VIP_PORT))
    dp.add_flow(*four, 4242, 20007, owner)
    dp.add_flow(*six, 4242, 20008, owner)
    m = dp.maps
    try:
        k4, k6 = flow_key(*four), flow_key(*six)
        # Checked on each map directly: the IPv4 tuple only in flows4, the IPv6 one only in flows6.
        assert m.flows4.lookup(flow_key4(k4)).flow_port == m.flows.lookup(k4).flow_port
        assert m.flows6.lookup(k6) is not None and m.flows6.lookup(k4) is None
        assert [bytes(k) for k, _ in m.flows4.items()] == [bytes(flow_key4(k4))]
        assert [bytes(k) for k, _ in m.flows6.items()] == [bytes(k6)]
        listed = {bytes(k): v.conn_id for k, v in m.flows.items()}
        assert listed == {bytes(k4): 4242, bytes(k6): 4242}
        assert len(m.flows) == 2 == sum(n for _, _, n in m.flows.raw_batches())
        assert {(f.client, f.vip) for f in dp.flows()} == {four, six}
        assert m.flows.delete(k4) and m.flows.lookup(k4) is None and m.flows4.lookup(flow_key4(k4)) is None
        assert len(m.flows) == 1
    finally:
        dp.remove_flow(*four)
        dp.remove_flow(*six)
        dp.remove_owner(4242)
