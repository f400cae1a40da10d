"""Transceiver density on loopback with cheap clients: both paths, steps of N calls.

Each call's ICE and DTLS handshake is real (an aiortc client per call,
straight to the transceiver's shared socket on 127.0.0.1, no relay: it
forwards packets unchanged). The client's own track never yields a frame;
once connected, one loop in this process drives every call's SRTP with that
call's keys: a pre-encoded Opus tone, one packet per 20 ms, and
the echoes counted by sequence number (gaps are losses); a few calls' echoes
are decoded and checked for the tone. The transceiver runs in a child
process (tests/bench/profile_transceiver.py); its CPU time over the media
window gives CPU per call-second and calls per core. No root, no lab.

    .venv/bin/python -m tests.bench.loopback_density [--calls 25 50 100] [--seconds 10] [--json]
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import math
import multiprocessing
import random
import re
import sys
import time
from dataclasses import dataclass, field

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


def tone_packets(frames: int = 50) -> list[bytes]:
    enc = Encoder()
    pcm = array.array("h", (int(8000 * math.sin(2 * math.pi * TONE * i / 48000)) for i in range(960 * frames)))
    return [enc.encode(pcm[i * 960:(i + 1) * 960].tobytes()) for i in range(frames)]


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
        if len(header.payload) > VOICED_BYTES:
            self.voiced += 1
        if self.keep_payloads:
            self.payloads.append(header.payload)

    def send(self, payload: bytes) -> None:
        packet = rtp_header.build(self.payload_type, False, self.seq, self.ts_base + self.sent * 960, self.ssrc,
                                  payload, self.extensions)
        self._send(self._tx.protect(packet))
        self.seq = (self.seq + 1) & 0xFFFF
        self.sent += 1


async def _place(conn, n: int) -> list[CheapCall]:
    calls = []
    for i in range(n):
        pc, answer = await place_client(conn, i + 1, _Silent())  # no frame: the media comes from CheapCall.send
        pt = int(re.search(r"a=rtpmap:(\d+) opus/48000", answer, re.I).group(1))
        mid = re.search(r"a=mid:(\S+)", answer).group(1)
        ext = re.search(r"a=extmap:(\d+) urn:ietf:params:rtp-hdrext:sdes:mid", answer)
        extensions = rtp_header.one_byte_extensions([(int(ext.group(1)), mid.encode())]) if ext else b""
        calls.append(CheapCall(pc, pt, extensions, keep_payloads=i < SAMPLED))
    deadline = time.monotonic() + 30 + n * 0.2
    while any(c.pc.connectionState != "connected" for c in calls) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)  # pacing: a poll of the clients' state
    connected = [c for c in calls if c.pc.connectionState == "connected"]
    await asyncio.sleep(1.0)  # pacing: the hand-overs to the engine settle
    return [c for c in connected if await c.take_over()]


async def _step(conn, pid: int, n: int, seconds: float) -> dict:
    calls = await _place(conn, n)
    packets = tone_packets()
    rss0 = rss_mb(pid)
    start = time.monotonic()
    cpu0 = cpu_seconds(pid)
    frames = int(seconds / 0.02)
    for k in range(frames):
        for c in calls:
            c.send(packets[k % len(packets)])
        await asyncio.sleep(max(0.0, start + (k + 1) * 0.02 - time.monotonic()))  # pacing: 20 ms frames
    await asyncio.sleep(0.3)  # pacing: the last echoes come back
    cpu, wall = cpu_seconds(pid) - cpu0, time.monotonic() - start
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
    sent = sum(c.sent for c in calls)
    call_seconds = len(calls) * wall
    return {
        "calls": n, "connected": len(calls), "transceiver_cpu_s": round(cpu, 3),
        "ms_per_call_second": round(cpu / call_seconds * 1000, 2) if call_seconds else None,
        "calls_per_core": round(call_seconds / cpu, 1) if cpu > 0 else None,
        "echo_ratio": round(sum(c.voiced for c in calls) / sent, 3) if sent else 0.0,
        "echo_lost": sum(c.lost for c in calls),
        "tone_ok": f"{tone_ok}/{min(SAMPLED, len(calls))}",
        "ended_early": sum(c.ended for c in calls),
        "rss_mb": round(rss0, 1),
    }


def run_path(engine: bool, counts: list[int], seconds: float) -> list[dict]:
    steps = []
    for n in counts:
        parent, child = multiprocessing.Pipe()
        proc = multiprocessing.get_context("spawn").Process(target=_transceiver, args=(child, engine, 1),
                                                            daemon=True)
        proc.start()
        assert parent.recv() == "ready"
        idle_rss = rss_mb(proc.pid)
        print(f"  {'engine' if engine else 'aiortc'}: {n} calls for {seconds:g} s...", file=sys.stderr)
        step = asyncio.run(_step(parent, proc.pid, n, seconds))
        step["mb_per_call"] = round((step.pop("rss_mb") - idle_rss) / max(step["connected"], 1), 2)
        steps.append(step)
        parent.send(None)
        proc.join(15)
    return steps


def holds(step: dict) -> bool:
    """Every call echoed (at least 95 % of its frames back voiced), the sampled tones intact."""
    n = min(SAMPLED, step["connected"])
    return (step["connected"] == step["calls"] and step["echo_ratio"] >= 0.95 and step["ended_early"] == 0
            and step["tone_ok"] == f"{n}/{n}")


def summary(steps: dict[str, list[dict]]) -> dict:
    """The issue's layout, from the highest step of each path that holds."""
    best = {path: max((s for s in ss if holds(s)), key=lambda s: s["calls"], default=None)
            for path, ss in steps.items()}
    pick = {path: (lambda key, b=b: None if b is None else b[key]) for path, b in best.items()}
    return {
        "calls_per_core": {p: f("calls_per_core") for p, f in pick.items()},
        "ms_per_call_second": {p: f("ms_per_call_second") for p, f in pick.items()},
        "mb_per_call": {p: f("mb_per_call") for p, f in pick.items()},
        "highest_step_that_holds": {p: f("calls") for p, f in pick.items()},
        "steps": {p: [{**s, "holds": holds(s)} for s in ss] for p, ss in steps.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.loopback_density", description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, nargs="+", default=[25, 50])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--paths", nargs="+", default=["engine", "aiortc"], choices=["engine", "aiortc"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = summary({p: run_path(p == "engine", args.calls, args.seconds) for p in args.paths})
    res["run"] = run_info("tests.bench.loopback_density", argv)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        for path, steps in res["steps"].items():
            for s in steps:
                print(f"{path:>7} {s['calls']:>4} calls: {s['ms_per_call_second']} ms/call-s, "
                      f"{s['calls_per_core']} calls/core, echo {s['echo_ratio']}, lost {s['echo_lost']}, "
                      f"tone {s['tone_ok']}, ended early {s['ended_early']}, {s['mb_per_call']} MB/call"
                      f"{'' if s['holds'] else ' (degraded)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
