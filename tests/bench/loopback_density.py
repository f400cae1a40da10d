"""`make bench-density`: transceiver density with cheap clients, both paths in one run.

Each call's ICE and DTLS handshake is real (an aiortc client per call,
straight to the transceiver's shared socket on 127.0.0.1, no relay: it
forwards packets unchanged). The client's own track never yields a frame;
once connected, one loop in this process drives every call's SRTP with that
call's keys: a pre-encoded Opus tone in bursts (0.5 s of tone, 0.5 s of
silence), one packet per 20 ms. The echoes are counted by sequence number
(gaps are losses) and by payload size (voiced or not); the time from a
burst's first packet sent to its echo's first voiced packet is the latency
the transceiver adds (the loopback network's share is a few µs); a few
calls' echoes are decoded and checked for the tone. The transceiver runs in
a child process (tests/bench/profile_transceiver.py); its CPU time over the
media window gives CPU per call-second and calls per core, its RSS growth
the MB per call. This process's own CPU per call-second shows the load
generator is the cheap side.

The loss run (``--loss``): the sender drops each packet with the given
probability (random uplink loss); the transceiver's agent
(tests/bench/metered_agent.py) counts the frames it got, concealed and
rebuilt, and the longest gap it heard.

    .venv/bin/python -m tests.bench.loopback_density [--calls 50 100 200] [--seconds 10] [--json]
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import math
import multiprocessing
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiortc.mediastreams import MediaStreamTrack

from manager.lab.client import tone_power
from manager.protocol import rtp_header
from manager.transceiver.opus import Decoder, Encoder
from tests.bench.bench_tcp import cpu_seconds
from tests.bench.profile_transceiver import _transceiver, place_client, rss_mb
from tests.bench.provenance import run_info

TONE = 440.0
SAMPLED = 3  # calls whose echo is decoded and checked for the tone
VOICED_BYTES = 15
BURST = 25  # frames of tone, then as many of silence
LOSS_CALLS = 20
METERED = "tests.bench.metered_agent"


def tone_packets(burst: int = BURST) -> list[bytes]:
    """One period of the sender's signal: `burst` frames of tone, `burst` of silence."""
    enc = Encoder()
    pcm = array.array("h", (int(8000 * math.sin(2 * math.pi * TONE * i / 48000)) for i in range(960 * burst)))
    tone = [enc.encode(pcm[i * 960:(i + 1) * 960].tobytes()) for i in range(burst)]
    return tone + [enc.encode(bytes(1920)) for _ in range(burst)]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Silent(MediaStreamTrack):
    """A track with no frame ever: aiortc's sender waits on it and sends nothing."""

    kind = "audio"

    async def recv(self):
        await asyncio.Future()


@dataclass
class CheapCall:
    """One connected aiortc client whose media this process drives by hand."""

    pc: object
    payload_type: int
    extensions: bytes
    ssrc: int = 0
    seq: int = 0
    ts_base: int = 0
    sent: int = 0
    echoes: int = 0
    voiced: int = 0  # echoes carrying sound: an Opus packet of more than silence's few bytes
    lost: int = 0
    last_seq: int | None = None
    payloads: list[bytes] = field(default_factory=list)
    keep_payloads: bool = False
    ended: bool = False
    loss: float = 0.0
    dropped: int = 0
    tone_sent: int = 0
    onset_at: float | None = None  # send time of the current burst's first packet, until its echo
    was_voiced: bool = False
    latencies: list[float] = field(default_factory=list)

    async def take_over(self) -> bool:
        """False if the call is no longer connected."""
        # aiortc internals of the *client* (a load generator, not the transceiver).
        t = self.pc.getTransceivers()[0]
        dtls = t.sender.transport
        pair = dtls.transport._connection._nominated.get(1)
        if pair is None:
            return False
        # aiortc's sender never sent (its track has no frame) and stays (its
        # stop() would send RTCP BYE, and aiortc's transceiver would end the
        # call's incoming track): its SSRC's stream starts here.
        self.ssrc = t.sender._ssrc
        self.seq, self.ts_base = random.randint(0, 0xFFFF), random.randint(0, 0xFFFFFFFF)
        self._tx = dtls._tx_srtp
        transport, addr = pair.protocol.transport, pair.remote_addr

        def send(data: bytes) -> None:
            if transport.is_closing():  # the call ended (an overloaded transceiver let consent expire)
                self.ended = True
            else:
                transport.sendto(data, addr)

        self._send = send
        dtls._handle_rtp_data = self._on_rtp  # the echo, unprotected: counted, not decoded
        return True

    async def _on_rtp(self, data: bytes, arrival_time_ms: int) -> None:
        header = rtp_header.parse(data)
        if header is None:
            return
        if self.last_seq is not None:
            gap = (header.sequence - self.last_seq) & 0xFFFF
            if 1 < gap < 0x8000:
                self.lost += gap - 1
        self.last_seq = header.sequence
        self.echoes += 1
        voiced = len(header.payload) > VOICED_BYTES
        if voiced:
            self.voiced += 1
            if not self.was_voiced and self.onset_at is not None:
                self.latencies.append(time.monotonic() - self.onset_at)
                self.onset_at = None
        self.was_voiced = voiced
        if self.keep_payloads:
            self.payloads.append(header.payload)

    def send(self, payload: bytes, k: int, now: float) -> None:
        """Frame `k` of the signal (see tone_packets); lost on the way with probability `loss`."""
        phase = k % (2 * BURST)
        if phase < BURST:
            self.tone_sent += 1
            if phase == 0:
                self.onset_at = now
        packet = rtp_header.build(self.payload_type, False, self.seq, self.ts_base + self.sent * 960, self.ssrc,
                                  payload, self.extensions)
        protected = self._tx.protect(packet)  # protected even when lost: the SRTP index moves on
        if self.loss and random.random() < self.loss:
            self.dropped += 1
        else:
            self._send(protected)
        self.seq = (self.seq + 1) & 0xFFFF
        self.sent += 1


