"""Registry: transceiver health, placement, call lifecycle, ownership, listeners."""

from __future__ import annotations

import pytest

from manager.relay.registry import (
    Call,
    OwnerAddr,
    PlacementError,
    RefusedRecord,
    Registry,
    UnknownCallError,
    UnknownTransceiverError,
)

OWNER_A = OwnerAddr(addr4="10.0.0.2", port4=40000)
OWNER_B = OwnerAddr(addr4="10.0.0.3", port4=41000, addr6="fd00::3", port6=41000)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def reg(clock: Clock) -> Registry:
    return Registry(heartbeat_timeout=3.0, report_grace=1.0, clock=clock)


def _call(reg: Registry, transceiver_id: int, owner: OwnerAddr | None = OWNER_A) -> Call:
    conn_id = reg.allocate_conn_id()
    return reg.add_call(
        conn_id=conn_id,
        transceiver_id=transceiver_id,
        client_ufrag="abcd",
        server_ufrag="server-ufrag",
        owner=owner,
    )


# -- OwnerAddr --------------------------------------------------------------


def test_owner_addr_valid_forms() -> None:
    assert OwnerAddr(addr6="fd00::1", port6=5).to_dict() == {
        "addr4": None, "port4": 0, "addr6": "fd00::1", "port6": 5,
    }
    assert OWNER_B.addr4 == "10.0.0.3"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "owner needs an IPv4 or an IPv6 address"),
        ({"addr4": "10.0.0.1", "port4": 0}, "owner port4 must be an integer in 1..65535"),
        ({"addr4": "10.0.0.1", "port4": 70000}, "owner port4 must be an integer in 1..65535"),
        ({"addr4": "fd00::1", "port4": 1}, "owner addr4 'fd00::1' is not an IPv4 address"),
        ({"addr6": "10.0.0.1", "port6": 1}, "owner addr6 '10.0.0.1' is not an IPv6 address"),
        ({"addr4": "host.example", "port4": 1}, "owner addr4 'host.example' is not an IP address"),
        ({"addr6": "fd00::1", "port6": 1, "port4": 3}, "owner port4 is set without addr4"),
        ({"addr4": "0.0.0.0", "port4": 1}, "owner addr4 '0.0.0.0' is not a unicast address"),
        ({"addr6": "::", "port6": 1}, "owner addr6 '::' is not a unicast address"),
        ({"addr4": "224.0.0.1", "port4": 1}, "owner addr4 '224.0.0.1' is not a unicast address"),
    ],
)
def test_owner_addr_rejections(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        OwnerAddr(**kwargs)
    assert str(exc.value) == message


# -- transceivers and health ------------------------------------------------


def test_register_and_list(reg: Registry) -> None:
    reg.register_transceiver(2, "http://10.0.0.3:8080/", 10)
    reg.register_transceiver(1, "http://10.0.0.2:8080", 5)
    assert [t.to_dict() for t in reg.transceivers()] == [
        {"id": 1, "control_url": "http://10.0.0.2:8080", "capacity": 5, "calls": 0, "healthy": True, "draining": False},
        {"id": 2, "control_url": "http://10.0.0.3:8080", "capacity": 10, "calls": 0, "healthy": True, "draining": False},
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, "http://x:1", 1), "transceiver id must be an integer in 1..65535"),
        ((65536, "http://x:1", 1), "transceiver id must be an integer in 1..65535"),
        ((1, "http://x:1", -1), "capacity must be an integer in 0..1000000"),
        ((1, "ftp://x", 1), "control_url 'ftp://x' is not an http(s) URL"),
        ((1, "http://", 1), "control_url 'http://' is not an http(s) URL"),
    ],
)
def test_register_rejections(reg: Registry, args: tuple, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        reg.register_transceiver(*args)
    assert str(exc.value) == message
    assert reg.transceivers() == []


def test_silence_makes_unhealthy_and_heartbeat_restores(reg: Registry, clock: Clock) -> None:
    reg.register_transceiver(1, "http://a:1", 5)
    clock.now += 3.0
    assert reg.get_transceiver(1).healthy  # exactly at the timeout: still healthy
    clock.now += 0.01
    assert not reg.get_transceiver(1).healthy
    with pytest.raises(PlacementError, match=r"^no healthy transceiver \(1 registered\)$"):
        reg.place()
    reg.heartbeat(1)
    assert reg.get_transceiver(1).healthy
    assert reg.place().id == 1


def test_reported_unhealthy(reg: Registry) -> None:
    reg.register_transceiver(1, "http://a:1", 5)
    reg.heartbeat(1, healthy=False)
    assert not reg.transceivers()[0].healthy
    with pytest.raises(PlacementError):
        reg.place()
    reg.heartbeat(1, healthy=True)
    assert reg.place().id == 1


def test_heartbeat_unknown(reg: Registry) -> None:
    with pytest.raises(UnknownTransceiverError, match="^unknown transceiver 9$"):
        reg.heartbeat(9)
    with pytest.raises(LookupError):
        reg.get_transceiver(9)


def test_reregistration_updates_and_keeps_calls(reg: Registry, clock: Clock) -> None:
    reg.register_transceiver(1, "http://a:1", 5)
    call = _call(reg, 1)
    clock.now += 10
    t = reg.register_transceiver(1, "http://b:2", 7)
    assert (t.control_url, t.capacity, t.calls, t.healthy) == ("http://b:2", 7, 1, True)
    assert reg.get_call(call.conn_id) is call


# -- placement --------------------------------------------------------------


def test_place_errors(reg: Registry) -> None:
    with pytest.raises(PlacementError, match="^no transceiver is registered$"):
        reg.place()
    reg.register_transceiver(1, "http://a:1", 1)
    _call(reg, 1)
    with pytest.raises(PlacementError, match="^all 1 healthy transceivers are at capacity$"):
        reg.place()
    with pytest.raises(PlacementError, match="^no transceiver is registered$"):
        reg.place(exclude=[1])


def test_place_least_loaded(reg: Registry) -> None:
    reg.register_transceiver(1, "http://a:1", 10)
    reg.register_transceiver(2, "http://b:1", 10)
    picks = []
    for _ in range(6):
        t = reg.place()
        picks.append(t.id)
        _call(reg, t.id)
    assert picks == [1, 2, 1, 2, 1, 2]
    assert [t.calls for t in reg.transceivers()] == [3, 3]


def test_place_by_load_ratio_and_skips_full(reg: Registry) -> None:
    reg.register_transceiver(1, "http://a:1", 2)
    reg.register_transceiver(2, "http://b:1", 8)
    picks = []
    for _ in range(10):
        t = reg.place()
        picks.append(t.id)
        _call(reg, t.id)
    assert picks.count(1) == 2 and picks.count(2) == 8
    with pytest.raises(PlacementError, match="at capacity"):
        reg.place()


def test_placing_calls_count_towards_load(reg: Registry) -> None:
    # A burst of offers must spread before any transceiver has answered.
    reg.register_transceiver(1, "http://a:1", 10)
    reg.register_transceiver(2, "http://b:1", 10)
    first = _call(reg, reg.place().id, owner=None)
    assert first.state == "placing"
    assert reg.place().id != first.transceiver_id


def test_place_skips_unhealthy(reg: Registry, clock: Clock) -> None:
    reg.register_transceiver(1, "http://a:1", 10)
    reg.register_transceiver(2, "http://b:1", 10)
    _call(reg, 2)
    _call(reg, 2)
    reg.heartbeat(1, healthy=False)
    assert reg.place().id == 2


# -- calls ------------------------------------------------------------------


def test_allocate_conn_id_unique_nonzero_u32(reg: Registry) -> None:
    ids = [reg.allocate_conn_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(1 <= i <= 0xFFFFFFFF for i in ids)


def test_allocate_avoids_live_and_reserved(reg: Registry, monkeypatch) -> None:
    reg.register_transceiver(1, "http://a:1", 10)
    draws = iter([4, 4, 6, 6, 7])  # secrets.randbelow(...) + 1 -> 5, 5, 7, 7, 8
    monkeypatch.setattr("manager.relay.registry.secrets.randbelow", lambda n: next(draws))
    first = reg.allocate_conn_id()
    assert first == 5
    assert reg.allocate_conn_id() == 7  # 5 is reserved
    reg.add_call(conn_id=5, transceiver_id=1, client_ufrag="a", server_ufrag="b", owner=OWNER_A)
    assert reg.allocate_conn_id() == 8  # 5 live, 7 reserved


def test_call_lifecycle(reg: Registry) -> None:
    reg.register_transceiver(1, "http://a:1", 10)
    call = _call(reg, 1, owner=None)
    assert call.state == "placing" and call.owner is None
    assert len(call.call_id) == 32 and int(call.call_id, 16) >= 0  # 128 random bits
    assert reg.get_call(call.conn_id) is call
    assert reg.get_call_by_id(call.call_id) is call
    reg.activate(call.conn_id, OWNER_A)
    assert (call.state, call.owner) == ("active", OWNER_A)
    assert reg.calls() == [call]
    assert reg.get_transceiver(1).calls == 1

    ended = reg.end_call(call.conn_id, "client-hangup")
    assert ended is call
    assert (call.state, call.ended_reason) == ("ended", "client-hangup")
    assert reg.get_call(call.conn_id) is None
    assert reg.get_call_by_id(call.call_id) is None
    assert reg.calls() == []
    assert reg.get_transceiver(1).calls == 0
    assert reg.end_call(call.conn_id, "again") is None  # idempotent
    assert reg.get_transceiver(1).calls == 0


def test_call_to_dict(reg: Registry) -> None:
    reg.register_transceiver(3, "http://a:1", 10)
    call = _call(reg, 3, owner=OWNER_B)
    d = call.to_dict()
    assert d["owner"] == {"addr4": "10.0.0.3", "port4": 41000, "addr6": "fd00::3", "port6": 41000}
    assert (d["conn_id"], d["transceiver_id"], d["state"]) == (call.conn_id, 3, "active")


def test_add_call_rejections(reg: Registry) -> None:
    reg.register_transceiver(1, "http://a:1", 10)
    call = _call(reg, 1)
    with pytest.raises(ValueError, match=f"^connection id {call.conn_id} is already in use$"):
        reg.add_call(conn_id=call.conn_id, transceiver_id=1, client_ufrag="a", server_ufrag="b")
    with pytest.raises(ValueError, match=r"^connection id must be an integer in 1\.\.4294967295$"):
        reg.add_call(conn_id=0, transceiver_id=1, client_ufrag="a", server_ufrag="b")
    with pytest.raises(UnknownTransceiverError):
        reg.add_call(conn_id=12, transceiver_id=2, client_ufrag="a", server_ufrag="b")
    assert reg.get_transceiver(1).calls == 1


def test_activate_unknown(reg: Registry) -> None:
    with pytest.raises(UnknownCallError, match="no live call with connection id 77"):
        reg.activate(77, OWNER_A)


# -- ownership --------------------------------------------------------------


def test_set_owner_moves_call_and_load(reg: Registry) -> None:
    reg.register_transceiver(1, "http://a:1", 10)
    reg.register_transceiver(2, "http://b:1", 10)
    call = _call(reg, 1)
    reg.set_owner(call.conn_id, 2, OWNER_B)
    assert (call.transceiver_id, call.owner) == (2, OWNER_B)
    assert [t.calls for t in reg.transceivers()] == [0, 1]
    reg.end_call(call.conn_id, "done")
    assert [t.calls for t in reg.transceivers()] == [0, 0]


def test_set_owner_rejections(reg: Registry) -> None:
    reg.register_transceiver(1, "http://a:1", 10)
    call = _call(reg, 1)
    with pytest.raises(UnknownTransceiverError):
        reg.set_owner(call.conn_id, 5, OWNER_B)
    with pytest.raises(UnknownCallError):
        reg.set_owner(123, 1, OWNER_B)
    assert (call.transceiver_id, call.owner) == (1, OWNER_A)


# -- heartbeat reconciliation -----------------------------------------------


def test_heartbeat_ends_calls_the_transceiver_dropped(reg: Registry, clock: Clock) -> None:
    reg.register_transceiver(1, "http://a:1", 10)
    reg.register_transceiver(2, "http://b:1", 10)
    kept, dropped = _call(reg, 1), _call(reg, 1)
    other = _call(reg, 2)
    placing = _call(reg, 1, owner=None)
    ended: list[tuple[int, str]] = []
    reg.on_call_ended(lambda call, reason: ended.append((call.conn_id, reason)))
    clock.now += 1.0
    orphans = reg.heartbeat(1, calls=[kept.conn_id, 999], healthy=True)
    assert ended == [(dropped.conn_id, "transceiver-closed")]
    assert dropped.state == "ended"
    # Calls of another transceiver and calls still being placed are not touched.
    assert reg.get_call(other.conn_id) is other
    assert reg.get_call(placing.conn_id) is placing
    assert orphans == [999]
    assert reg.get_transceiver(1).calls == 2


def test_heartbeat_grace_for_new_owner(reg: Registry, clock: Clock) -> None:
    # A heartbeat composed before the call was taken must not end it.
    reg.register_transceiver(1, "http://a:1", 10)
    reg.register_transceiver(2, "http://b:1", 10)
    call = _call(reg, 1)
    clock.now += 0.5
    reg.heartbeat(1, calls=[])
    assert call.state == "active"
    clock.now += 0.5
    reg.set_owner(call.conn_id, 2, OWNER_B)  # migration restarts the grace
    clock.now += 0.5
    assert reg.heartbeat(2, calls=[]) == []
    assert call.state == "active"
    # The old owner still reporting the call makes it an orphan there.
    assert reg.heartbeat(1, calls=[call.conn_id]) == [call.conn_id]
    clock.now += 0.5
    reg.heartbeat(2, calls=[])
    assert (call.state, call.ended_reason) == ("ended", "transceiver-closed")


def test_heartbeat_without_calls_reconciles_nothing(reg: Registry, clock: Clock) -> None:
    reg.register_transceiver(1, "http://a:1", 10)
    call = _call(reg, 1)
    clock.now += 5
    assert reg.heartbeat(1, calls=None) == []
    assert call.state == "active"


# -- listeners --------------------------------------------------------------


def test_listeners_unsubscribe_and_isolation(reg: Registry, caplog) -> None:
    reg.register_transceiver(1, "http://a:1", 10)
    seen: list[str] = []

    def broken(call: Call, reason: str) -> None:
        raise RuntimeError("boom")

    reg.on_call_ended(broken)
    unsubscribe = reg.on_call_ended(lambda call, reason: seen.append(reason))
    reg.end_call(_call(reg, 1).conn_id, "first")
    assert seen == ["first"]  # ran despite the broken listener before it
    assert "call-ended listener failed" in caplog.text
    unsubscribe()
    unsubscribe()  # harmless twice
    reg.end_call(_call(reg, 1).conn_id, "second")
    assert seen == ["first"]


def test_listener_sees_ended_state(reg: Registry) -> None:
    reg.register_transceiver(1, "http://a:1", 10)
    states = []
    reg.on_call_ended(lambda call, reason: states.append((call.state, reg.get_call(call.conn_id))))
    reg.end_call(_call(reg, 1).conn_id, "x")
    assert states == [("ended", None)]


def test_constructor_rejections() -> None:
    with pytest.raises(ValueError, match="heartbeat_timeout must be positive"):
        Registry(heartbeat_timeout=0)
    with pytest.raises(ValueError, match="report_grace must not be negative"):
        Registry(report_grace=-1)


def test_draining_transceiver_takes_no_new_calls() -> None:
    reg = Registry()
    reg.register_transceiver(1, "http://10.0.0.2:8080", 5)
    reg.register_transceiver(2, "http://10.0.0.3:8080", 5)
    reg.set_draining(1)
    assert reg.place().id == 2
    reg.set_draining(2)
    with pytest.raises(PlacementError, match="all 2 healthy transceivers are draining"):
        reg.place()
    reg.set_draining(1, False)
    assert reg.place().id == 1


# -- replication: records from other relays ---------------------------------------


def test_a_record_naming_an_owner_outside_the_internal_prefixes_is_refused(reg: Registry) -> None:
    reg.register_transceiver(1, "http://10.0.0.2:8700", 10)
    call = _call(reg, 1)
    rec = {**call.record(), "owner": {"addr4": "203.0.113.66", "port4": 4000}, "gen": call.generation + 1}
    with pytest.raises(RefusedRecord, match="owner address 203.0.113.66 is not in the internal prefixes"):
        reg.apply_call(rec, allows=lambda addr: addr.startswith("10."))
    assert reg.get_call(call.conn_id).owner == OWNER_A  # unchanged
    other = {**rec, "conn_id": call.conn_id + 1, "call_id": "f" * 32}
    with pytest.raises(RefusedRecord):
        reg.apply_call(other, allows=lambda addr: addr.startswith("10."))
    assert reg.get_call(call.conn_id + 1) is None  # not taken in either


def test_an_older_record_does_not_move_a_call_back(reg: Registry) -> None:
    """A migration elsewhere raised the generation; a late copy of the record
    before it (a pub/sub message delivered after a resync) is refused."""
    reg.register_transceiver(1, "http://10.0.0.2:8700", 10)
    reg.register_transceiver(2, "http://10.0.0.3:8700", 10)
    call = _call(reg, 1)
    old = call.record()
    moved = {**old, "transceiver_id": 2, "owner": OWNER_B.to_dict(), "gen": old["gen"] + 1}
    assert reg.apply_call(moved) is not None
    assert call.owner == OWNER_B and call.transceiver_id == 2
    with pytest.raises(RefusedRecord, match=f"record of generation {old['gen']} is older than {old['gen'] + 1}"):
        reg.apply_call(old)
    assert call.owner == OWNER_B and call.transceiver_id == 2
    assert [t.calls for t in reg.transceivers()] == [0, 1]
    assert reg.apply_call(moved) is not None  # the same record again (a resync): taken
    reg.set_owner(call.conn_id, 1, OWNER_A)  # a move here raises it too
    assert call.record()["gen"] == old["gen"] + 2


def test_a_heartbeat_reconciles_only_its_transceivers_calls(reg: Registry, clock: Clock) -> None:
    """The registry indexes calls by transceiver: a heartbeat looks at the
    sender's calls, not at every call (10,000 calls on 10 transceivers: a
    heartbeat reads 1,000)."""
    for t in range(1, 11):
        reg.register_transceiver(t, f"http://10.0.0.{t}:8700", 2000)
    calls = {t: [_call(reg, t).conn_id for _ in range(1000)] for t in range(1, 11)}
    clock.now += 5.0
    examined = [0]

    class Counting(dict):  # counts the call records a heartbeat reads
        def __getitem__(self, key):
            examined[0] += 1
            return super().__getitem__(key)

        def get(self, key, default=None):
            examined[0] += 1
            return super().get(key, default)

        def values(self):
            examined[0] += len(self)
            return super().values()

    reg._calls = Counting(reg._calls)
    assert reg.heartbeat(3, calls[3][1:]) == []
    # Its own 1,000 calls, and the 999 it reported: not the 10,000.
    assert examined[0] <= 2000, examined
    assert reg.get_call(calls[3][0]) is None  # the dropped one ended
    assert reg.heartbeat(4, calls[4] + calls[5][:1]) == [calls[5][0]]  # another's call: an orphan to it
    reg.set_owner(calls[5][1], 4, OWNER_B)  # a move re-indexes it
    clock.now += 5.0
    assert reg.heartbeat(5, calls[5][2:]) == [] and reg.get_call(calls[5][1]) is not None
    assert reg.heartbeat(4, calls[4]) == [] and reg.get_call(calls[5][1]) is None
