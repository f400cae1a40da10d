"""Agent interface: the stand-in for a voice model sitting next to the transceiver.

An :class:`Agent` gets one :class:`AgentSession` per call. The session hides
aiortc: decoded audio frames from the client's track come in through
:meth:`AgentSession.recv_audio`, frames given to :meth:`AgentSession.send_audio`
go out on a real-time paced track, and data-channel messages travel through
:meth:`AgentSession.recv_message` / :meth:`AgentSession.send_message`.

``export_state`` / ``import_state`` on both the agent and the session are the
hooks a live migration uses to carry the conversation state to a new owner.
"""

from __future__ import annotations

import abc
import array
import asyncio
import base64
import fractions
import logging
import time
from collections.abc import Callable
from typing import Any

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

logger = logging.getLogger(__name__)

#: Outgoing audio format: what aiortc's Opus encoder consumes without extra work.
SAMPLE_RATE = 48000
#: 20 ms frames, the usual Opus packetisation for voice.
FRAME_SAMPLES = 960
FRAME_DURATION = FRAME_SAMPLES / SAMPLE_RATE
TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
#: Cap on queued outgoing audio: an agent producing faster than real time must
#: not build up unbounded latency.
MAX_BUFFERED_SAMPLES = SAMPLE_RATE // 2
#: Cap on received-but-unread audio frames (about 2 s): a slow agent loses the
#: oldest audio rather than memory.
MAX_QUEUED_FRAMES = 100
MAX_QUEUED_MESSAGES = 1000
#: Sideband events (JSON objects from and to the application's server) held
#: at once each way; beyond it the oldest are dropped and counted.
MAX_QUEUED_EVENTS = 1000
SILENCE = bytes(FRAME_SAMPLES * 2)

Message = str | bytes


class CallEnded(Exception):
    """Raised by :class:`AgentSession` methods once the call is over."""


class AgentAudioTrack(MediaStreamTrack):
    """Outgoing audio track paced in real time.

    Each :meth:`recv` returns one 20 ms frame (48 kHz, s16, the mono FIFO on
    both stereo channels) at its wall-clock deadline: queued agent audio if at least one frame's worth is
    buffered, silence otherwise. Timestamps are continuous (``pts`` counts
    samples since the track started), whatever the agent pushes.
    """

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._fifo = av.AudioFifo()
        # Normalise whatever the agent pushes (the client's decoded stereo
        # Opus, a TTS engine's 24 kHz float...) to one format for the FIFO.
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        self._start: float | None = None
        self._pts = 0
        self.frames_sent = 0
        self.silent_frames = 0
        self.dropped_samples = 0

    def push(self, frame: av.AudioFrame) -> None:
        """Queue agent audio for sending (any format, any frame size)."""
        if frame.format.name == "s16" and frame.layout.name == "mono" and frame.sample_rate == SAMPLE_RATE:
            # Already the FIFO's format (an echo of the media engine's frames): no resampling.
            frame.pts = None
            self._fifo.write(frame)
            self._trim()
            return
        try:
            resampled = self._resampler.resample(frame)
        except ValueError:
            # PyAV's resampler is fixed to the first input's format; the agent
            # switched formats (e.g. from echo to TTS audio), so start a new one.
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            resampled = self._resampler.resample(frame)
        for out in resampled:
            out.pts = None  # the FIFO checks pts continuity; ours is assigned on read
            self._fifo.write(out)
        self._trim()

    @property
    def buffered_samples(self) -> int:
        """Agent audio queued and not yet sent (the media engine sends a whole frame early)."""
        return self._fifo.samples

    def _trim(self) -> None:
        excess = self._fifo.samples - MAX_BUFFERED_SAMPLES
        if excess > 0:
            self._fifo.read(excess)
            self.dropped_samples += excess

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            wait = self._start + self._pts / SAMPLE_RATE - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        return self.next_frame()

    def next_frame(self) -> av.AudioFrame:
        """The next 20 ms frame now, unpaced (the media engine paces all its calls)."""
        frame = self._fifo.read(FRAME_SAMPLES) if self._fifo.samples >= FRAME_SAMPLES else None
        if frame is None:
            frame = silence_frame()
            self.silent_frames += 1
        frame = to_stereo(frame)
        frame.pts = self._pts
        frame.sample_rate = SAMPLE_RATE
        frame.time_base = TIME_BASE
        self._pts += FRAME_SAMPLES
        self.frames_sent += 1
        return frame

    def next_pcm(self) -> bytes:
        """As :meth:`next_frame`, as mono s16 bytes (what the media engine encodes)."""
        if self._fifo.samples >= FRAME_SAMPLES:
            pcm = bytes(self._fifo.read(FRAME_SAMPLES).planes[0])[:FRAME_SAMPLES * 2]
        else:
            pcm = SILENCE
            self.silent_frames += 1
        self._pts += FRAME_SAMPLES
        self.frames_sent += 1
        return pcm

    def export_state(self) -> dict[str, Any]:
        return {
            "pts": self._pts,
            "frames_sent": self.frames_sent,
            "buffered_samples": self._fifo.samples,
        }


