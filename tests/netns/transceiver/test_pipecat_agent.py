"""The Pipecat bot as a call's agent, on a real AgentSession: it hears speech, answers higher, keeps its context.

No network: frames go in through the session as a call's decoder delivers
them and come out of the session's real-time paced track. Silero VAD and
the bot are the real ones (examples/pipecat_bot.py).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json

import numpy as np
import pytest

from manager.integrations.pipecat_agent import PipecatAgent
from manager.transceiver.agent import AgentSession
from tests.support.paths import REPO
from tests.support.speech import call_frames, spectral_centroid, speech_wav, voiced, wav_samples
from tests.support.waiting import eventually_async

pytestmark = pytest.mark.realtime


def load_bot():
    spec = importlib.util.spec_from_file_location("pipecat_bot", REPO / "examples" / "pipecat_bot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Channel:
    """The data channel as the session sees one (aiortc's RTCDataChannel's surface)."""

    def __init__(self) -> None:
        self.readyState = "open"
        self.sent: list = []
        self.handlers: dict = {}

    def on(self, event):
        def register(fn):
            self.handlers[event] = fn
            return fn
        return register

    def send(self, msg) -> None:
        self.sent.append(msg)

    def receive(self, msg) -> None:
        self.handlers["message"](msg)


async def talk(session: AgentSession, speech: np.ndarray, listen_s: float) -> np.ndarray:
    """Say ``speech`` (then silence) into the call in real time; return what the agent played."""
    heard: list[np.ndarray] = []

    async def listen() -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + listen_s
        while loop.time() < end:
            frame = await session.out_track.recv()
            heard.append(frame.to_ndarray().reshape(-1)[:: len(frame.layout.channels)])  # one channel

    listener = asyncio.create_task(listen())
    silence = np.zeros(48000, dtype=np.int16)
    for frame in call_frames(np.concatenate([silence // 2, speech, silence])):
        session.deliver_audio(frame)
        await asyncio.sleep(0.02)  # pacing: a call delivers a frame every 20 ms
    await listener
    return np.concatenate(heard)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    return wav_samples(speech_wav("hello there, how are you today", tmp_path_factory.mktemp("speech") / "s.wav"))


def test_bot_repeats_an_utterance_higher_and_answers_messages(speech):
    bot = load_bot()

    async def scenario():
        session = AgentSession(1)
        channel = Channel()
        session.attach_channel(channel)
        agent = PipecatAgent(bot.make_pipeline)
        runner = asyncio.create_task(agent.run(session))
        heard = await talk(session, speech, listen_s=len(speech) / 48000 + 3.5)
        channel.receive(json.dumps({"type": "ping"}))
        await eventually_async(lambda: channel.sent, timeout=5, what="the bot's answer on the data channel")
        state = agent.export_state()
        session.close()
        await asyncio.wait_for(runner, 10)  # the call's end ends the pipeline
        return heard, channel.sent, state

    heard, sent, state = asyncio.run(scenario())
    reply = voiced(heard)
    said = voiced(speech)
    assert len(reply) > 0, "the bot said nothing"
    # The same samples played 1.5x faster: shorter by that factor (plus the VAD's pre-roll).
    assert 0.5 < len(reply) / len(said) < 0.95
    ratio = spectral_centroid(reply) / spectral_centroid(said)
    print(f"reply/said length {len(reply) / len(said):.2f}, pitch ratio {ratio:.2f}")
    assert 1.25 < ratio < 1.75, f"pitch ratio {ratio:.2f}"
    answer = json.loads(sent[0])
    assert answer["echo"] == {"type": "ping"} and answer["turns"] == 1
    assert answer["context"] == state["context"]  # the conversation, as the client sees it
    assert state["state"] == {"turns": 1}
    assert [m["role"] for m in state["context"]] == ["user", "assistant"]


def test_imported_state_continues_the_conversation(speech):
    bot = load_bot()
    carried = {"version": 1, "state": {"turns": 4},
               "context": [{"role": "user", "content": "turn 4: 1.00 s of speech"},
                           {"role": "assistant", "content": "repeated 1.5x higher"}]}

    async def scenario():
        session = AgentSession(2)
        agent = PipecatAgent(bot.make_pipeline)
        agent.import_state(carried)
        runner = asyncio.create_task(agent.run(session))
        await talk(session, speech, listen_s=len(speech) / 48000 + 3.0)
        state = agent.export_state()
        session.close()
        await asyncio.wait_for(runner, 10)
        return state

    state = asyncio.run(scenario())
    assert state["state"] == {"turns": 5}
    assert len(state["context"]) == 4 and state["context"][2]["content"].startswith("turn 5:")


def test_unknown_state_version_is_refused():
    with pytest.raises(ValueError, match="state version 9"):
        PipecatAgent(lambda t: None).import_state({"version": 9})
