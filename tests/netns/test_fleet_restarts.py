"""The ICE restart storm limit is the fleet's: a client that PATCHes its
restarts to one relay after another (the relays share a real redis-server)
meets one count per call, not one per relay; while Redis is away each relay
still bounds restarts by its own count."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from aiohttp.test_utils import TestClient, TestServer
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import AudioStreamTrack

from manager.relay.config import LimitsConfig
from manager.relay.fleet import RedisFleet
from manager.relay.registry import Registry
from manager.relay.signaling import make_app
from manager.relay.transceiver_client import TransceiverClient
from tests.support.redis_server import registry_config
from tests.support.signaling import KEY, PUBLIC, RESTART, RESTART_PWD, SDP, FakeTransceiver, problem, run, sdpfrag
from tests.support.waiting import eventually_async

LIMIT = 3


def fragment(ufrag: str) -> str:
    return sdpfrag(ufrag, RESTART_PWD, media=False)


@asynccontextmanager
async def relays(cfg, *, shared: bool = True) -> AsyncIterator[tuple[list[TestClient], list[Registry], FakeTransceiver]]:
    """Two relays' signaling apps, each with its registry and fleet link to
    the one Redis, and a transceiver stand-in registered on the first."""
    async with AsyncExitStack() as stack:
        fake = FakeTransceiver(1)
        await fake.start()
        stack.push_async_callback(fake.close)
        client = TransceiverClient(timeout=5.0)
        stack.push_async_callback(client.close)
        https, registries = [], []
        for name in ("relay-a", "relay-b"):
            registry = Registry(report_grace=0.0, heartbeat_timeout=3600.0)
            fleet = RedisFleet(cfg, registry, relay_id=name)
            assert await fleet.start(wait=5.0), fleet.last_error
            stack.push_async_callback(fleet.stop)
            app = make_app(registry, hint_key=KEY, public_addrs=PUBLIC, transceiver_client=client,
                           limits=LimitsConfig(max_ice_restarts_per_minute=LIMIT), claim_conn_id=fleet.claim_conn_id,
                           shared_restarts=fleet.take_restart if shared else None)
            http = TestClient(TestServer(app))
            await http.start_server()
            stack.push_async_callback(http.close)
            https.append(http)
            registries.append(registry)
        registries[0].register_transceiver(1, fake.url, 10)
        yield https, registries, fake


async def _place(https: list[TestClient], registries: list[Registry], stack: AsyncExitStack) -> str:
    await eventually_async(lambda: registries[1].transceivers(), 5, what="relay B knowing the transceiver",
                           interval=0.02)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    stack.push_async_callback(pc.close)
    pc.addTrack(AudioStreamTrack())
    await pc.setLocalDescription(await pc.createOffer())
    resp = await https[0].post("/v1/calls", data=pc.localDescription.sdp, headers=SDP)
    assert resp.status == 201, await resp.text()
    location = resp.headers["Location"]
    await eventually_async(lambda: registries[1].calls(), 5, what="relay B knowing the call", interval=0.02)
    return location


def test_restarts_spread_over_relays_meet_one_count(server, tmp_path) -> None:
    async def scenario() -> None:
        async with relays(registry_config(server, tmp_path)) as (https, registries, fake), AsyncExitStack() as stack:
            location = await _place(https, registries, stack)
            # Alternating relays: A, B, A within the limit, then B is the fourth of the call's minute.
            for i in range(LIMIT):
                resp = await https[i % 2].patch(location, data=fragment(f"client{i}new"), headers=RESTART)
                assert resp.status == 200, await resp.text()
            # The last restart reached the other relay through Redis too: one ufrag fleet-wide.
            await eventually_async(lambda: len({r.calls()[0].server_ufrag for r in registries}) == 1, 5,
                                   what="both relays holding the last restart's ufrag", interval=0.02)
            before = registries[1].calls()[0].server_ufrag
            resp = await https[LIMIT % 2].patch(location, data=fragment("client9new"), headers=RESTART)
            body = await problem(resp, 429)
            assert body["code"] == "restart-storm" and int(resp.headers["Retry-After"]) >= 1, body
            # Refused before the owner was asked; the call as it was.
            assert len(fake.restarts) == LIMIT
            assert registries[1].calls()[0].server_ufrag == before
            # The count lives in Redis, per call, and ages out with the window.
            (call,) = registries[0].calls()
            raw = server.raw()
            assert raw.zcard(f"splitrelay:restarts:{call.call_id}") == LIMIT
            assert 0 < raw.ttl(f"splitrelay:restarts:{call.call_id}") <= 60

    run(scenario)


def test_while_redis_is_away_each_relay_bounds_restarts_by_its_own_count(server, tmp_path) -> None:
    async def scenario() -> None:
        async with relays(registry_config(server, tmp_path)) as (https, registries, fake), AsyncExitStack() as stack:
            location = await _place(https, registries, stack)
            server.stop()
            statuses = []
            for i in range(LIMIT + 1):
                resp = await https[0].patch(location, data=fragment(f"client{i}new"), headers=RESTART)
                statuses.append(resp.status)
            assert statuses == [200] * LIMIT + [429], statuses

    run(scenario)