def to_stereo(mono: av.AudioFrame) -> av.AudioFrame:
    """The same s16 samples on both channels. aiortc's Opus encoder takes
    stereo and would upmix a mono frame with libswresample's -3 dB centre
    gain, so the echo would come back 3 dB quieter than the client spoke."""
    samples = array.array("h", bytes(mono.planes[0])[: mono.samples * 2])
    both = array.array("h", bytes(4 * mono.samples))
    both[0::2] = samples
    both[1::2] = samples
    frame = av.AudioFrame(format="s16", layout="stereo", samples=mono.samples)
    frame.planes[0].update(both.tobytes())
    return frame


def silence_frame(samples: int = FRAME_SAMPLES) -> av.AudioFrame:
    frame = av.AudioFrame(format="s16", layout="mono", samples=samples)
    for plane in frame.planes:
        plane.update(bytes(plane.buffer_size))
    frame.sample_rate = SAMPLE_RATE
    frame.time_base = TIME_BASE
    return frame


class AgentSession:
    """One call as the agent sees it. Created and fed by the transceiver endpoint.

    Receiving methods raise :class:`CallEnded` once the call is over (and stay
    that way), so an agent loop ends naturally with the call.
    """

    def __init__(self, conn_id: int, *, config: dict[str, Any] | None = None) -> None:
        self.conn_id = conn_id
        #: What the client configured for this call: the `session` JSON of a
        #: Realtime-style call (instructions, voice, ...), {} otherwise. It
        #: moves with the call on a migration.
        self.config: dict[str, Any] = dict(config or {})
        self.out_track = AgentAudioTrack()
        self._audio: asyncio.Queue[av.AudioFrame | None] = asyncio.Queue()
        self._messages: asyncio.Queue[Message | None] = asyncio.Queue()
        self._channels: list[Any] = []  # aiortc RTCDataChannel, first opened is primary
        self._pending_out: list[Message] = []
        self._frozen = False  # a migration froze the call: messages wait in _pending_out
        # Sideband events (manager.relay.realtime_api): in from the application's
        # server, out to it. Out waits while frozen (the queue moves with the call);
        # events that come in while frozen are held apart, handed back to relayd
        # if the call moves (it re-sends them to the new owner), or queued if not.
        self._events_in: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._events_out: list[dict[str, Any]] = []
        self._events_out_ready = asyncio.Event()
        self._events_late: list[dict[str, Any]] = []
        self.events_dropped = 0
        self._closed = False
        self._pump: asyncio.Task[None] | None = None
        self.audio_frames_in = 0
        self.audio_frames_dropped = 0
        self.messages_in = 0
        self.messages_out = 0

    @property
    def closed(self) -> bool:
        return self._closed

    # -- agent-facing API ---------------------------------------------------

    async def recv_audio(self) -> av.AudioFrame:
        """Next decoded audio frame from the client: 48 kHz s16, mono on a
        media-engine call (stereo on the aiortc path). On an engine call
        ``frame.opaque`` is ``"plc"`` for a concealed frame (lost, nothing to
        decode), ``"fec"`` for one rebuilt from the next packet's FEC, else None.
        A call handed from aiortc to the engine switches from the one to the
        other once, right after its handshake."""
        if self._closed and self._audio.empty():
            raise CallEnded
        frame = await self._audio.get()
        if frame is None:
            self._audio.put_nowait(None)  # keep later callers failing too
            raise CallEnded
        return frame

    async def send_audio(self, frame: av.AudioFrame) -> None:
        """Queue audio for the client; it is played out in real time, 20 ms frames."""
        if self._closed:
            raise CallEnded
        self.out_track.push(frame)

    async def recv_message(self) -> Message:
        """Next data-channel message from the client (str or bytes)."""
        if self._closed and self._messages.empty():
            raise CallEnded
        msg = await self._messages.get()
        if msg is None:
            self._messages.put_nowait(None)
            raise CallEnded
        return msg

    async def send_message(self, msg: Message) -> None:
        """Send on the client's first open data channel (queued until one opens)."""
        if self._closed:
            raise CallEnded
        if not isinstance(msg, (str, bytes)):
            raise TypeError(f"data-channel message must be str or bytes, not {type(msg).__name__}")
        channel = None if self._frozen else self._primary_channel()
        if channel is None:
            if len(self._pending_out) >= MAX_QUEUED_MESSAGES:
                raise RuntimeError("no open data channel and the outgoing queue is full")
            self._pending_out.append(msg)
            return
        channel.send(msg)
        self.messages_out += 1

    async def recv_event(self) -> dict[str, Any]:
        """Next sideband event from the application's server (a JSON object)."""
        if self._closed and self._events_in.empty():
            raise CallEnded
        event = await self._events_in.get()
        if event is None:
            self._events_in.put_nowait(None)
            raise CallEnded
        return event

    async def send_event(self, event: dict[str, Any]) -> None:
        """Send a JSON object to the application's server on the call's sideband
        (queued while none is connected, or while a migration holds the call)."""
        if self._closed:
            raise CallEnded
        if not isinstance(event, dict):
            raise TypeError(f"a sideband event must be a dict, not {type(event).__name__}")
        if len(self._events_out) >= MAX_QUEUED_EVENTS:
            self._events_out.pop(0)
            self.events_dropped += 1
        self._events_out.append(event)
        self._wake_events_out()

    # -- endpoint-facing plumbing -----------------------------------------------

    def deliver_event(self, event: dict[str, Any]) -> None:
        """An event from the application's server (the transceiver's sideband socket)."""
        if self._closed:
            return
        if self._frozen:
            self._events_late.append(event)
            return
        if self._events_in.qsize() >= MAX_QUEUED_EVENTS:
            self._events_in.get_nowait()
            self.events_dropped += 1
        self._events_in.put_nowait(event)

    async def next_event_out(self) -> dict[str, Any]:
        """The next event for the application's server, once the call is not frozen."""
        while True:
            if self._closed:
                raise CallEnded
            if self._events_out and not self._frozen:
                return self._events_out.pop(0)
            self._events_out_ready.clear()
            await self._events_out_ready.wait()

    def take_late_events(self) -> list[dict[str, Any]]:
        """Events that came while frozen and reached no agent (the call moved on)."""
        late, self._events_late = self._events_late, []
        return late

    def _wake_events_out(self) -> None:
        self._events_out_ready.set()

    def attach_track(self, track: MediaStreamTrack) -> None:
        """Start pumping the client's audio track into the session's queue."""
        if track.kind != "audio" or self._pump is not None:
            return
        self._pump = asyncio.ensure_future(self._pump_audio(track))

    def detach_track(self) -> None:
        """Stop pumping the client's track (the media engine delivers from now on)."""
        if self._pump is not None:
            self._pump.cancel()

    async def _pump_audio(self, track: MediaStreamTrack) -> None:
        # Reading the remote track continuously also keeps aiortc's own
        # per-track queue from growing when the agent is slow.
        try:
            while True:
                self.deliver_audio(await track.recv())
        except MediaStreamError:
            pass

    def deliver_audio(self, frame: av.AudioFrame) -> None:
        """Queue one decoded client frame for :meth:`recv_audio` (oldest dropped when full).

        The aiortc path feeds it from the remote track; an imported call
        (``migrated.py``) from its own decoder.
        """
        if self._closed:
            return
        self.audio_frames_in += 1
        if self._audio.qsize() >= MAX_QUEUED_FRAMES:
            self._audio.get_nowait()
            self.audio_frames_dropped += 1
        self._audio.put_nowait(frame)

    def attach_channel(self, channel: Any) -> None:
        """Register a data channel the client opened."""
        self._channels.append(channel)

        @channel.on("message")
        def on_message(msg: Message) -> None:
            if self._closed:
                return
            self.messages_in += 1
            if self._messages.qsize() >= MAX_QUEUED_MESSAGES:
                self._messages.get_nowait()
            self._messages.put_nowait(msg)

        @channel.on("open")
        def on_open() -> None:
            self._flush_pending()

        self._flush_pending()

    def forget_channels(self) -> None:
        """The endpoint that owned the channels handed the call over: its
        channels are dead (the new endpoint attaches its own)."""
        self._channels.clear()

    def _primary_channel(self) -> Any:
        for channel in self._channels:
            if channel.readyState == "open":
                return channel
        return None

    def freeze(self) -> None:
        """A migration is under way: hold outgoing messages (they move with the call)."""
        self._frozen = True

    def unfreeze(self) -> None:
        self._frozen = False
        self._flush_pending()
        for event in self.take_late_events():  # the migration was given up: they are this agent's
            self.deliver_event(event)
        self._wake_events_out()

    def _flush_pending(self) -> None:
        channel = None if self._frozen else self._primary_channel()
        while channel is not None and self._pending_out:
            channel.send(self._pending_out.pop(0))
            self.messages_out += 1

    def close(self) -> None:
        """End the session: receivers get :class:`CallEnded`, the track stops."""
        if self._closed:
            return
        self._closed = True
        if self._pump is not None:
            self._pump.cancel()
        self._audio.put_nowait(None)
        self._messages.put_nowait(None)
        self._events_in.put_nowait(None)
        self._wake_events_out()
        self.out_track.stop()

    def import_state(self, state: dict[str, Any]) -> None:
        """Continue a migrated call (what :meth:`export_state` produced): its
        counters, the messages the agent had not read yet and those it sent
        while the call was frozen (sent once a channel is open here)."""
        for key in ("audio_frames_in", "audio_frames_dropped", "messages_in", "messages_out"):
            setattr(self, key, int(state.get(key, 0)))
        config = state.get("config", {})
        if not isinstance(config, dict):
            raise ValueError("agent.session.config must be a JSON object")
        self.config = config
        for item in state.get("unread", []):
            self._messages.put_nowait(_decode_message(item))
        self._pending_out.extend(_decode_message(item) for item in state.get("pending_out", []))
        events_in, events_out = state.get("events_in", []), state.get("events_out", [])
        if not (isinstance(events_in, list) and isinstance(events_out, list)
                and all(isinstance(e, dict) for e in [*events_in, *events_out])):
            raise ValueError("agent.session.events_in/events_out must be lists of JSON objects")
        for event in events_in:
            self._events_in.put_nowait(event)
        self._events_out.extend(events_out)

    def export_state(self) -> dict[str, Any]:
        return {
            "conn_id": self.conn_id,
            "config": self.config,
            "out_track": self.out_track.export_state(),
            "audio_frames_in": self.audio_frames_in,
            "audio_frames_dropped": self.audio_frames_dropped,
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
            "unread": [_encode_message(m) for m in self._peek_messages()],
            "pending_out": [_encode_message(m) for m in self._pending_out],
            "events_in": [e for e in _peek(self._events_in) if e is not None],
            "events_out": list(self._events_out),
        }

    def _peek_messages(self) -> list[Message]:
        return [m for m in _peek(self._messages) if m is not None]


