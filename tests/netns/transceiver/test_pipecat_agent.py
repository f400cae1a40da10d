"""The Pipecat bot as a call's agent, on a real AgentSession: it hears speech, answers higher, keeps its context.

No network: frames go in through the session as a call's decoder delivers
them and come out of the session's real-time paced track. Silero VAD and
the bot are the real ones (examples/pipecat_bot.py).
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from manager.integrations.pipecat_agent import PipecatAgent
from manager.transceiver.agent import AgentSession
from tests.support.pipecat_bot import load_bot, rtvi
from tests.support.speech import call_frames, spectral_centroid, speech_wav, voiced, wav_samples
from tests.support.waiting import eventually_async

pytestmark = pytest.mark.realtime


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


def start(bot, conn_id: int) -> tuple[AgentSession, Channel, PipecatAgent, asyncio.Task]:
    """The bot running as the agent of a session with a data channel (in the running loop)."""
    session = AgentSession(conn_id)
    channel = Channel()
    session.attach_channel(channel)
    agent = PipecatAgent(bot.make_pipeline)
    return session, channel, agent, asyncio.create_task(agent.run(session))


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
        session, channel, agent, runner = start(bot, 1)
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
    # A client that never spoke RTVI hears none of it (the bot's speaking, its server-message).
    assert [json.loads(m).get("label") for m in sent] == [None], sent
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


def test_rtvi_client_ready_gets_bot_ready_and_other_messages_still_reach_the_bot():
    bot = load_bot()

    async def scenario():
        session, channel, agent, runner = start(bot, 3)
        channel.receive("hello")  # text: never RTVI
        # The SmallWebRTC client's keep-alive and transport signalling are its
        # transport's, consumed before the pipeline as Pipecat's server does.
        channel.receive("ping: 1733472000000")
        channel.receive(json.dumps({"type": "signalling",
                                    "message": {"type": "trackStatus", "receiver_index": 0, "enabled": False}}))
        channel.receive(rtvi("client-ready", "ready-1", {"version": "1.2.0", "about": {"library": "test"}}))
        channel.receive(rtvi("client-message", "ask-1", {"t": "state", "d": None}))
        channel.receive(json.dumps({"type": "ping"}))
        await eventually_async(lambda: len(channel.sent) >= 4, timeout=5, what="four answers")
        state = agent.export_state()
        session.close()
        await asyncio.wait_for(runner, 10)
        return [json.loads(m) for m in channel.sent], state

    sent, state = asyncio.run(scenario())
    ready = next(m for m in sent if m.get("type") == "bot-ready")
    assert ready["label"] == "rtvi-ai" and ready["id"] == "ready-1", ready
    assert ready["data"]["version"] == "1.2.0", ready  # a 1.x client gets its own version back
    response = next(m for m in sent if m.get("type") == "server-response")
    assert response["id"] == "ask-1" and response["data"] == {"t": "state", "d": {"turns": 0, "context": []}}
    # The non-RTVI messages still reach the bot as transport messages; RTVI's do not get an echo.
    echoes = [m["echo"] for m in sent if "echo" in m]
    assert echoes == ["hello", {"type": "ping"}], sent
    assert len(sent) == 4, sent
    assert state["rtvi"] == {"client_ready": True, "bot_ready": True, "client_version": [1, 2, 0],
                             "client_ready_id": "ready-1"}
