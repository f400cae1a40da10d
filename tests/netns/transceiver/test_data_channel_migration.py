"""Data channels across live migrations, transceiver side (no kernel): an
unmodified aiortc client with audio and an ordered, reliable data channel
moves A→B→A three times over the HTTP control API, as the relay drives it.
Each side sends a numbered message every 20 ms; every message must arrive
exactly once and in order, the audio lose at most one packet per switch,
and the client see no ICE restart and no second offer/answer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp import ClientSession

from manager.transceiver.agent import AgentSession, CallEnded, EchoAgent
from manager.transceiver.transceiver import Transceiver
from tests.support.transceiver_calls import (
    UFRAG_A,
    ClientCall,
    run,
)
from tests.support.transceiver_migration import (
    StateLog,
    inbound_lost,
    migrate,
    owner_addr,
    serve,
)
from tests.support.waiting import eventually_async

# realtime: the checks count media against the wall clock.
pytestmark = pytest.mark.realtime

TICK = 0.020


class TickerAgent(EchoAgent):
    """Echoes what it hears and sends "s:<n>" every 20 ms; n continues across migrations."""

    def __init__(self) -> None:
        super().__init__()
        self.next_tick = 0

    async def run(self, session: AgentSession) -> None:
        async def tick() -> None:
            try:
                while True:
                    await session.send_message(f"s:{self.next_tick}")
                    self.next_tick += 1
                    await asyncio.sleep(TICK)  # pacing
            except CallEnded:
                pass

        ticker = asyncio.ensure_future(tick())
        try:
            await super().run(session)
        finally:
            ticker.cancel()

    def export_state(self) -> dict[str, Any]:
        return {**super().export_state(), "next_tick": self.next_tick}

    def import_state(self, state: dict[str, Any]) -> None:
        super().import_state(state)
        self.next_tick = int(state.get("next_tick", 0))


class Numbered:
    """The client's side: sends "c:<n>" every 20 ms, records what comes back with arrival times."""

    def __init__(self, client: ClientCall) -> None:
        self.client = client
        client.dc.remove_all_listeners("message")  # these messages replace the client's own echo queue
        self.sent: list[float] = []  # send time of c:<index>
        self.echoes: list[tuple[int, float]] = []
        self.ticks: list[tuple[int, float]] = []
        self._task: asyncio.Task[None] | None = None
        client.dc.on("message", self._received)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._send())

    def _received(self, msg: Any) -> None:
        kind, _, n = str(msg).partition(":")
        if kind == "c":
            self.echoes.append((int(n), time.monotonic()))
        elif kind == "s":
            self.ticks.append((int(n), time.monotonic()))

    async def _send(self) -> None:
        while True:
            self.client.dc.send(f"c:{len(self.sent)}")
            self.sent.append(time.monotonic())
            await asyncio.sleep(TICK)  # pacing

    async def flowing(self, n: int = 10) -> None:
        """Until n echoes and n of the agent's ticks have arrived."""
        await eventually_async(lambda: len(self.echoes) >= n and len(self.ticks) >= n, 5,
                               what=f"{n} messages each way")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def finish(self) -> int:
        """Stop sending, wait for every echo; check both ways arrived exactly once, in order."""
        self.stop()
        sent = len(self.sent)
        await eventually_async(lambda: len(self.echoes) >= sent, 5, "every echo back")
        # Client → agent → client: every message exactly once, in order.
        assert [n for n, _ in self.echoes] == list(range(sent))
        # Agent → client, numbered across owners: no gap, no repeat, in order.
        ticks = [n for n, _ in self.ticks]
        assert ticks == list(range(len(ticks))), ticks[:5]
        return sent

    def worst_echo_delay(self, since: float, until: float) -> float:
        sent = dict(enumerate(self.sent))
        return max((t - sent[n] for n, t in self.echoes if since <= sent[n] <= until), default=0.0)


