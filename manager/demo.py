"""Run the split relay in a namespace lab and place real WebRTC calls.

Shared by `make demo` (relayctl demo), `relayctl lab up` and the end-to-end
tests: Services starts relayd in the relay namespace and the transceivers in
theirs; client_call() is a standard aiortc client that only adds the HTTP
POST/DELETE of the signaling convention.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import math
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .lab import Lab, NetnsExecutor

REPO = Path(__file__).resolve().parent.parent
TONE_HZ = 440.0
SAMPLE_RATE = 48000
FRAME_SAMPLES = 960  # 20 ms


class ServicesError(RuntimeError):
    """A lab service did not start; the message says which and why."""


def relayd_config(lab: Lab, hint_key: str, *, metrics_port: int = 9100, idle_timeout: float = 30.0) -> dict:
    """relayd's configuration for a lab (as the TOML file would hold it)."""
    return {
        "hint_key": hint_key,
        "control_socket": f"/run/splitrelay/{lab.prefix}-relayd.sock",
        "datapath": {
            "pin_dir": f"/sys/fs/bpf/splitrelay-{lab.prefix}",
            "interfaces": [lab.public_ifname, *lab.internal_ifnames],
            "vips": [{"addr": lab.vip4, "port": lab.port}, {"addr": lab.vip6, "port": lab.port}],
            "internal_addr4": lab.internal4,
            "internal_addr6": lab.internal6,
            "max_flows": 65536, "max_reverse": 65536, "max_owners": 16384,
        },
        "signaling": {"host": "0.0.0.0", "port": 8080},
        "slowpath": {"idle_timeout": idle_timeout},
        "metrics": {"host": "0.0.0.0", "port": metrics_port},
    }


def to_toml(data: dict, prefix: str = "") -> str:
    """Enough TOML for relayd_config(): scalars, lists of scalars/tables."""
    lines, tables = [], []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in tables:
        out += f"\n[{prefix}{k}]\n" + to_toml(v, f"{prefix}{k}.")
    return out


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(str(v))


