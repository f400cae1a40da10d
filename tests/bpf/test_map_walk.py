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


def test_the_expiry_walk_reads_a_flow_again_before_deleting_it(h):
    """Between the walk's read and its delete, one idle flow sees a packet
    (its last-seen refreshed, as XDP writes it) and another is re-installed
    by the event loop (a new flow entry): both stay, reported as kept; only
    the flow still idle goes."""
    dp = h.dp
    owner = OwnerAddr(addr4=hx.TX1_4, port4=5000)
    dp.set_owner(779, owner)
    vip = (hx.VIP4, hx.VIP_PORT)
    clients = [("100.65.0.1", 41000), ("100.65.0.2", 41000), ("100.65.0.3", 41000)]
    refreshed, reinstalled, idle = clients
    for i, c in enumerate(clients):
        dp.add_flow(c, vip, 779, 22000 + i, owner)
    now = time.monotonic_ns()
    for c in clients:
        key = flow_key(c, vip)
        info = dp.maps.flows.lookup(key)
        info.last_seen_ns = max(1, now - 3600 * 10**9)
        dp.maps.flows.update(key, info)

    walk_read = dp._entries_of

    def meanwhile(clients_wanted):
        # The walk has read the maps and picked its idle flows: now they change.
        del dp._entries_of
        key = flow_key(refreshed, vip)
        info = dp.maps.flows.lookup(key)
        info.last_seen_ns = time.monotonic_ns()
        dp.maps.flows.update(key, info)
        dp.remove_flow(reinstalled, vip)
        dp.add_flow(reinstalled, vip, 779, 22001, owner)
        return walk_read(clients_wanted)

    dp._entries_of = meanwhile
    try:
        kept: set = set()
        expired = dp.expire_idle(60.0, now_ns=now, kept=kept)
        assert [f.client for f in expired] == [idle]
        assert {bytes(flow_key(c, vip)) for c in (refreshed, reinstalled)} <= kept
        assert dp.maps.flows.lookup(flow_key(refreshed, vip)) is not None
        assert dp.maps.flows.lookup(flow_key(reinstalled, vip)) is not None
        assert dp.maps.flows.lookup(flow_key(idle, vip)) is None
    finally:
        dp.__dict__.pop("_entries_of", None)
        for c in clients:
            dp.remove_flow(c, vip)
