"""A standard aiortc client for the lab: places a call with one HTTP POST (the
signaling convention), plays a tone, and reports what it saw (states, echoed
tone power by Goertzel, data-channel round trips, frame arrival times)."""

from __future__ import annotations

import asyncio
import fractions
import math
import secrets
import statistics
import time
from array import array
from dataclasses import asdict, dataclass, field

import aiohttp
import av
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from manager.lab.capture import longest_gap

TONE_HZ = 440.0
SAMPLE_RATE = 48000
FRAME_SAMPLES = 960  # 20 ms


def tone_power(samples: array, freq: float, rate: int = SAMPLE_RATE) -> float:
    """Goertzel power of one frequency in a block of samples."""
    k = 2 * math.cos(2 * math.pi * freq / rate)
    s1 = s2 = 0.0
    for x in samples:
        s1, s2 = x + k * s1 - s2, s1
    return s1 * s1 + s2 * s2 - k * s1 * s2


def make_tone_track(freq: float = TONE_HZ):
    """An audio track playing a sine in real time (20 ms frames, 48 kHz mono).
    Its `freq` may change mid-call; the phase stays continuous."""
    class ToneTrack(MediaStreamTrack):
        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self.freq = freq
            self._phase = 0.0
            self._pts = 0
            self._start: float | None = None

        async def recv(self):
            if self.readyState != "live":
                raise MediaStreamError
            if self._start is None:
                self._start = time.monotonic()
            else:
                await asyncio.sleep(max(0.0, self._start + self._pts / SAMPLE_RATE - time.monotonic()))
            step = 2 * math.pi * self.freq / SAMPLE_RATE
            samples = array("h", (int(8000 * math.sin(self._phase + i * step)) for i in range(FRAME_SAMPLES)))
            self._phase = (self._phase + FRAME_SAMPLES * step) % (2 * math.pi)
            frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
            frame.planes[0].update(samples.tobytes())
            frame.sample_rate = SAMPLE_RATE
            frame.pts = self._pts
            frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
            self._pts += FRAME_SAMPLES
            return frame

    return ToneTrack()


@dataclass
class CallReport:
    """What a client saw of one call."""

    call_url: str = ""
    answer: str = ""  # the relay's SDP answer
    status: int = 0
    hangup_status: int | None = None  # what DELETE of the call answered
    connection_states: list[str] = field(default_factory=list)
    ice_states: list[str] = field(default_factory=list)
    connected_after_s: float | None = None
    audio_frames_received: int = 0
    tone_ratio: float = 0.0           # power at the tone / power at an off-tone frequency
    rtp_packets_sent: int = 0
    rtp_packets_received: int = 0
    rtp_packets_lost: int = 0
    rtcp_rtt_ms: float | None = None
    dc_sent: int = 0
    dc_echoed: int = 0
    dc_rtt_ms_p50: float | None = None
    # The numbered stream (dc_interval): send time of "n:<i>" (seconds since the
    # call started) and each echo as it came back: (i, arrival).
    dc_numbered_sent_at: list[float] = field(default_factory=list)
    dc_numbered_echoes: list[tuple[int, float]] = field(default_factory=list)
    signaling_states: list[str] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)   # name → seconds since the call started
    frames_after: dict[str, int] = field(default_factory=dict)       # audio frames received after each mark
    tone_ratio_after: dict[str, float] = field(default_factory=dict)  # tone strength after each mark (+0.3 s)
    # The longest silence in received audio from each mark to 3 s after it (ms):
    # with the transceiver's echo, an interruption either way shows here.
    gap_after_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def connected(self) -> bool:
        return "connected" in self.connection_states

    def mark(self, name: str) -> None:
        """Note a moment (e.g. a migration) to measure audio after it."""
        self.marks[name] = time.monotonic() - self._t0

    _t0: float = 0.0

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        return {**d, "connected": self.connected}


