"""Migration refusals decided before anything is touched (Migrator.check),
on a real registry: each is one clear message with an HTTP-like status."""

from __future__ import annotations

import pytest

from manager.protocol.addresses import OwnerAddr
from manager.relay.migration import MigrationError, Migrator
from manager.relay.registry import Registry


@pytest.fixture
def setup():
    reg = Registry()
    reg.register_transceiver(1, "http://10.0.0.2:8700", 5)
    reg.register_transceiver(2, "http://10.0.0.3:8700", 1)
    reg.register_transceiver(3, "http://10.0.0.4:8700", 5)
    conn = reg.allocate_conn_id()
    call = reg.add_call(conn_id=conn, transceiver_id=1, client_ufrag="cli1", server_ufrag="srv1srv1",
                        owner=OwnerAddr(addr4="10.0.0.2", port4=5000))
    return reg, Migrator(reg, None, None, None), call


def refused(m: Migrator, ref, target: int) -> MigrationError:
    with pytest.raises(MigrationError) as info:
        m.check(ref, target)
    return info.value


def test_accepts_a_valid_move(setup):
    reg, m, call = setup
    got, target = m.check(call.call_id, 3)
    assert got is call and target.id == 3
    assert m.check(call.conn_id, 3)[0] is call  # by connection id too


def test_refusals(setup):
    reg, m, call = setup
    assert (e := refused(m, "nosuch", 3)).status == 404 and str(e) == "unknown call nosuch"
    assert (e := refused(m, call.call_id, 9)).status == 404 and str(e) == "unknown transceiver 9"
    assert str(refused(m, call.call_id, 1)) == f"call {call.call_id} is already on transceiver 1"
    # Transceiver 2 holds one call at capacity 1.
    other = reg.add_call(conn_id=reg.allocate_conn_id(), transceiver_id=2, client_ufrag="cli2",
                         server_ufrag="srv2srv2", owner=OwnerAddr(addr4="10.0.0.3", port4=5000))
    assert other.transceiver_id == 2
    assert str(refused(m, call.call_id, 2)) == "transceiver 2 is full (1/1 calls)"
    reg.set_draining(3)
    assert str(refused(m, call.call_id, 3)) == "transceiver 3 is draining"
    reg.set_draining(3, False)
    reg.heartbeat(3, None, healthy=False)
    assert str(refused(m, call.call_id, 3)) == "transceiver 3 is unhealthy"
    reg.heartbeat(3, None, healthy=True)
    m.running.add(call.conn_id)
    assert str(refused(m, call.call_id, 3)) == f"call {call.call_id} is already being migrated"
    m.running.clear()
    reg.end_call(call.conn_id, "test")
    assert refused(m, call.call_id, 3).status == 404


def _leg(client: tuple[str, int], flow_port: int, flow_addr: int = 0):
    from manager.relay.slowpath import Leg

    return Leg(client=client, vip=("10.10.1.1", 3478), conn_id=7, flow_port=flow_port, flow_addr=flow_addr)


def test_retiring_the_old_owner_keeps_what_the_new_owner_staged():
    from manager.relay.migration import retired_reverse_entries

    legs = [_leg(("10.10.1.2", 40000), 20001), _leg(("fd00:10:1::2", 40001), 20002, 1)]
    old = OwnerAddr(addr4="10.0.0.2", port4=5000, addr6="fd00::2", port6=5000)
    # A different new owner: every old entry goes.
    staged = [(("10.0.0.3", 5000), (20001, 0)), (("fd00::3", 5000), (20002, 1))]
    assert retired_reverse_entries(legs, old, staged) == [(("10.0.0.2", 5000), (20001, 0)),
                                                          (("fd00::2", 5000), (20002, 1))]
    # The new owner receives on the old one's IPv4 endpoint (a transceiver
    # back on the same address): that entry is the new owner's now.
    staged = [(("10.0.0.2", 5000), (20001, 0)), (("fd00::3", 5000), (20002, 1))]
    assert retired_reverse_entries(legs, old, staged) == [(("fd00::2", 5000), (20002, 1))]
    # The same endpoint with another flow source is still the old owner's.
    for other in ((20009, 0), (20001, 1)):
        staged = [(("10.0.0.2", 5000), other)]
        assert (("10.0.0.2", 5000), (20001, 0)) in retired_reverse_entries(legs, old, staged)
    assert retired_reverse_entries(legs, None, staged) == []


class _EndsTheCallOnImport:
    """relayd's transceiver client as the race sees it: the export and the
    import succeed, and the client hangs up while the import is under way."""

    def __init__(self, registry: Registry, conn: int) -> None:
        self.registry, self.conn = registry, conn
        self.requests: list[tuple[int, str, str]] = []

    async def call_op(self, transceiver, method: str, path: str, body=None, expect=(200, 201, 204)) -> dict:
        self.requests.append((transceiver.id, method, path))
        if path.endswith("/import"):
            self.registry.end_call(self.conn, "client-hangup")
            return {"owner": {"addr4": "10.10.2.3", "port4": 5000, "addr6": None, "port6": 0}}
        return {}

    async def delete_call(self, transceiver, conn_id: int) -> None:
        self.requests.append((transceiver.id, "DELETE", f"/calls/{conn_id}"))


@pytest.mark.netns
def test_a_migration_racing_the_calls_end_leaves_no_owner_entry():
    import asyncio

    from manager.lab import xdp_harness as hx
    from manager.relay.kernel.flow_sockets import FlowSockets
    from manager.relay.slowpath import SlowPath

    h = hx.build()
    try:
        reg = Registry()
        reg.register_transceiver(1, "http://10.10.2.2:8700", 5)
        reg.register_transceiver(2, "http://10.10.2.3:8700", 5)
        conn = reg.allocate_conn_id()
        reg.add_call(conn_id=conn, transceiver_id=1, client_ufrag="cli1", server_ufrag="srv1srv1",
                     owner=OwnerAddr(addr4="10.10.2.2", port4=5000))
        reg.activate(conn, OwnerAddr(addr4="10.10.2.2", port4=5000))
        sp = SlowPath(reg, h.dp, FlowSockets(h.dp.cfg), hint_key=bytes(32), vips=[("10.10.1.1", 3478)])
        reg.on_call_ended(sp._call_ended)  # what SlowPath.start() subscribes
        client = _EndsTheCallOnImport(reg, conn)
        m = Migrator(reg, h.dp, sp, client)
        with pytest.raises(MigrationError) as info:
            asyncio.run(m.migrate(conn, 2))
        assert info.value.status == 409 and "ended during its migration" in str(info.value)
        assert h.dp.get_owner(conn) is None  # no owner entry re-created for the dead call
        assert (2, "DELETE", f"/calls/{conn}") in client.requests  # the import is dropped
        assert not any(p.endswith("/unfreeze") for _, _, p in client.requests)
    finally:
        hx.teardown(h)
