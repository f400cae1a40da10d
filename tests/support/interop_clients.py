"""The interop matrix's clients behind one interface (tests/e2e/test_interop.py).

Every client runs in the lab's client namespace (call its methods on a
NetnsExecutor thread of it) and is driven the same way:

    await client.start()        # place a call through the relay's signaling
    s = await client.status()   # a Reading: state, levels, tone, data channel
    await client.stop()         # hang up, stop the process

A Reading's levels are RMS of full scale: `sent_level` is what the client
sends (measured on its microphone where it has one), `level` the agent's echo
as the client hears it; `tone_ok` says the echo carries the sent tone;
`dc_sent`/`dc_echoed` count data-channel pings (one every 200 ms) and their
echoes.
"""

from __future__ import annotations

import array
import asyncio
import fractions
import json
import math
import os
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

import aiohttp
import aiortc
import av
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from manager.lab.client import tone_power
from tests.support.chromium import Chromium
from tests.support.firefox import Firefox
from tests.support.paths import REPO

RATE = 48000
PING_S = 0.2


@dataclass
class Reading:
    state: str = "new"
    error: str | None = None
    level: float = 0.0
    sent_level: float = 0.0
    tone_ok: bool = False
    dc_sent: int = 0
    dc_echoed: int = 0
    path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def connected(self) -> bool:
        return self.state == "connected"


# -- browsers: relayd's page, with a probe measuring the microphone ---------------------------

# Loaded without autostart; the probe asks for the microphone without the
# voice processing (gain control would move the level we compare against),
# measures what it sends the way the page measures the echo, then starts.
PROBE = """(() => {
  const md = navigator.mediaDevices, original = md.getUserMedia.bind(md);
  md.getUserMedia = async () => {
    const mic = await original({audio: {echoCancellation: false, noiseSuppression: false, autoGainControl: false}});
    const ctx = new AudioContext(), an = ctx.createAnalyser();
    an.fftSize = 4096;
    ctx.createMediaStreamSource(mic).connect(an);
    const wave = new Float32Array(an.fftSize), spectrum = new Float32Array(an.frequencyBinCount);
    setInterval(() => {
      an.getFloatTimeDomainData(wave);
      let sum = 0;
      for (const x of wave) sum += x * x;
      window.splitrelay.sent_level = Math.sqrt(sum / wave.length);
      an.getFloatFrequencyData(spectrum);
      let best = 0;
      for (let i = 1; i < spectrum.length; i++) if (spectrum[i] > spectrum[best]) best = i;
      window.splitrelay.sent_peak_hz = Math.round(best * ctx.sampleRate / an.fftSize);
    }, 250);
    return mic;
  };
  document.getElementById("talk").click();
  return true;
})()"""


class BrowserClient:
    """Chromium or Firefox on relayd's "talk to the agent" page."""

    probe = PROBE  # evaluated once the page has loaded: it starts the call

    def __init__(self, browser: Chromium | Firefox) -> None:
        self.browser = browser
        self.last: dict = {}

    async def start(self) -> None:
        self.browser.start()
        await self.browser.connect()
        deadline = time.monotonic() + 20
        while not await self.browser.evaluate("!!(window.splitrelay && document.getElementById('talk'))"):
            if time.monotonic() > deadline:
                raise TimeoutError("the page did not load")
            await asyncio.sleep(0.2)  # pacing the poll of the page's state
        await self.browser.evaluate(self.probe)

    async def status(self) -> Reading:
        raw = await self.browser.evaluate("JSON.stringify(window.splitrelay || null)")
        r = self.last = json.loads(raw) if raw else {}
        peak, sent_peak = r.get("peak_hz"), r.get("sent_peak_hz")
        return Reading(state=r.get("state", "new"), error=r.get("error"), level=r.get("level") or 0.0,
                       sent_level=r.get("sent_level") or 0.0,
                       tone_ok=peak is not None and sent_peak is not None and abs(peak - sent_peak) <= 30,
                       dc_sent=r.get("dc_sent", 0), dc_echoed=r.get("dc_echoed", 0), path=r.get("path"),
                       extra={"peak_hz": peak, "sent_peak_hz": sent_peak, "lost": r.get("lost")})

    async def stop(self) -> None:
        try:
            await self.browser.evaluate("window.splitrelayHangup && splitrelayHangup()")
            await self.browser.close()
        except Exception:  # the browser may be gone already; stop() below ends it either way
            pass
        self.browser.stop()


# -- aiortc ------------------------------------------------------------------------------------


class StereoTone(MediaStreamTrack):
    """A real-time sine, RMS 0.354, on both channels: aiortc's Opus encoder
    takes stereo and would upmix a mono frame 3 dB down, so the client sends
    exactly this level."""

    kind = "audio"

    def __init__(self, freq: float) -> None:
        super().__init__()
        self.freq, self._pts, self._start = freq, 0, None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        await asyncio.sleep(max(0.0, self._start + self._pts / RATE - time.monotonic()))
        pcm = array.array("h")
        for i in range(960):
            x = int(0.5 * 32767 * math.sin(2 * math.pi * self.freq * (self._pts + i) / RATE))
            pcm.extend((x, x))
        frame = av.AudioFrame(format="s16", layout="stereo", samples=960)
        frame.planes[0].update(pcm.tobytes())
        frame.sample_rate, frame.pts, frame.time_base = RATE, self._pts, fractions.Fraction(1, RATE)
        self._pts += 960
        return frame