async def _place(conn, n: int, loss: float = 0.0) -> list[CheapCall]:
    calls = []
    for i in range(n):
        pc, answer = await place_client(conn, i + 1, _Silent())  # no frame: the media comes from CheapCall.send
        pt = int(re.search(r"a=rtpmap:(\d+) opus/48000", answer, re.I).group(1))
        mid = re.search(r"a=mid:(\S+)", answer).group(1)
        ext = re.search(r"a=extmap:(\d+) urn:ietf:params:rtp-hdrext:sdes:mid", answer)
        extensions = rtp_header.one_byte_extensions([(int(ext.group(1)), mid.encode())]) if ext else b""
        calls.append(CheapCall(pc, pt, extensions, keep_payloads=i < SAMPLED, loss=loss))
    deadline = time.monotonic() + 30 + n * 0.2
    while any(c.pc.connectionState != "connected" for c in calls) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)  # pacing: a poll of the clients' state
    connected = [c for c in calls if c.pc.connectionState == "connected"]
    await asyncio.sleep(1.0)  # pacing: the hand-overs to the engine settle
    return [c for c in connected if await c.take_over()]


async def _media(calls: list[CheapCall], seconds: float) -> dict:
    """Drive every call's media for `seconds`: this process's CPU and how late its sends ran."""
    packets = tone_packets()
    start, own0, lag = time.monotonic(), _own_cpu(), 0.0
    for k in range(int(seconds / 0.02)):
        now = time.monotonic()
        lag = max(lag, now - (start + k * 0.02))
        for c in calls:
            c.send(packets[k % len(packets)], k, now)
        await asyncio.sleep(max(0.0, start + (k + 1) * 0.02 - time.monotonic()))  # pacing: 20 ms frames
    await asyncio.sleep(0.3)  # pacing: the last echoes come back
    return {"wall": time.monotonic() - start, "own_cpu": _own_cpu() - own0, "lag": lag}


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


