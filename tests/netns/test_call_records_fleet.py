"""Call records in a fleet, against a real redis-server: the account lives in
Redis, so a call placed and migrated on one relay, which then restarts, and
ended on another relay gets exactly one record in the capped stream, with
the move and its gap, both transceivers and both relays."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from manager.protocol.addresses import OwnerAddr
from manager.relay.call_journal import CallJournal
from manager.relay.call_records import RecordStream
from manager.relay.config import RegistryConfig
from manager.relay.fleet import RedisFleet
from manager.relay.registry import Registry
from tests.support.redis_server import RedisServer, registry_config
from tests.support.waiting import eventually_async

OWNER_A = OwnerAddr(addr4="10.10.2.2", port4=40000)
OWNER_B = OwnerAddr(addr4="10.10.3.2", port4=40001)
STREAM = "splitrelay:records"


class Relay:
    """A relay's registry, fleet link and journal (no kernel: no flows to count)."""

    def __init__(self, cfg: RegistryConfig, name: str) -> None:
        self.registry = Registry()
        self.fleet = RedisFleet(cfg, self.registry, relay_id=name)
        self.asked: list[tuple[int, int]] = []

        async def quality(tx: int, conn_id: int) -> dict:
            self.asked.append((tx, conn_id))
            return {"uplink": {"reports": 4, "loss_fraction": 0.01 * tx}, "downlink": {"reports": 4},
                    "mos": {"min": 4.0 + tx / 10, "min_at": 1.0, "avg": 4.3, "samples": 4}}

        self.journal = CallJournal(self.registry, relay_id=name, quality=quality, legs_of=lambda c: [],
                                   flow_counts=lambda leg: None, redis=self.fleet.new_client(),
                                   stream=RecordStream(self.fleet.new_client(), STREAM, cap=1000))

    async def __aenter__(self) -> Relay:
        assert await self.fleet.start(wait=5.0), self.fleet.last_error
        await self.journal.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.journal.stop()
        await self.fleet.stop()


def test_a_call_moved_restarted_and_ended_elsewhere_has_one_record(server: RedisServer, tmp_path: Path) -> None:
    cfg = registry_config(server, tmp_path)

    async def go() -> None:
        async with Relay(cfg, "r2") as b:
            async with Relay(cfg, "r1") as a:
                for tx in (1, 2):
                    a.registry.register_transceiver(tx, f"https://10.10.{tx + 1}.2:8443", 10)
                conn_id = a.registry.allocate_conn_id()
                call = a.registry.add_call(conn_id=conn_id, transceiver_id=1, client_ufrag="cli1",
                                           server_ufrag="srv1")
                a.registry.activate(conn_id, OWNER_A)
                a.journal.moved(conn_id, "migration", from_transceiver=1, to_transceiver=2, gap_s=0.015)
                a.registry.set_owner(conn_id, 2, OWNER_B)
                await eventually_async(lambda: (c := b.registry.get_call(conn_id)) is not None
                                       and c.transceiver_id == 2, 5, what="the moved call on r2")
                await eventually_async(lambda: (1, conn_id) in a.asked, 5, what="the old transceiver's figures")
                await a.journal._tasks.wait()
            # r1 restarts: its registry comes back from Redis, its account too.
            async with Relay(cfg, "r1") as a2:
                await eventually_async(lambda: a2.registry.get_call(conn_id) is not None, 5, what="r1 back")
                b.registry.end_call(conn_id, "client-hangup")  # the client hangs up at r2
                await eventually_async(lambda: a2.registry.get_call(conn_id) is None, 5, what="the end on r1")
                await b.journal._tasks.wait()
                await a2.journal._tasks.wait()
                assert a2.journal.written == 0  # r2 ended it: r2 writes
            records = await b.journal.stream.read()
        assert len(records) == 1 and b.journal.written == 1
        (rec,) = records
        assert rec.call_id == call.call_id and rec.end_reason == "client-hangup"
        assert rec.created_at == call.created and rec.transceivers == [1, 2]
        assert sorted(rec.relays) == ["r1", "r2"]
        assert [(m.kind, m.from_transceiver, m.to_transceiver, m.gap_ms) for m in rec.moves] == [
            ("migration", 1, 2, 15.0)]
        assert rec.path.uplink.loss_fraction == pytest.approx(0.015)  # both transceivers' figures, 4 reports each
        assert rec.mos.min == 4.1
        assert server.raw().keys("splitrelay:account:*") == []  # closed accounts leave nothing behind
        assert server.raw().xlen(STREAM) == 1

    asyncio.run(go())