def _tone_ok(pcm: array.array, freq: float) -> bool:
    p = tone_power(pcm, freq, RATE)
    return p > 50 * max(tone_power(pcm, freq * 1.5, RATE), tone_power(pcm, freq * 0.75, RATE), 1e-9)


class AiortcClient:
    """aiortc's RTCPeerConnection, in this process, as manager/lab/client.py places calls."""

    version = f"aiortc {aiortc.__version__}"

    def __init__(self, url: str, freq: float = 440.0) -> None:
        self.url, self.freq = url, freq
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pending: set[str] = set()
        self.reading = Reading(sent_level=0.5 / math.sqrt(2))
        self.window = array.array("h")
        self.tasks: list[asyncio.Task] = []
        self.call_url: str | None = None
        self.http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        pc, r = self.pc, self.reading
        pc.addTrack(StereoTone(self.freq))
        dc = pc.createDataChannel("agent")

        @pc.on("connectionstatechange")
        def _state() -> None:
            r.state = pc.connectionState

        @pc.on("track")
        def _track(track: MediaStreamTrack) -> None:
            async def read() -> None:
                try:
                    while True:
                        frame = await track.recv()
                        pcm = array.array("h", bytes(frame.planes[0])[: frame.samples * 2 * len(frame.layout.channels)])
                        self.window = (self.window + pcm[:: len(frame.layout.channels)])[-RATE // 4:]
                except MediaStreamError:
                    pass
            self.tasks.append(asyncio.ensure_future(read()))

        @dc.on("message")
        def _message(msg: Any) -> None:
            if msg in self.pending:
                self.pending.discard(msg)
                r.dc_echoed += 1

        async def ping() -> None:
            while dc.readyState != "open":
                await asyncio.sleep(0.02)  # pacing: the channel opens with the call (the call's timeout bounds it)
            while dc.readyState == "open":
                tag = f"ping-{r.dc_sent}"
                self.pending.add(tag)
                dc.send(tag)
                r.dc_sent += 1
                await asyncio.sleep(PING_S)  # pacing: one ping per 200 ms, as the page sends them

        self.tasks.append(asyncio.ensure_future(ping()))
        await pc.setLocalDescription(await pc.createOffer())
        self.http = aiohttp.ClientSession()
        async with self.http.post(f"{self.url}/v1/calls", data=pc.localDescription.sdp,
                                  headers={"Content-Type": "application/sdp"}) as resp:
            answer = await resp.text()
            if resp.status != 201:
                raise RuntimeError(f"signaling answered {resp.status}: {answer.strip()}")
            self.call_url = urljoin(f"{self.url}/", resp.headers["Location"])
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

    async def status(self) -> Reading:
        pcm = self.window
        if len(pcm) >= RATE // 8:
            self.reading.level = math.sqrt(sum(x * x for x in pcm) / len(pcm)) / 32768
            self.reading.tone_ok = _tone_ok(pcm, self.freq)
        return self.reading

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.http is not None:
            if self.call_url:
                try:
                    async with self.http.delete(self.call_url):
                        pass
                except aiohttp.ClientError:
                    pass
            await self.http.close()
        await self.pc.close()


# -- GStreamer webrtcbin (tests/support/gst_client.py, its own process) ---------------------------


class GstClient:
    """webrtcbin with its default RSA certificate, or an ECDSA one."""

    def __init__(self, url: str, *, ecdsa: bool) -> None:
        self.url = url
        self.argv = [sys.executable, "-m", "tests.support.gst_client", url, *(["--ecdsa"] if ecdsa else [])]
        self.proc: subprocess.Popen | None = None
        self.last: dict = {}
        self.stderr: list[str] = []

    @property
    def version(self) -> str:
        return self.last.get("gst", "GStreamer")

    async def start(self) -> None:
        # Started from the namespace's thread, so the process is in the client namespace.
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(self.argv, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.last = json.loads(line)
            except ValueError:
                self.stderr.append(line)

    async def status(self) -> Reading:
        s = self.last
        if self.proc is not None and self.proc.poll() is not None and not s.get("error"):
            s = {**s, "error": f"gst_client exited ({self.proc.returncode}): {''.join(self.stderr[-5:])}"}
        return Reading(state=s.get("state", "new"), error=s.get("error"), level=s.get("level", 0.0),
                       sent_level=s.get("sent_level", 0.0), tone_ok=s.get("tone_ratio", 0) > 50,
                       dc_sent=s.get("dc_sent", 0), dc_echoed=s.get("dc_echoed", 0),
                       extra={"tone_ratio": s.get("tone_ratio")})

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.last.get("call_url"):  # hang up as the page does
            req = urllib.request.Request(urljoin(f"{self.url}/", self.last["call_url"]), method="DELETE")
            try:
                await asyncio.to_thread(urllib.request.urlopen, req, timeout=5)
            except OSError:
                pass
        self.proc.stdin.close()
        try:
            await asyncio.to_thread(self.proc.wait, 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