async def _step(conn, pid: int, n: int, seconds: float) -> dict:
    calls = await _place(conn, n)
    rss0 = rss_mb(pid)
    cpu0 = cpu_seconds(pid)
    media = await _media(calls, seconds)
    cpu, wall = cpu_seconds(pid) - cpu0, media["wall"]
    tone_ok = 0
    for c in calls[:SAMPLED]:
        dec = Decoder()
        pcm = array.array("h")
        for p in c.payloads[-100:]:
            try:
                pcm.frombytes(dec.decode(p))
            except Exception:
                continue
        if len(pcm) and tone_power(pcm, TONE) > 20 * tone_power(pcm, 1000.0):
            tone_ok += 1
    for c in calls:
        await c.pc.close()
    tone_sent = sum(c.tone_sent for c in calls)
    call_seconds = len(calls) * wall
    latencies = [x * 1000 for c in calls for x in c.latencies]
    return {
        "calls": n, "connected": len(calls), "transceiver_cpu_s": round(cpu, 3),
        "ms_per_call_second": round(cpu / call_seconds * 1000, 2) if call_seconds else None,
        "calls_per_core": round(call_seconds / cpu, 1) if cpu > 0 else None,
        "echo_ratio": round(sum(c.voiced for c in calls) / tone_sent, 3) if tone_sent else 0.0,
        "echo_lost": sum(c.lost for c in calls),
        "frames_per_call": calls[0].sent if calls else 0,
        "added_latency_ms": {"p50": _ms(percentile(latencies, 0.5)), "p99": _ms(percentile(latencies, 0.99)),
                             "bursts": len(latencies)},
        "tone_ok": f"{tone_ok}/{min(SAMPLED, len(calls))}",
        "ended_early": sum(c.ended for c in calls),
        "generator_ms_per_call_second": round(media["own_cpu"] / call_seconds * 1000, 2) if call_seconds else None,
        "generator_lag_ms_max": round(media["lag"] * 1000, 1),
        "rss_mb": round(rss0, 1),
    }


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


async def _loss_step(conn, n: int, seconds: float, loss: float) -> dict:
    loop = asyncio.get_running_loop()
    calls = await _place(conn, n, loss)
    conn.send("report")  # what the agents heard so far (the set-up) is reset
    await loop.run_in_executor(None, conn.recv)
    await _media(calls, seconds)
    conn.send("report")
    heard = await loop.run_in_executor(None, conn.recv)
    for c in calls:
        await c.pc.close()
    sent = sum(c.sent for c in calls)
    return {
        "loss": loss, "calls": n, "connected": len(calls), "frames_sent": sent,
        "frames_dropped": sum(c.dropped for c in calls),
        # Real or concealed; above 1 when the jitter buffer expanded for a late packet.
        "frames_delivered": round(heard["frames"] / sent, 4) if sent else None,
        "frames_real": round(heard["real"] / sent, 4) if sent else None,  # decoded from their own packet
        "frames_concealed": heard["concealed"], "frames_fec": heard["fec"],
        "longest_gap_ms": heard["longest_gap_ms"],
    }


def _with_transceiver(engine: bool, body, agents: str | None = None):
    """Run `body(conn, pid, idle_rss)` against a fresh transceiver child."""
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("spawn").Process(target=_transceiver, args=(child, engine, 1, agents),
                                                        daemon=True)
    proc.start()
    assert parent.recv() == "ready"
    try:
        return asyncio.run(body(parent, proc.pid, rss_mb(proc.pid)))
    finally:
        parent.send(None)
        proc.join(15)


def run_path(engine: bool, counts: list[int], seconds: float) -> list[dict]:
    steps = []
    for n in counts:
        print(f"  {'engine' if engine else 'aiortc'}: {n} calls for {seconds:g} s...", file=sys.stderr)

        async def body(conn, pid, idle_rss, n=n):
            step = await _step(conn, pid, n, seconds)
            step["mb_per_call"] = round((step.pop("rss_mb") - idle_rss) / max(step["connected"], 1), 2)
            return step

        step = _with_transceiver(engine, body)
        steps.append(step)
        if not holds(step):
            break  # degraded: the next step up would only be worse
    return steps


def run_loss(engine: bool, losses: list[float], seconds: float, calls: int = LOSS_CALLS) -> list[dict]:
    out = []
    for loss in losses:
        print(f"  {'engine' if engine else 'aiortc'}: {calls} calls at {loss:.0%} uplink loss...", file=sys.stderr)
        out.append(_with_transceiver(engine, lambda conn, pid, rss, loss=loss: _loss_step(conn, calls, seconds, loss),
                                     METERED))
    return out


#: An echo later than this through the transceiver is a degraded one (a broken turn).
MAX_ADDED_LATENCY_MS = 200.0


def holds(step: dict) -> bool:
    """Every call connected and echoed (at least 95 % of its tone frames back
    voiced, at most 1 % of its echoes missing, the added latency's p99 at
    most MAX_ADDED_LATENCY_MS), the sampled tones intact."""
    n = min(SAMPLED, step["connected"])
    frames = step["connected"] * step.get("frames_per_call", 0)
    p99 = step["added_latency_ms"]["p99"]
    return (step["connected"] == step["calls"] and step["echo_ratio"] >= 0.95 and step["ended_early"] == 0
            and step["echo_lost"] <= 0.01 * frames and step["tone_ok"] == f"{n}/{n}"
            and p99 is not None and p99 <= MAX_ADDED_LATENCY_MS)


