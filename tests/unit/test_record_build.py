"""A call's record from its account: the path's figures from every transceiver
it lived on, the kernel's counters on the client hop, loss located per hop,
MOS, connect time and first audio; and a call whose relay restarted (alone)
gets one record, from the accounts relayd kept in its state file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from manager.protocol.addresses import OwnerAddr
from manager.relay.call_journal import Account, CallJournal
from manager.relay.call_records import RecordFile, read_file
from manager.relay.record_build import build_record
from manager.relay.registry import Registry
from manager.relay.slowpath.legs import Leg
from tests.support.waiting import eventually_async


def figures(*, up_loss: float, down_loss: float, reports: int, mos_min: float, mos_avg: float, at: float,
            created: float = 100.0) -> dict:
    return {"uplink": {"reports": reports, "loss_fraction": up_loss, "cumulative_lost": 5, "jitter_ms": 3.0},
            "downlink": {"reports": reports, "loss_fraction": down_loss, "cumulative_lost": 1, "jitter_ms": 1.0},
            "rtt_ms": 42.0, "mos": {"min": mos_min, "min_at": at, "avg": mos_avg, "samples": reports},
            "created_at": created, "connected_at": created + 0.4, "first_rtp_sent_at": created + 0.6}


def account() -> Account:
    return Account("c" * 32, 7, 100.0, transceivers=[1, 2], relays=["r1"],
                   moves=[{"kind": "migration", "at": 150.0, "from_transceiver": 1, "to_transceiver": 2,
                           "gap_ms": 12.5}],
                   client={"family": "ipv4", "transport": "udp", "address": "198.51.100.23"},
                   figures={"1": figures(up_loss=0.02, down_loss=0.0, reports=10, mos_min=4.1, mos_avg=4.3, at=120),
                            "2": figures(up_loss=0.05, down_loss=0.01, reports=30, mos_min=3.6, mos_avg=4.0, at=170)})


def test_the_path_joins_every_transceiver_and_the_client_hop_is_the_kernels():
    acc = account()
    acc.flows = {"a": [1000, 120000, 990, 110000], "b": [10, 1200, 0, 0]}
    r = build_record(acc, "client-hangup", 200.0, anonymise="prefix")
    assert r.path.uplink.loss_fraction == pytest.approx((0.02 * 10 + 0.05 * 30) / 40)
    assert r.path.downlink.loss_fraction == pytest.approx(0.0075) and r.path.rtt_ms == 42.0
    assert r.path.uplink.jitter_ms == 3.0 and r.path.uplink.lost == 10
    assert (r.client_relay.uplink.packets, r.client_relay.uplink.bytes) == (1010, 121200)
    assert (r.client_relay.downlink.packets, r.client_relay.downlink.bytes) == (990, 110000)
    assert r.client_relay.uplink.loss_fraction is None  # no sequence accounting in these counters
    assert r.relay_transceiver.uplink.loss_fraction is None
    assert (r.mos.min, r.mos.min_at, r.mos.avg) == (3.6, 170, pytest.approx((4.3 * 10 + 4.0 * 30) / 40, abs=0.01))
    assert r.connect_ms == pytest.approx(400.0) and r.first_audio_ms == pytest.approx(600.0)
    assert r.client.address == "198.51.100.0/24" and r.moves[0].gap_ms == 12.5
    assert r.transceivers == [1, 2] and r.end_reason == "client-hangup"


def test_kernel_sequence_accounting_locates_loss_per_hop_both_ways():
    acc = account()
    acc.figures = {"1": figures(up_loss=0.04, down_loss=0.03, reports=10, mos_min=4, mos_avg=4, at=1)}
    acc.transceivers = [1]
    # 3 % of the client's RTP lost before the relay; 1 % of the transceiver's before the relay.
    acc.flows = {"a": [970, 97000, 990, 100000, 1000, 30, 2500, 1000, 10, 1200]}
    r = build_record(acc, "client-hangup", 200.0)
    assert r.client_relay.uplink.loss_fraction == pytest.approx(0.03)
    assert r.client_relay.uplink.jitter_ms == 2.5 and r.client_relay.uplink.packets == 970
    assert r.relay_transceiver.downlink.loss_fraction == pytest.approx(0.01)
    assert r.relay_transceiver.downlink.jitter_ms == 1.2 and r.client_relay.downlink.packets == 990
    # The path's loss each way, less the part measured at the relay, is the other hop's.
    assert r.relay_transceiver.uplink.loss_fraction == pytest.approx(1 - 0.96 / 0.97, abs=1e-4)
    assert r.client_relay.downlink.loss_fraction == pytest.approx(1 - 0.97 / 0.99, abs=1e-4)


def test_anonymise_none_leaves_the_address_out():
    assert build_record(account(), "x", 200.0, anonymise="none").client.address is None
    assert build_record(account(), "x", 200.0, anonymise="full").client.address == "198.51.100.23"


def _journal(registry: Registry, path: Path, legs: dict[int, list], written: list) -> CallJournal:
    async def quality(tx: int, conn_id: int) -> dict | None:
        return figures(up_loss=0.0, down_loss=0.0, reports=5, mos_min=4.4, mos_avg=4.4, at=1.0)

    return CallJournal(registry, relay_id="local", quality=quality, legs_of=lambda c: legs.get(c, []),
                       flow_counts=lambda leg: None, file=RecordFile(path), state_path=path.with_suffix(".open"),
                       observe=written.append)


def test_a_call_spanning_a_restart_alone_gets_one_record(tmp_path: Path):
    path = tmp_path / "records.jsonl"

    async def go() -> None:
        reg = Registry()
        reg.register_transceiver(1, "https://10.0.0.2:8443", 10)
        legs: dict[int, list] = {}
        first: list = []
        j1 = _journal(reg, path, legs, first)
        await j1.start()
        call = reg.add_call(conn_id=5, transceiver_id=1, client_ufrag="abcd", server_ufrag="efgh",
                            owner=OwnerAddr(addr4="10.0.0.2", port4=4000))
        j1.moved(5, "migration", from_transceiver=1, to_transceiver=1, gap_s=0.02)
        await j1.stop()  # relayd stops; the call goes on in the kernel
        assert first == [] and json.loads(path.with_suffix(".open").read_text())["accounts"][0]["conn_id"] == 5

        reg2 = Registry()  # alone, a restarted relayd knows no calls
        legs2: dict[int, list] = {5: [Leg(client=("198.51.100.23", 5000), vip=("203.0.113.1", 3478), conn_id=5,
                                          flow_port=40000)]}
        second: list = []
        j2 = _journal(reg2, path, legs2, second)
        await j2.start()
        assert j2.carried == {5}
        j2.sample()
        assert second == []  # its flows still run
        legs2.clear()  # they idled out
        j2.sample()
        await j2._tasks.wait()
        j2.sample()
        await j2.stop()
        (rec,) = second
        assert rec.call_id == call.call_id and rec.end_reason == "idle-timeout" and rec.created_at == call.created
        assert [m.gap_ms for m in rec.moves] == [20.0] and rec.mos.min == 4.4
        assert rec.client.family == "ipv4" and rec.client.transport == "udp" and rec.client.address == "198.51.100.23"
        assert [r.call_id for r in read_file(path)] == [call.call_id]

    asyncio.run(go())


def test_a_killed_relay_left_its_open_calls_in_the_state_file(tmp_path: Path):
    """No stop: the file written while it ran is what the next run takes back,
    and it goes when the last open call has ended."""
    path = tmp_path / "records.jsonl"
    state = path.with_suffix(".open")

    def held() -> list[int]:
        return [a["conn_id"] for a in json.loads(state.read_text())["accounts"]] if state.exists() else []

    async def go() -> None:
        reg = Registry()
        reg.register_transceiver(1, "https://10.0.0.2:8443", 10)
        j1 = _journal(reg, path, {}, [])
        await j1.start()
        for conn_id in (5, 6):
            reg.add_call(conn_id=conn_id, transceiver_id=1, client_ufrag="abcd", server_ufrag=f"efg{conn_id}",
                         owner=OwnerAddr(addr4="10.0.0.2", port4=4000))
        await eventually_async(lambda: held() == [5, 6], what="both open calls in the state file")
        reg.end_call(6, "client-hangup")
        await eventually_async(lambda: held() == [5], what="the ended call out of the state file")
        j1._checkpointer.cancel()  # killed: nothing more is written
        j1._sampler.cancel()

        j2 = _journal(Registry(), path, {}, [])
        await j2.start()
        assert j2.carried == {5}
        j2.sample()  # its flows are gone: it ends, and the file with it
        await j2._tasks.wait()
        await eventually_async(lambda: not state.exists(), what="the state file gone with the last open call")
        await j2.stop()
        assert [r.end_reason for r in read_file(path)] == ["client-hangup", "idle-timeout"]

    asyncio.run(go())


def test_a_call_ended_here_is_written_once_with_its_end_reason(tmp_path: Path):
    path = tmp_path / "records.jsonl"

    async def go() -> None:
        reg = Registry()
        reg.register_transceiver(1, "https://10.0.0.2:8443", 10)
        written: list = []
        j = _journal(reg, path, {}, written)
        await j.start()
        call = reg.add_call(conn_id=9, transceiver_id=1, client_ufrag="abcd", server_ufrag="efgh",
                            owner=OwnerAddr(addr4="10.0.0.2", port4=4000))
        reg.end_call(9, "client-hangup")
        reg.end_call(9, "client-hangup")  # idempotent end: still one record
        await j._tasks.wait()
        await j.stop()
        assert [(r.call_id, r.end_reason) for r in written] == [(call.call_id, "client-hangup")]
        assert written[0].connect_ms == pytest.approx((100.4 - call.created) * 1000)  # the figures' clock
        assert not path.with_suffix(".open").exists()  # nothing open to keep

    asyncio.run(go())


def _flow(seen: float, up: tuple[int, int, int], down: tuple[int, int, int] = (0, 0, 0)) -> list:
    """A flow's counts with sequence parts: (ssrc, first, highest) each way, every packet received."""
    def way(ssrc: int, first: int, highest: int) -> tuple[int, int, int]:
        expected = highest - first + 1 if ssrc else 0
        return expected, ssrc, highest
    ue, us, uh = way(*up)
    de, ds, dh = way(*down)
    return [ue, ue * 100, de, de * 100, ue, 0, 500, de, 0, 0, us, uh, ue, ds, dh, de, seen]