@pytest.mark.usefixtures("fast_consent")
def test_data_channel_continues_across_three_round_trips() -> None:
    async def scenario() -> None:
        async with (
            Transceiver(1, capacity=2, agent_factory=TickerAgent) as tx_a,
            Transceiver(2, capacity=2, agent_factory=TickerAgent) as tx_b,
            ClientSession() as http,
        ):
            run_a, api_a = await serve(tx_a, http)
            run_b, api_b = await serve(tx_b, http)
            client = ClientCall(440)
            numbered = Numbered(client)
            try:
                await client.place(tx_a, 42, UFRAG_A)
                await client.wait_connected()
                numbered.start()
                await numbered.flowing()
                log = StateLog(client)
                owners = [(api_a, owner_addr(tx_a.owner)), (api_b, owner_addr(tx_b.owner))]
                switches = []
                for i in range(6):  # A→B, B→A, three times
                    (src, src_owner), (dst, _) = owners[i % 2], owners[(i + 1) % 2]
                    m = await migrate(client, 42, src, dst, src_owner)
                    state = m["state"]
                    assert state["sctp"]["association"] is not None, state["sctp"]
                    assert state["dtls"]["record"]["epoch"] == 1

                    async def carried(dst=dst, m=m) -> dict:
                        data = (await dst.get("/calls/42"))["migration"]["data_channels"]
                        audio = len(client.fwd.to_client) - m["switch_index"]
                        return data if data["rx_records"] > 10 and audio >= 10 else {}

                    data = await eventually_async(carried, 5, what="the new owner carrying the data channel "
                                                  "(> 10 records) and 10 audio packets")
                    assert data["rx_unauthenticated"] == 0, data
                    lost = await inbound_lost(client) - m["lost_before"]
                    assert lost <= 1, f"switch {i + 1}: the client lost {lost} audio packets"
                    switches.append({"switch": i + 1, "audio_lost": lost,
                                     "worst_echo_delay_s": round(numbered.worst_echo_delay(
                                         m["t_start"] - 0.1, m["t_switch"] + 0.1), 3)})
                await eventually_async(lambda: len(numbered.ticks) > 150, 10, what="150 of the agent's messages")
                sent = await numbered.finish()
                await asyncio.sleep(0.3)  # a window for a late state change to show
                log.assert_untouched(client)
                print(f"\n{sent} messages each way over 6 switches; per switch: {switches}")
            finally:
                numbered.stop()
                await client.close()
                await run_a.cleanup()
                await run_b.cleanup()

    run(scenario(), timeout=60)


@pytest.mark.usefixtures("fast_consent")
@pytest.mark.parametrize("media_engine", [False, True], ids=["aiortc", "engine"])
def test_a_migration_given_up_loses_no_message(media_engine: bool) -> None:
    """Export with freeze, then unfreeze (the import failed): what either side
    sent while the call was frozen arrives once, in order, soon after."""

    async def scenario() -> None:
        async with (Transceiver(1, capacity=2, agent_factory=TickerAgent, media_engine=media_engine) as tx_a,
                    ClientSession() as http):
            run_a, api_a = await serve(tx_a, http)
            client = ClientCall(440)
            numbered = Numbered(client)
            try:
                await client.place(tx_a, 42, UFRAG_A)
                await client.wait_connected()
                numbered.start()
                await numbered.flowing()
                status, _ = await api_a.post("/calls/42/export", {"freeze": True})
                assert status == 200
                frozen_at = time.monotonic()
                sent_at_freeze, ticks_at_freeze = len(numbered.sent), len(numbered.ticks)
                await eventually_async(lambda: len(numbered.sent) - sent_at_freeze >= 20,
                                       what="20 messages each way to meet the freeze")
                status, _ = await api_a.post("/calls/42/unfreeze")
                assert status == 204
                info = (await api_a.get("/calls/42"))["migration"]
                # What the call's DTLS did not send while frozen (aiortc's or the engine's).
                held = info["data_channels"]["tx_held"] if media_engine else info["dtls_frozen_dropped"]
                assert held > 0, info
                # The agent's ~20 from the freeze, then more: what it sent frozen came through.
                await eventually_async(lambda: len(numbered.ticks) - ticks_at_freeze >= 25, 5,
                                       what="the agent's messages from the freeze delivered")
                sent = await numbered.finish()
                delay = numbered.worst_echo_delay(frozen_at, frozen_at + 0.4)
                print(f"\nfrozen 0.4 s and given up: {sent} messages each way, worst echo delay {delay:.3f} s")
            finally:
                numbered.stop()
                await client.close()
                await run_a.cleanup()

    run(scenario(), timeout=30)