def summary(steps: dict[str, list[dict]]) -> dict:
    """The issue's layout, from the highest step of each path that holds."""
    best = {path: max((s for s in ss if holds(s)), key=lambda s: s["calls"], default=None)
            for path, ss in steps.items()}
    pick = {path: (lambda key, b=b: None if b is None else b[key]) for path, b in best.items()}
    return {
        "calls_per_core": {p: f("calls_per_core") for p, f in pick.items()},
        "ms_per_call_second": {p: f("ms_per_call_second") for p, f in pick.items()},
        "added_latency_ms": {p: (None if b is None else {k: b["added_latency_ms"][k] for k in ("p50", "p99")})
                             for p, b in best.items()},
        "mb_per_call": {p: f("mb_per_call") for p, f in pick.items()},
        "highest_step_that_holds": {p: f("calls") for p, f in pick.items()},
        "steps": {p: [{**s, "holds": holds(s)} for s in ss] for p, ss in steps.items()},
    }


def plot(res: dict, path) -> None:
    """Calls per core and CPU per call-second against N, both paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, steps in res["steps"].items():
        n = [s["calls"] for s in steps]
        left.plot(n, [s["calls_per_core"] for s in steps], marker="o", label=name)
        right.plot(n, [s["ms_per_call_second"] for s in steps], marker="o", label=name)
        for s in steps:
            if not s["holds"]:
                left.annotate("degraded", (s["calls"], s["calls_per_core"]), fontsize=8)
    left.set(xlabel="concurrent echo calls (N)", ylabel="calls per core", title="Calls per core")
    right.set(xlabel="concurrent echo calls (N)", ylabel="ms of transceiver CPU per call-second",
              title="CPU per call-second")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.loopback_density", description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, nargs="+", default=[50, 100, 150, 200, 300],
                    help="steps of N concurrent calls (each path stops at its first step that degrades)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--paths", nargs="+", default=["engine", "aiortc"], choices=["engine", "aiortc"])
    ap.add_argument("--loss", type=float, nargs="*", default=[0.01, 0.02, 0.05],
                    help=f"uplink loss rates for the loss run ({LOSS_CALLS} calls each; none: skip it)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", type=Path, help="also write the JSON here (docs/bench-loopback-density.json)")
    ap.add_argument("--plot", type=Path, help="write the plot here (docs/bench-loopback-density.png)")
    args = ap.parse_args(argv)
    res = summary({p: run_path(p == "engine", args.calls, args.seconds) for p in args.paths})
    res["loss"] = {p: {f"{x:g}": run_loss(p == "engine", [x], args.seconds)[0] for x in args.loss}
                   for p in args.paths} if args.loss else {}
    res["run"] = run_info("tests.bench.loopback_density", argv)
    if args.save:
        args.save.write_text(json.dumps(res, indent=1) + "\n")
    if args.plot:
        plot(res, args.plot)
    if args.json:
        print(json.dumps({k: res[k] for k in ("calls_per_core", "ms_per_call_second", "added_latency_ms",
                                               "mb_per_call", "loss")}, indent=1))
    else:
        for path, steps in res["steps"].items():
            for s in steps:
                lat = s["added_latency_ms"]
                print(f"{path:>7} {s['calls']:>4} calls: {s['ms_per_call_second']} ms/call-s, "
                      f"{s['calls_per_core']} calls/core, echo {s['echo_ratio']}, lost {s['echo_lost']}, "
                      f"latency p50 {lat['p50']} p99 {lat['p99']} ms, tone {s['tone_ok']}, "
                      f"ended early {s['ended_early']}, {s['mb_per_call']} MB/call, generator "
                      f"{s['generator_ms_per_call_second']} ms/call-s{'' if s['holds'] else ' (degraded)'}")
        for path, runs in res["loss"].items():
            for x, r in runs.items():
                print(f"{path:>7} loss {x}: delivered {r['frames_delivered']}, real {r['frames_real']}, concealed {r['frames_concealed']}, "
                      f"fec {r['frames_fec']}, longest gap {r['longest_gap_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
