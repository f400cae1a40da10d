"""Walking the kernel's maps: batched reads see every entry exactly once,
and the housekeeper's idle-expiry walk removes exactly the idle flows and
reports every other one. Real maps of the relay program (the XDP harness)."""

from __future__ import annotations

import time

import pytest

from manager.lab import xdp_harness as hx
from manager.protocol.addresses import OwnerAddr
from manager.relay.kernel import libbpf
from manager.relay.kernel.structs import flow_key, htons

pytestmark = pytest.mark.netns

N = 3 * libbpf.BATCH + 17  # several full batches and a partial one


@pytest.fixture(scope="module")
def h():
    harness = hx.build(max_flows=1 << 15)
    try:
        yield harness
    finally:
        hx.teardown(harness)


def _client(i: int) -> tuple[str, int]:
    return (f"100.64.{i // 250}.{i % 250 + 1}", 40000 + i % 7)


def test_batched_items_see_every_entry_once(h):
    dp = h.dp
    owner = OwnerAddr(addr4=hx.TX1_4, port4=5000)
    dp.set_owner(777, owner)
    for i in range(N):
        dp.add_flow(_client(i), (hx.VIP4, hx.VIP_PORT), 777, 20000 + i % 10000, owner, flow_addr=i // 10000)
    try:
        seen = [bytes(k) for k, _ in dp.maps.flows.items()]
        want = {bytes(flow_key(_client(i), (hx.VIP4, hx.VIP_PORT))) for i in range(N)}
        assert len(seen) == len(set(seen))  # none twice
        assert want <= set(seen)  # (the harness's own flows may be there too)
        # the values are the entries' own
        one = dict((bytes(k), v) for k, v in dp.maps.flows.items())[bytes(flow_key(_client(5), (hx.VIP4, hx.VIP_PORT)))]
        assert one.conn_id == 777 and one.flow_port == htons(20005)
        # one by one (get_next_key) gives the same set
        assert {bytes(k) for k in dp.maps.flows.keys()} == set(seen)  # noqa: SIM118 - PinnedMap.keys() walks
        # an array map (relay_cfg) is read too
        assert len(list(dp.maps.relay_cfg.items())) == 2
    finally:
        for i in range(N):
            dp.remove_flow(_client(i), (hx.VIP4, hx.VIP_PORT))


def test_expire_walk_removes_only_idle_flows_and_reports_the_rest(h):
    dp = h.dp
    owner = OwnerAddr(addr4=hx.TX1_4, port4=5000)
    dp.set_owner(778, owner)
    vip = (hx.VIP4, hx.VIP_PORT)
    n = 300
    for i in range(n):
        dp.add_flow(_client(i), vip, 778, 21000 + i, owner)
    now = time.monotonic_ns()
    idle = {i for i in range(n) if i % 3 == 0}
    for i in idle:  # last seen an hour ago either way (or at boot, on a younger machine)
        key = flow_key(_client(i), vip)
        info = dp.maps.flows.lookup(key)
        info.last_seen_ns = max(1, now - 3600 * 10**9)
        dp.maps.flows.update(key, info)
    # idle towards the owner, but its return direction is alive: it stays
    rkey = next(k for k, v in dp.maps.reverse.items() if bytes(v.client) == bytes(flow_key(_client(3), vip)))
    rinfo = dp.maps.reverse.lookup(rkey)
    rinfo.last_seen_ns = now
    dp.maps.reverse.update(rkey, rinfo)
    idle.discard(3)
    kept: set = set()
    expired = dp.expire_idle(60.0, now_ns=now, kept=kept)
    assert {f.client for f in expired} == {_client(i) for i in idle}
    assert all(f.conn_id == 778 for f in expired)
    for i in range(n):
        kb = bytes(flow_key(_client(i), vip))
        assert (kb in kept) == (i not in idle)
        assert (dp.maps.flows.lookup(flow_key(_client(i), vip)) is None) == (i in idle)
    for i in range(n):
        dp.remove_flow(_client(i), vip)