def _peek(queue: asyncio.Queue) -> list[Any]:
    """A queue's items, left in place."""
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    for item in items:
        queue.put_nowait(item)
    return items


def _encode_message(msg: Message) -> dict[str, str]:
    return {"text": msg} if isinstance(msg, str) else {"binary": base64.b64encode(msg).decode()}


def _decode_message(item: Any) -> Message:
    """ValueError for anything but {"text": str} or {"binary": base64}."""
    if isinstance(item, dict) and isinstance(item.get("text"), str) and len(item) == 1:
        return item["text"]
    if isinstance(item, dict) and isinstance(item.get("binary"), str) and len(item) == 1:
        try:
            return base64.b64decode(item["binary"], validate=True)
        except ValueError:
            pass
    raise ValueError(f"agent.session: a message must be {{'text': str}} or {{'binary': base64}}, not {item!r:.60}")


class Agent(abc.ABC):
    """A conversational agent. One instance per call."""

    @abc.abstractmethod
    async def run(self, session: AgentSession) -> None:
        """Serve one call; returning or raising :class:`CallEnded` ends the agent, not the call."""

    def export_state(self) -> dict[str, Any]:
        """JSON-serialisable conversation state, for a live migration."""
        return {}

    def import_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional: a stateless agent has none
        """Restore what :meth:`export_state` produced, before :meth:`run` starts."""