async def client_call(signaling_url: str, *, duration: float = 4.0, messages: int = 10,
                      hang_up: bool = True, on_connected=None, token: str | None = None,
                      dc_interval: float | None = None, rewrite_answer=None) -> CallReport:
    """Place one call: POST the offer, play a tone, send data-channel pings,
    measure the echo, then DELETE the call. Runs in the caller's network
    namespace (run it on a NetnsExecutor thread of the client namespace).
    `token`: the client credential, sent as `Authorization: Bearer`.
    `dc_interval`: also send "n:<i>" every that many seconds from the moment
    the channel opens until the pings are done (on_connected runs meanwhile),
    and record every echo (CallReport.dc_numbered_*). `rewrite_answer(sdp)`:
    what the client takes of the relay's answer (the ICE-TCP adapter's
    address as its candidate, ice_tcp.py); the original is CallReport.answer."""
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    rep = CallReport()
    rep._t0 = time.monotonic()
    # No STUN server: aiortc's default is a public one, unreachable (and not
    # wanted) from the lab; the relay's answer carries its public address.
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    connected = asyncio.Event()
    t0 = time.monotonic()

    @pc.on("connectionstatechange")
    def _conn() -> None:
        rep.connection_states.append(pc.connectionState)
        if pc.connectionState == "connected":
            rep.connected_after_s = round(time.monotonic() - t0, 3)
            connected.set()

    @pc.on("iceconnectionstatechange")
    def _ice() -> None:
        rep.ice_states.append(pc.iceConnectionState)

    @pc.on("signalingstatechange")
    def _sig() -> None:
        rep.signaling_states.append(pc.signalingState)

    received: list = []
    arrivals: list[float] = []
    readers: set[asyncio.Task] = set()  # kept until done: the loop holds tasks only weakly
    stream: asyncio.Task | None = None  # the numbered messages (dc_interval)

    @pc.on("track")
    def _track(track) -> None:
        async def pull() -> None:
            while True:
                try:
                    received.append(await track.recv())
                    arrivals.append(time.monotonic() - rep._t0)
                except Exception:
                    return
        task = asyncio.get_running_loop().create_task(pull())
        readers.add(task)
        task.add_done_callback(readers.discard)

    pc.addTrack(make_tone_track())
    dc = pc.createDataChannel("agent")
    rtts: list[float] = []
    sent_at: dict[str, float] = {}

    @dc.on("message")
    def _msg(message) -> None:
        if isinstance(message, str) and message in sent_at:
            rtts.append((time.monotonic() - sent_at.pop(message)) * 1000)
        elif isinstance(message, str) and message.startswith("n:") and message[2:].isdigit():
            rep.dc_numbered_echoes.append((int(message[2:]), time.monotonic() - rep._t0))

    async def numbered() -> None:
        while dc.readyState != "open":
            await asyncio.sleep(0.01)
        while True:
            dc.send(f"n:{len(rep.dc_numbered_sent_at)}")
            rep.dc_numbered_sent_at.append(time.monotonic() - rep._t0)
            await asyncio.sleep(dc_interval)

    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        try:
            async with http.post(signaling_url + "/v1/calls", data=pc.localDescription.sdp,
                                 headers={"Content-Type": "application/sdp", **auth}) as resp:
                rep.status = resp.status
                body = await resp.text()
                if resp.status != 201:
                    rep.error = f"signaling answered {resp.status}: {body.strip()}"
                    await pc.close()
                    return rep
                rep.call_url = str(resp.url.join(aiohttp.client.URL(resp.headers["Location"])))
            rep.answer = body
            await pc.setRemoteDescription(RTCSessionDescription(
                sdp=rewrite_answer(body) if rewrite_answer is not None else body, type="answer"))
            try:
                await asyncio.wait_for(connected.wait(), 15)
            except TimeoutError:
                rep.error = f"not connected after 15 s (states {rep.connection_states})"
                return rep
            if dc_interval is not None:
                stream = asyncio.get_running_loop().create_task(numbered())
                readers.add(stream)
            if on_connected is not None:
                await on_connected(pc, rep)
            # Data channel pings while the tone plays.
            opened_by = time.monotonic() + 10.0
            while messages and dc.readyState != "open":
                if time.monotonic() > opened_by or pc.connectionState in ("failed", "closed"):
                    rep.error = f"data channel not open ({dc.readyState}; connection {pc.connectionState})"
                    messages = 0
                    break
                await asyncio.sleep(0.02)
            for i in range(messages):
                tag = f"ping-{i}-{secrets.token_hex(4)}"
                sent_at[tag] = time.monotonic()
                dc.send(tag)
                rep.dc_sent += 1
                await asyncio.sleep(duration / max(1, messages))
            await asyncio.sleep(0.5)  # the call's tail: audio goes on after the last ping
            deadline = time.monotonic() + 3.0
            while len(rtts) < rep.dc_sent and time.monotonic() < deadline:  # a late echo, on a loaded machine
                await asyncio.sleep(0.02)
            if stream is not None:
                stream.cancel()
                deadline = time.monotonic() + 3.0
                while len(rep.dc_numbered_echoes) < len(rep.dc_numbered_sent_at) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
            rep.dc_echoed = len(rtts)
            rep.dc_rtt_ms_p50 = round(statistics.median(rtts), 3) if rtts else None
            await _collect_stats(pc, rep)
            rep.audio_frames_received = len(received)
            rep.tone_ratio = _tone_ratio(received[len(received) // 3:])
            for name, at in rep.marks.items():
                timed = list(zip(received, arrivals, strict=True))
                rep.frames_after[name] = sum(1 for _, t in timed if t >= at)
                rep.tone_ratio_after[name] = _tone_ratio([f for f, t in timed if t >= at + 0.3])
                rep.gap_after_ms[name] = longest_gap(arrivals, at, at + 3.0)
        finally:
            if hang_up and rep.call_url:
                async with http.delete(rep.call_url, headers=auth) as resp:
                    await resp.read()
                    rep.hangup_status = resp.status
            await pc.close()
            for task in readers:
                task.cancel()
    return rep


async def _collect_stats(pc, rep: CallReport) -> None:
    stats = await pc.getStats()
    for s in stats.values():
        if s.type == "outbound-rtp":
            rep.rtp_packets_sent += s.packetsSent
        elif s.type == "inbound-rtp":
            rep.rtp_packets_received += s.packetsReceived
            rep.rtp_packets_lost += max(0, s.packetsLost)
        elif s.type == "remote-inbound-rtp" and s.roundTripTime is not None:
            rep.rtcp_rtt_ms = round(s.roundTripTime * 1000, 3)


def _tone_ratio(frames: list) -> float:
    """How strongly the received audio carries the tone we sent (vs 1 kHz)."""
    if not frames:
        return 0.0
    on = off = 0.0
    for frame in frames[:50]:
        raw = array("h", bytes(frame.planes[0]))
        ch = len(frame.layout.channels)
        mono = raw[::ch] if ch > 1 else raw
        on += tone_power(mono, TONE_HZ, frame.sample_rate)
        off += tone_power(mono, 1000.0, frame.sample_rate)
    return round(on / off, 1) if off else float("inf")
