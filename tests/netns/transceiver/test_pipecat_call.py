"""A Pipecat bot as the agent of real calls: an aiortc client speaks, the bot answers higher, and
a live migration carries the bot's conversation (LLMContext and turns) to the new transceiver.

The client is an unmodified aiortc peer through the userspace relay stand-in
(tests/support/transceiver_calls.py); the bot is examples/pipecat_bot.py
with Silero VAD.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from tests.support.pipecat_bot import load_bot
from tests.support.speech import SpeechTrack, spectral_centroid, speech_wav, voiced, wav_samples
from tests.support.transceiver_calls import UFRAG_A, ClientCall, run
from tests.support.transceiver_migration import migrate, owner_addr, two_transceivers
from tests.support.waiting import eventually_async

pytestmark = pytest.mark.realtime



def heard_since(client: ClientCall, since: float) -> np.ndarray:
    pcm = [x for t, frame in client.frames if t >= since for x in frame]
    return np.array(pcm, dtype=np.int16)


async def utterance(client: ClientCall, track: SpeechTrack, speech: np.ndarray) -> np.ndarray:
    """Say ``speech``; return the bot's reply (voiced audio heard after the speech ended)."""
    track.say(speech)
    await eventually_async(lambda: not track.speaking, timeout=10, what="the utterance sent")
    said_at = time.monotonic()
    expected_s = len(voiced(speech)) / 48000 / 1.5  # the same speech, 1.5x faster

    def reply_done():
        reply = voiced(heard_since(client, said_at))
        # The reply started and has ended: 0.5 s of silence after it. The VAD
        # keeps less of the utterance when the machine is loaded (0.46 of
        # 0.95 s seen), so the length only shows a reply, not a blip.
        return len(reply) / 48000 >= 0.3 * expected_s and not len(voiced(heard_since(client, time.monotonic() - 0.5)))

    await eventually_async(reply_done, timeout=10, what="the bot's whole reply")
    return voiced(heard_since(client, said_at))


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    return wav_samples(speech_wav("hello there, how are you today", tmp_path_factory.mktemp("speech") / "s.wav"))


def test_bot_answers_a_call_and_keeps_its_conversation_across_a_migration(speech, fast_consent) -> None:
    bot = load_bot()

    async def scenario() -> dict:
        async with two_transceivers(agent_factory=bot.make_pipeline.agent_factory) as (tx_a, api_a, _, api_b):
            track = SpeechTrack()
            client = ClientCall(0, track=track)
            try:
                await client.place(tx_a, 42, UFRAG_A)
                await client.wait_connected()
                first = await utterance(client, track, speech)
                client.dc.send(json.dumps({"type": "ping"}))
                echo = json.loads(await asyncio.wait_for(client.messages.get(), 5))

                moved = await migrate(client, 42, api_a, api_b, owner_addr(tx_a.owner))
                second = await utterance(client, track, speech)
                client.dc.send(json.dumps({"type": "ping"}))
                echo_b = json.loads(await asyncio.wait_for(client.messages.get(), 5))
                info = await api_b.get("/calls/42")
                return {"first": first, "second": second, "echo": echo, "echo_b": echo_b,
                        "carried": moved["state"]["agent"]["state"], "info": info}
            finally:
                await client.close()

    out = run(scenario(), timeout=90)
    said = voiced(speech)
    for reply in (out["first"], out["second"]):
        ratio = spectral_centroid(reply) / spectral_centroid(said)
        assert 1.15 < ratio < 1.85, f"pitch ratio {ratio:.2f}"  # 1.5 as played; 1.0 if not shifted
    assert out["echo"]["echo"] == {"type": "ping"} and out["echo"]["turns"] == 1
    assert [m["role"] for m in out["echo"]["context"]] == ["user", "assistant"]
    # The migration carried the bot's turn count and its LLM context: B's bot goes on from turn 1.
    assert out["carried"]["state"] == {"turns": 1}
    assert [m["role"] for m in out["carried"]["context"]] == ["user", "assistant"]
    assert out["echo_b"]["turns"] == 2
    assert out["echo_b"]["context"][:2] == out["echo"]["context"] and len(out["echo_b"]["context"]) == 4