AgentFactory = Callable[[], Agent]


class EchoAgent(Agent):
    """Speaks back what it hears: audio frames and data-channel messages are echoed."""

    def __init__(self) -> None:
        self.frames_echoed = 0
        self.messages_echoed = 0

    async def run(self, session: AgentSession) -> None:
        # Two independent loops: audio must keep flowing while no message comes.
        tasks = [
            asyncio.ensure_future(self._echo_audio(session)),
            asyncio.ensure_future(self._echo_messages(session)),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def _echo_audio(self, session: AgentSession) -> None:
        try:
            while True:
                frame = await session.recv_audio()
                await session.send_audio(frame)
                self.frames_echoed += 1
        except CallEnded:
            pass

    async def _echo_messages(self, session: AgentSession) -> None:
        try:
            while True:
                msg = await session.recv_message()
                await session.send_message(msg)
                self.messages_echoed += 1
        except CallEnded:
            pass

    def export_state(self) -> dict[str, Any]:
        return {"frames_echoed": self.frames_echoed, "messages_echoed": self.messages_echoed}

    def import_state(self, state: dict[str, Any]) -> None:
        self.frames_echoed = int(state.get("frames_echoed", 0))
        self.messages_echoed = int(state.get("messages_echoed", 0))


async def run_agent(agent: Agent, session: AgentSession, what: str) -> None:
    """Run an agent for a call. Its failure is not the call's: the client
    keeps the connection (hearing silence) until it or the control API ends it."""
    try:
        await agent.run(session)
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("agent of %s failed", what)
