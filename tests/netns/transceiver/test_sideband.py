"""The Realtime-style sideband across a live migration: an application's
websocket on relayd's public listener (GET /v1/realtime?call_id=...) sends
numbered events to the call's agent on real loopback transceivers and gets
the agent's replies, while the call moves A→B→A as the relay drives it. Every
event must reach an agent exactly once and in order, and the agent's count
must continue (its state moved with the call)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import ClientSession, WSMsgType, web

from manager.protocol.addresses import OwnerAddr
from manager.protocol.client_auth import credential_digest, mint_token
from manager.relay.credentials import ClientAuth
from manager.relay.registry import Registry
from manager.relay.signaling import make_app
from manager.relay.transceiver_client import TransceiverClient
from manager.transceiver.agent import AgentSession, CallEnded, EchoAgent
from manager.transceiver.transceiver import Transceiver
from tests.support.transceiver_calls import UFRAG_A, ClientCall, run
from tests.support.transceiver_migration import migrate, owner_addr, serve
from tests.support.waiting import eventually_async

pytestmark = pytest.mark.realtime

KEY = b"k" * 32
TOKEN_KEY = b"t" * 32
PUBLIC = [("203.0.113.7", 3478)]


class EventAgent(EchoAgent):
    """Echoes audio and messages, and answers each sideband event with its running count."""

    def __init__(self) -> None:
        super().__init__()
        self.events = 0

    async def run(self, session: AgentSession) -> None:
        async def answer() -> None:
            try:
                while True:
                    event = await session.recv_event()
                    self.events += 1
                    await session.send_event({"type": "reply", "n": event.get("n"), "count": self.events})
            except CallEnded:
                pass

        task = asyncio.ensure_future(answer())
        try:
            await super().run(session)
        finally:
            task.cancel()

    def export_state(self) -> dict[str, Any]:
        return {**super().export_state(), "events": self.events}

    def import_state(self, state: dict[str, Any]) -> None:
        super().import_state(state)
        self.events = int(state.get("events", 0))


@pytest.mark.usefixtures("fast_consent")
def test_sideband_events_flow_before_during_and_after_live_migrations() -> None:
    async def scenario() -> None:
        async with (
            Transceiver(1, capacity=2, agent_factory=EventAgent) as tx_a,
            Transceiver(2, capacity=2, agent_factory=EventAgent) as tx_b,
            ClientSession() as http,
        ):
            run_a, api_a = await serve(tx_a, http)
            run_b, api_b = await serve(tx_b, http)
            registry = Registry(report_grace=0.0, heartbeat_timeout=3600.0)
            registry.register_transceiver(1, api_a.url, 2)
            registry.register_transceiver(2, api_b.url, 2)
            relay_client = TransceiverClient()
            auth = ClientAuth("tokens", token_key=TOKEN_KEY)
            app = make_app(registry, hint_key=KEY, public_addrs=PUBLIC, transceiver_client=relay_client, auth=auth)
            relay_run = web.AppRunner(app)
            await relay_run.setup()
            site = web.TCPSite(relay_run, "127.0.0.1", 0)
            await site.start()
            relay_url = f"http://127.0.0.1:{relay_run.addresses[0][1]}"
            client = ClientCall(440)
            sender: asyncio.Task[None] | None = None
            try:
                await client.place(tx_a, 42, UFRAG_A)
                await client.wait_connected()
                token = mint_token(TOKEN_KEY, ttl=60, subject="app")
                call = registry.add_call(conn_id=42, transceiver_id=1, client_ufrag="clientufrag",
                                         server_ufrag=UFRAG_A, owner=OwnerAddr(*owner_addr(tx_a.owner)),
                                         credential=credential_digest(token))
                url = f"{relay_url}/v1/realtime?call_id={call.call_id}"

                # Without the call's credential: 401, and no socket.
                async with http.get(url, headers={"Connection": "Upgrade", "Upgrade": "websocket"}) as resp:
                    assert resp.status == 401
                    assert resp.content_type == "application/problem+json"
                other = mint_token(TOKEN_KEY, ttl=60, subject="other")
                async with http.get(url, headers={"Authorization": f"Bearer {other}"}) as resp:
                    assert resp.status == 401

                ws = await http.ws_connect(url, headers={"Authorization": f"Bearer {token}"})
                replies: list[dict] = []

                async def read() -> None:
                    async for msg in ws:
                        if msg.type == WSMsgType.TEXT:
                            replies.append(json.loads(msg.data))

                reader = asyncio.ensure_future(read())
                sent = 0

                async def send_forever() -> None:
                    nonlocal sent
                    while True:
                        await ws.send_json({"type": "ping", "n": sent})
                        sent += 1
                        await asyncio.sleep(0.02)  # pacing: events keep coming through the migrations

                sender = asyncio.ensure_future(send_forever())
                await eventually_async(lambda: len(replies) >= 10, 5, what="10 replies from transceiver A's agent")
                owners = [(api_a, owner_addr(tx_a.owner), 1), (api_b, owner_addr(tx_b.owner), 2)]
                for i in range(2):  # A→B, then B→A
                    (src, src_owner, _), (dst, _, dst_id) = owners[i % 2], owners[(i + 1) % 2]
                    before = len(replies)
                    m = await migrate(client, 42, src, dst, src_owner)
                    registry.set_owner(42, dst_id, OwnerAddr(*m["owner"]))
                    await eventually_async(lambda b=before: len(replies) >= b + 20, 10,
                                           what=f"20 replies after migration {i + 1}")
                sender.cancel()
                total = sent
                await eventually_async(lambda: len(replies) >= total, 10, what="a reply to every event")
                assert [r["n"] for r in replies] == list(range(total)), [r["n"] for r in replies][:40]
                assert [r["count"] for r in replies] == list(range(1, total + 1))
                print(f"\n{total} sideband events over 2 live migrations, each answered once, in order")

                # The call ends: the socket closes with 1000.
                async with http.delete(f"{relay_url}/v1/calls/{call.call_id}",
                                       headers={"Authorization": f"Bearer {token}"}) as resp:
                    assert resp.status == 204
                await asyncio.wait_for(reader, 10)
                assert ws.close_code == 1000
            finally:
                if sender is not None:
                    sender.cancel()
                await client.close()
                await relay_run.cleanup()
                await relay_client.close()
                await run_a.cleanup()
                await run_b.cleanup()

    run(scenario(), timeout=60)
