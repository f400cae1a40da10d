"""Moving live calls between two loopback transceivers: the control API, state logs, loss counts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import ClientSession, web

from manager.transceiver.control import create_app
from manager.transceiver.transceiver import Transceiver
from tests.support.transceiver_calls import (
    ClientCall,
    _serve,
)

Addr = tuple[str, int]


class Api:
    """One transceiver's HTTP control API, as the relay's migration code calls it."""

    def __init__(self, http: ClientSession, url: str) -> None:
        self.http, self.url = http, url

    async def post(self, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.http.post(f"{self.url}{path}", json=body if body is not None else {}) as r:
            text = await r.text()
            return r.status, json.loads(text) if text else None

    async def get(self, path: str) -> Any:
        async with self.http.get(f"{self.url}{path}") as r:
            assert r.status == 200, await r.text()
            return await r.json()


async def serve(tx: Transceiver, http: ClientSession) -> tuple[web.AppRunner, Api]:
    runner, url = await _serve(create_app(tx))
    return runner, Api(http, url)


@contextlib.asynccontextmanager
async def two_transceivers(**options: Any):
    """Transceivers 1 and 2 on loopback, each with its control API: (tx_a, api_a, tx_b, api_b).
    ``options`` go to both Transceivers (an ``agent_factory``, ...)."""
    async with (
        Transceiver(1, capacity=2, **options) as tx_a,
        Transceiver(2, capacity=2, **options) as tx_b,
        ClientSession() as http,
    ):
        run_a, api_a = await serve(tx_a, http)
        run_b, api_b = await serve(tx_b, http)
        try:
            yield tx_a, api_a, tx_b, api_b
        finally:
            await run_a.cleanup()
            await run_b.cleanup()


def owner_addr(owner: dict[str, Any]) -> Addr:
    return (owner["addr4"], owner["port4"])


async def inbound_lost(client: ClientCall) -> int:
    stats = await client.pc.getStats()
    return next(s for s in stats.values() if s.type == "inbound-rtp").packetsLost


class StateLog:
    """Every state change of the client's peer connection after it connected."""

    def __init__(self, client: ClientCall) -> None:
        self.events: list[tuple[str, str]] = []
        pc = client.pc
        self.local_sdp = pc.localDescription.sdp
        self.remote_sdp = pc.remoteDescription.sdp
        for event, attr in (
            ("connectionstatechange", "connectionState"),
            ("iceconnectionstatechange", "iceConnectionState"),
            ("signalingstatechange", "signalingState"),
        ):
            pc.on(event, lambda attr=attr: self.events.append((attr, getattr(pc, attr))))

    def assert_untouched(self, client: ClientCall) -> None:
        pc = client.pc
        assert self.events == [], f"client state changed: {self.events}"
        assert pc.connectionState == "connected"
        assert pc.iceConnectionState in ("connected", "completed")
        assert pc.signalingState == "stable"
        # No offer/answer happened: both descriptions are the original ones.
        assert pc.localDescription.sdp == self.local_sdp
        assert pc.remoteDescription.sdp == self.remote_sdp


async def migrate(
    client: ClientCall, conn_id: int, src: Api, dst: Api, src_owner: Addr,
    before_flip: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Export+freeze on src, import on dst, flip the forwarder, activate, release.
    `before_flip(state)` runs between the import and the flip (nothing of the
    call has reached the new owner yet).

    Returns the exported state and measurements; asserts each step's status.
    """
    fwd = client.fwd
    assert fwd is not None and fwd.owner == src_owner
    # (earlier drops came from an old owner between its flip and its release)
    dropped_before = dict(fwd.not_owner)
    t_start = time.monotonic()
    status, state = await src.post(f"/calls/{conn_id}/export", {"freeze": True})
    assert status == 200, state
    t_frozen = time.monotonic()
    assert state["frozen"]["at"] > 0 and state["srtp"]["tx_key"]
    status, body = await dst.post("/calls/import", {"conn_id": conn_id, "state": state})
    assert status == 201, body
    t_imported = time.monotonic()
    new_owner = owner_addr(body["owner"])
    assert new_owner != src_owner
    # Ready but silent until the flip: anything it sent now would be dropped
    # by the relay and be a sequence gap at the client.
    await asyncio.sleep(0.05)  # nothing must go out: a window for a stray send to show
    info = await dst.get(f"/calls/{conn_id}")
    assert info["imported"] and info["migration"]["tx_packets"] == 0
    assert fwd.not_owner[new_owner] == dropped_before.get(new_owner, 0)
    if before_flip is not None:
        before_flip(state)
    lost_before = await inbound_lost(client)
    switch_index = len(fwd.to_client)
    t_switch = time.monotonic()
    fwd.owner = new_owner  # the relay's ownership flip
    status, _ = await dst.post(f"/calls/{conn_id}/activate")
    assert status == 204
    status, _ = await src.post(f"/calls/{conn_id}/release")
    assert status == 204
    return {
        "state": state,
        "owner": new_owner,
        "lost_before": lost_before,
        "switch_index": switch_index,
        "t_start": t_start,
        "t_frozen": t_frozen,
        "t_switch": t_switch,
        "export_s": t_frozen - t_start,
        "import_s": t_imported - t_frozen,
    }