@dataclass
class Services:
    """relayd and the transceivers, running as processes inside a lab."""

    lab: Lab
    workdir: Path
    hint_key: str = field(default_factory=lambda: secrets.token_hex(32))
    capacity: int = 50
    idle_timeout: float = 30.0
    # Processes outlive the caller (relayctl lab up): own session, so no
    # terminal signal reaches them, and stdin closed.
    detached: bool = False
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def config(self) -> dict:
        return relayd_config(self.lab, self.hint_key, idle_timeout=self.idle_timeout)

    @property
    def config_path(self) -> Path:
        return self.workdir / "relayd.toml"

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(to_toml(self.config))
        self.start_relayd()
        self.wait_signaling(timeout)
        for k, ep in enumerate(self.lab.transceivers, start=1):
            self.start_transceiver(k)
        self.wait_transceivers(len(self.lab.transceivers), timeout)

    def _spawn(self, name: str, ns: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.log_path(name), "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = self.lab.popen(ns, [sys.executable, *argv], stdin=subprocess.DEVNULL, stdout=log,
                              stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=self.detached)
        log.close()
        self.procs[name] = proc
        return proc

    def start_relayd(self, *extra_args: str) -> subprocess.Popen:
        return self._spawn("relayd", self.lab.relay_ns, ["-m", "cli.relayd", "-c", str(self.config_path), *extra_args])

    def start_transceiver(self, k: int) -> subprocess.Popen:
        ep = self.lab.transceivers[k - 1]
        return self._spawn(f"tx{k}", ep.ns, [
            "-m", "manager.transceiver", "--id", str(k), "--listen", f"{ep.addr4}:8700",
            "--relay-url", f"http://{ep.relay_addr4}:8080", "--bind", ep.addr4, "--bind", ep.addr6,
            "--capacity", str(self.capacity), "--hint-key-hex", self.hint_key,
        ])

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = self.log_path(name).read_text(errors="replace")[-2000:]
                raise ServicesError(f"{name} exited with {proc.returncode}:\n{tail}")

    def api(self, path: str, timeout: float = 2.0):
        """GET the relay's signaling API from the client namespace."""
        def get():
            with urllib.request.urlopen(self.lab.signaling_url + path, timeout=timeout) as r:
                return json.loads(r.read())
        with NetnsExecutor(self.lab.client_ns) as ex:
            return ex.call(get)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """relayd's Prometheus samples, scraped over HTTP from the client
        namespace and parsed with prometheus_client's parser."""
        from prometheus_client.parser import text_string_to_metric_families

        def get() -> str:
            url = f"http://{self.lab.vip4}:{self.config['metrics']['port']}/metrics"
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read().decode()
        with NetnsExecutor(self.lab.client_ns) as ex:
            text = ex.call(get)
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def wait_signaling(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                self.api("/v1/transceivers", timeout=0.5)
                return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise ServicesError(f"relayd signaling not up after {timeout:.0f}s "
                                        f"(log: {self.log_path('relayd')})") from None
                time.sleep(0.1)

    def wait_transceivers(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            ts = self.api("/v1/transceivers")["transceivers"]
            if sum(1 for t in ts if t["healthy"]) >= n:
                return
            if time.monotonic() > deadline:
                raise ServicesError(f"only {len(ts)} of {n} transceivers registered after {timeout:.0f}s")
            time.sleep(0.1)

    def stop_one(self, name: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def stop(self, *, purge: bool = True) -> None:
        """Stop every service; with purge, also remove the lab's pinned
        datapath state (the namespaces' XDP attachments go with the lab)."""
        for name in [n for n in self.procs if n != "relayd"] + ["relayd"]:
            self.stop_one(name)
        if purge:
            pin_dir = Path(self.config["datapath"]["pin_dir"])
            for p in pin_dir.glob("*"):
                p.unlink()
            if pin_dir.exists():
                pin_dir.rmdir()

    def __enter__(self) -> "Services":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def running_lab(prefix: str, workdir: Path, transceivers: int = 2) -> Iterator[tuple[Lab, Services]]:
    """A lab with relayd and its transceivers running; all of it is torn
    down on exit, pinned state included."""
    from .lab import lab as lab_ctx

    with lab_ctx(prefix=prefix, transceivers=transceivers) as lab:
        svc = Services(lab, workdir=workdir)
        try:
            svc.start()
            yield lab, svc
        finally:
            svc.stop()


# --- the client -----------------------------------------------------------------------

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
    import av
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

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
    status: int = 0
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
    signaling_states: list[str] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)   # name → seconds since the call started
    frames_after: dict[str, int] = field(default_factory=dict)       # audio frames received after each mark
    tone_ratio_after: dict[str, float] = field(default_factory=dict)  # tone strength after each mark (+0.3 s)
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
                      hang_up: bool = True, on_connected=None) -> CallReport:
    """Place one call: POST the offer, play a tone, send data-channel pings,
    measure the echo, then DELETE the call. Runs in the caller's network
    namespace (run it on a NetnsExecutor thread of the client namespace)."""
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

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

    @pc.on("track")
    def _track(track) -> None:
        async def pull() -> None:
            while True:
                try:
                    received.append(await track.recv())
                    arrivals.append(time.monotonic() - rep._t0)
                except Exception:
                    return
        asyncio.ensure_future(pull())

    pc.addTrack(make_tone_track())
    dc = pc.createDataChannel("agent")
    rtts: list[float] = []
    sent_at: dict[str, float] = {}

    @dc.on("message")
    def _msg(message) -> None:
        if isinstance(message, str) and message in sent_at:
            rtts.append((time.monotonic() - sent_at.pop(message)) * 1000)

    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        try:
            async with http.post(signaling_url + "/v1/calls", data=pc.localDescription.sdp,
                                 headers={"Content-Type": "application/sdp"}) as resp:
                rep.status = resp.status
                body = await resp.text()
                if resp.status != 201:
                    rep.error = f"signaling answered {resp.status}: {body.strip()}"
                    await pc.close()
                    return rep
                rep.call_url = str(resp.url.join(aiohttp.client.URL(resp.headers["Location"])))
            await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
            try:
                await asyncio.wait_for(connected.wait(), 15)
            except asyncio.TimeoutError:
                rep.error = f"not connected after 15 s (states {rep.connection_states})"
                return rep
            if on_connected is not None:
                await on_connected(pc, rep)
            # Data channel pings while the tone plays.
            for i in range(messages):
                while dc.readyState != "open":
                    await asyncio.sleep(0.02)
                tag = f"ping-{i}-{secrets.token_hex(4)}"
                sent_at[tag] = time.monotonic()
                dc.send(tag)
                rep.dc_sent += 1
                await asyncio.sleep(duration / max(1, messages))
            await asyncio.sleep(0.5)
            rep.dc_echoed = len(rtts)
            rep.dc_rtt_ms_p50 = round(statistics.median(rtts), 3) if rtts else None
            await _collect_stats(pc, rep)
            rep.audio_frames_received = len(received)
            rep.tone_ratio = _tone_ratio(received[len(received) // 3:])
            for name, at in rep.marks.items():
                after = [f for f, t in zip(received, arrivals) if t >= at]
                rep.frames_after[name] = len(after)
                rep.tone_ratio_after[name] = _tone_ratio([f for f, t in zip(received, arrivals) if t >= at + 0.3])
        finally:
            if hang_up and rep.call_url:
                async with http.delete(rep.call_url) as resp:
                    await resp.read()
            await pc.close()
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
