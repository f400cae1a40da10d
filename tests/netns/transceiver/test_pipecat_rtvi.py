"""RTVI through a real call to the Pipecat bot, across a live migration.

An unmodified aiortc client (through the userspace relay stand-in) speaks
RTVI as Pipecat's clients do: its `client-ready` gets `bot-ready`, and the
bot's events (`bot-started-speaking`, its `server-message` a turn) reach it.
After the call moves to a second transceiver, the client says nothing more in
RTVI and still gets the new bot's events (the handshake moved with the call)
and no second `bot-ready`; its plain messages are answered as before.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest

from tests.support.pipecat_bot import load_bot, rtvi
from tests.support.speech import SpeechTrack, speech_wav, wav_samples
from tests.support.transceiver_calls import UFRAG_A, ClientCall, run
from tests.support.transceiver_migration import migrate, owner_addr, two_transceivers

pytestmark = pytest.mark.realtime

TURN_TIMEOUT = 15.0  # the utterance (~2 s), the VAD's stop, the reply played in real time


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    return wav_samples(speech_wav("hello there, how are you today", tmp_path_factory.mktemp("speech") / "s.wav"))


async def until(client: ClientCall, wanted, seen: list[dict[str, Any]], what: str) -> dict[str, Any]:
    """The next data-channel message matching ``wanted``; every message read is kept in ``seen``."""
    async def read() -> dict[str, Any]:
        while True:
            message = json.loads(await client.messages.get())
            seen.append(message)
            if wanted(message):
                return message
    try:
        return await asyncio.wait_for(read(), TURN_TIMEOUT)
    except TimeoutError:
        raise AssertionError(f"no {what} in {TURN_TIMEOUT} s; the client got {seen}") from None


def kind(type_: str):
    return lambda m: m.get("label") == "rtvi-ai" and m.get("type") == type_


def test_rtvi_handshake_and_events_survive_a_migration(speech, fast_consent) -> None:
    bot = load_bot("pipecat_bot_rtvi")

    async def scenario() -> dict[str, Any]:
        async with two_transceivers(agent_factory=bot.make_pipeline.agent_factory) as (tx_a, api_a, _, api_b):
            track = SpeechTrack()
            client = ClientCall(0, track=track)
            before: list[dict[str, Any]] = []
            after: list[dict[str, Any]] = []
            try:
                await client.place(tx_a, 42, UFRAG_A)
                await client.wait_connected()
                client.dc.send(json.dumps({"type": "ping"}))
                echo = await until(client, lambda m: "echo" in m, before, "echo")
                client.dc.send(rtvi("client-ready", "ready-1", {"version": "1.2.0", "about": {"library": "test"}}))
                ready = await until(client, kind("bot-ready"), before, "bot-ready")
                track.say(speech)
                turn_a = await until(client, kind("server-message"), before, "server-message on A")
                await until(client, kind("bot-stopped-speaking"), before, "bot-stopped-speaking on A")

                moved = await migrate(client, 42, api_a, api_b, owner_addr(tx_a.owner))
                track.say(speech)
                turn_b = await until(client, kind("server-message"), after, "server-message on B")
                await until(client, kind("bot-stopped-speaking"), after, "bot-stopped-speaking on B")
                client.dc.send(rtvi("client-message", "ask-1", {"t": "state", "d": None}))
                answer = await until(client, kind("server-response"), after, "server-response on B")
                client.dc.send(json.dumps({"type": "ping"}))
                echo_b = await until(client, lambda m: "echo" in m, after, "echo on B")
                return {"echo": echo, "ready": ready, "turn_a": turn_a, "turn_b": turn_b, "answer": answer,
                        "echo_b": echo_b, "before": before, "after": after,
                        "carried": moved["state"]["agent"]["state"]}
            finally:
                await client.close()

    out = run(scenario(), timeout=120)
    # Before the client spoke RTVI it got only the bot's answer.
    assert out["before"][0] == out["echo"] and "label" not in out["echo"], out["before"]
    assert out["ready"]["id"] == "ready-1" and out["ready"]["data"]["version"] == "1.2.0", out["ready"]
    assert out["turn_a"]["data"] == {"turns": 1}
    assert any(kind("bot-started-speaking")(m) for m in out["before"]), out["before"]
    # The handshake moved with the call: B's RTVI knows the client, its version and its ready id.
    assert out["carried"]["rtvi"] == {"client_ready": True, "bot_ready": True, "client_version": [1, 2, 0],
                                      "client_ready_id": "ready-1"}
    # On B, with no RTVI from the client since the move, the bot's events still reach it
    # (a B that lost the handshake would withhold them); no second bot-ready.
    assert out["turn_b"]["data"] == {"turns": 2}
    assert any(kind("bot-started-speaking")(m) for m in out["after"]), out["after"]
    assert not [m for m in out["after"] if kind("bot-ready")(m)], out["after"]
    assert out["answer"]["id"] == "ask-1" and out["answer"]["data"]["d"]["turns"] == 2, out["answer"]
    assert out["echo_b"]["echo"] == {"type": "ping"} and "label" not in out["echo_b"]