def test_a_stream_split_over_two_flows_is_one_stream():
    """A client that sends over one pair, then another, and back: per flow,
    the packets that went by the other would count as lost; together none is."""
    acc = account()
    acc.flows = {"v6": _flow(1.0, (7, 100, 349)),  # 100-199 and 250-349 here...
                 "v4": _flow(2.0, (7, 200, 249))}  # ...200-249 there
    acc.flows["v6"][12] = 200  # received: the v6 flow saw 200 of its 250
    acc.flows["v6"][4], acc.flows["v6"][5] = 250, 50  # its own view: 50 lost
    r = build_record(acc, "x", 200.0)
    assert (r.client_relay.uplink.expected, r.client_relay.uplink.lost) == (250, 0)
    assert r.client_relay.uplink.loss_fraction == 0


def test_flows_across_a_sequence_wrap_and_other_ssrcs():
    acc = account()
    # The first flow ends at 65536 + 9 (wrapped once); the second starts at 10 in its own count.
    acc.flows = {"a": _flow(1.0, (7, 65000, 65545)), "b": _flow(2.0, (7, 10, 60)),
                 "c": _flow(3.0, (9, 5, 14))}  # another stream: its own range
    r = build_record(acc, "x", 200.0)
    assert r.client_relay.uplink.expected == 546 + 51 + 10 and r.client_relay.uplink.lost == 0


def test_old_accounts_without_sequence_parts_still_add_up():
    acc = account()
    acc.flows = {"a": [100, 10000, 100, 10000, 100, 3, 1000, 100, 1, 500]}
    r = build_record(acc, "x", 200.0)
    assert (r.client_relay.uplink.expected, r.client_relay.uplink.lost) == (100, 3)


def test_rtt_per_hop_from_the_relays_check_timing_and_the_paths_rtcp():
    acc = account()
    assert build_record(acc, "x", 200.0).relay_transceiver.rtt_ms is None  # not timed: not guessed
    acc.owner_rtt_ms = 2.5
    r = build_record(acc, "x", 200.0)
    assert r.relay_transceiver.rtt_ms == 2.5 and r.path.rtt_ms == 42.0 and r.client_relay.rtt_ms == 39.5
    # An account saved before it had the field still reads.
    assert Account.from_dict({k: v for k, v in account().to_dict().items() if k != "owner_rtt_ms"}).owner_rtt_ms is None
