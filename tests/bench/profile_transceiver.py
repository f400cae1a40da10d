"""Where a transceiver's CPU goes: N echo calls on loopback, sampled by py-spy.

The transceiver runs in a child process (its own event loop, calls placed
over a pipe); the parent holds N aiortc clients, each playing a tone, that
connect straight to the transceiver's shared socket on 127.0.0.1 (no relay:
the relay forwards packets unchanged, so the transceiver's work is the
same). After the calls connect, py-spy samples the child for `--seconds`
and the stacks are grouped by what the innermost project or library frame
is doing (docs/media-engine.md, "Profile"). Needs no root and no lab.

    .venv/bin/python -m tests.bench.profile_transceiver [--calls 4] [--seconds 15] [--engine] [--raw FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path

from manager.transceiver.opus import DEFAULT_COMPLEXITY
from tests.bench.bench_tcp import cpu_seconds

#: Stack-frame patterns, first match wins (innermost frame first).
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("opus encode", ("OpusEncoder.encode", "Encoder.encode (manager/transceiver/opus.py")),
    ("opus decode", ("OpusDecoder.decode", "(manager/transceiver/opus.py")),
    ("thread hand-offs", ("ThreadPoolExecutor", "Condition.", "_write_to_self", "_read_from_self",
                          "call_soon_threadsafe", "Semaphore", "_WorkItem", "run_in_executor", "_chain_future",
                          "_copy_future_state", "concurrent/futures")),
    ("agent audio (resample, FIFO, pacing)", ("AgentAudioTrack", "agent.py", "silence_frame")),
    ("socket send/receive and demux", ("sendto", "_read_ready", "recvfrom", "ice_mux.py", "batch_send.py")),
    ("srtp (libsrtp)", ("Session.protect", "Session.unprotect", "Session.__process", "protect_rtcp")),
    ("audio level", ("compute_audio_level_dbov",)),
    ("jitter buffer", ("jitterbuffer.py", "jitter.py")),
    ("rtp/rtcp parse and build", ("rtp.py", "rtcp", "HeaderExtensionsMap")),
    ("dtls / sctp", ("rtcdtlstransport.py", "dtls_record", "rtcsctptransport.py", "imported_data")),
    ("ice / stun", ("aioice", "_stun_received")),
    ("media engine (call_media, media_engine, imported_call)", ("media_engine.py", "call_media.py",
                                                                "imported_call.py", "rtp_header.py")),
    ("asyncio event loop", ("asyncio/",)),
]


#: Innermost frames of a thread that waits (py-spy samples every thread).
#: Under uvloop the loop is C: a stack that ends at the runner is the loop
#: waiting in epoll (or in its own C code, which py-spy cannot tell apart).
IDLE = ("EpollSelector.select", "Condition.wait", "_worker (concurrent/futures/thread.py:81)",
        "Runner.run (asyncio/runners.py")


def _transceiver(conn: Connection, engine: bool, complexity: int, agents: str | None = None,
                 host: str = "127.0.0.1", netns: str | None = None, batched: bool = True,
                 uvloop: bool = True, gc_tuned: bool = True) -> None:
    """Child: a transceiver on `host` answering offers sent over `conn`.
    `agents` names a module whose ``Agent`` class is every call's agent and
    whose ``report(tx)`` answers a ``"report"`` request (default: the echo
    agent). ``"calls"`` answers how many calls settled: on the media engine
    (engine path) or placed (aiortc path). `netns` names a network namespace
    (``ip netns``) the child enters first; `batched` False sends one datagram
    per syscall (ice_mux.BATCHED_SENDS); `uvloop` and `gc_tuned` as the
    transceiver's own process runs (manager/transceiver/runtime.py)."""
    import importlib

    from manager.transceiver import ice_mux, runtime

    ice_mux.BATCHED_SENDS = batched

    if netns is not None:
        _enter_netns(netns)

    from manager.transceiver.agent import EchoAgent
    from manager.transceiver.transceiver import Transceiver

    module = importlib.import_module(agents) if agents else None

    async def main() -> None:
        tx = Transceiver(1, capacity=2000, bind_addrs=[host], media_engine=engine,
                         opus_complexity=complexity, agent_factory=module.Agent if module else EchoAgent)
        await tx.start()
        if gc_tuned:
            runtime.tune_gc()
        conn.send("ready")
        loop = asyncio.get_running_loop()
        while True:
            req = await loop.run_in_executor(None, conn.recv)
            if req is None:
                break
            if req == "report":
                conn.send(module.report(tx) if module else None)
                continue
            if req == "calls":
                health = tx.health()
                conn.send({"settled": health["media_engine"]["calls"] if engine else len(tx.calls()),
                           "engine": health["media_engine"], "demux": health["demux"],
                           "runtime": health.get("runtime")})
                continue
            try:
                conn.send(await tx.create_call(*req))
            except Exception as exc:  # the parent reports it
                conn.send(exc)
        await tx.stop()

    runtime.run(main(), use_uvloop=uvloop)


def _enter_netns(name: str) -> None:
    """Move this process into network namespace `name` (Python 3.11 has no os.setns)."""
    import ctypes

    clone_newnet = 0x40000000
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, clone_newnet) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
    finally:
        os.close(fd)


async def place_client(conn: Connection, conn_id: int, track, on_track=None,
                       host: str = "127.0.0.1") -> tuple[object, str]:
    """An aiortc client (`track` and a data channel; `on_track` gets the
    echo's track) gathering on `host` only, whose call the child transceiver
    answers over `conn`: (the peer connection, the answer)."""
    import aioice.ice
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    from manager.protocol.sdp import strip_candidates

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(track)
    pc.createDataChannel("chat")
    if on_track is not None:
        pc.on("track", on_track)
    # `host` only, while this client gathers; restored after, since the
    # process (a pytest run, say) may place other clients on real interfaces.
    gather = aioice.ice.get_host_addresses
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: [host]
    try:
        await pc.setLocalDescription(await pc.createOffer())
    finally:
        aioice.ice.get_host_addresses = gather
    conn.send((conn_id, f"call{conn_id:04d}aaaabbbbccccdddd", strip_candidates(pc.localDescription.sdp)))
    reply = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    if isinstance(reply, Exception):
        raise reply
    await pc.setRemoteDescription(RTCSessionDescription(sdp=reply[0], type="answer"))
    return pc, reply[0]


async def _clients(conn: Connection, n: int, seconds: float, on_media) -> list[int]:
    from manager.lab.client import make_tone_track

    pcs, received = [], [0] * n
    for i in range(n):

        def on_track(track, i=i) -> None:
            async def read() -> None:
                while True:
                    await track.recv()
                    received[i] += 1
            asyncio.ensure_future(read())

        pc, _ = await place_client(conn, i + 1, make_tone_track(440.0), on_track)
        pcs.append(pc)
    deadline = time.monotonic() + 30
    while any(pc.connectionState != "connected" for pc in pcs) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)  # pacing: a poll of the clients' state
    await asyncio.sleep(2)  # let the echo start before sampling
    await asyncio.get_running_loop().run_in_executor(None, on_media)
    for pc in pcs:
        await pc.close()
    return received


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def categorize(raw: Path) -> tuple[Counter[str], int]:
    """py-spy --format raw: `frame;frame;... count`, outermost first."""
    totals: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        if any(mark in frames[-1] for mark in IDLE):
            totals["idle"] += n
            continue
        for frame in reversed(frames):
            hit = next((name for name, pats in CATEGORIES if any(p in frame for p in pats)), None)
            if hit is not None:
                totals[hit] += n
                break
        else:
            totals["other"] += n
    return totals, samples


def _record(pid: int, seconds: float, raw: Path) -> None:
    subprocess.run([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid),
                    "--rate", "200", "--duration", str(int(seconds)), "--format", "raw",
                    "--nonblocking", "-o", str(raw)], check=True, capture_output=True)


def _print_shares(totals: Counter[str], samples: int) -> None:
    busy = samples - totals["idle"]
    print(f"{'share of busy samples':<28} %")
    for name, n in totals.most_common():
        if name != "idle":
            print(f"  {name:<26} {100 * n / max(busy, 1):5.1f}")


def _profile_generator(args: argparse.Namespace) -> int:
    """The engine under the density run's load generator, sampled while its media runs."""
    import threading

    from tests.bench import loopback_density as density

    raw = args.raw or Path(tempfile.mkstemp(suffix=".raw")[1])
    figures: dict = {}

    async def body(conn, pid, idle_rss):
        calls, _ = await density.place_calls(conn, args.calls, voiced_bytes=density.VOICED_BYTES["engine"])
        cpu0 = cpu_seconds(pid)
        spy = threading.Thread(target=_record, args=(pid, args.seconds, raw))
        spy.start()
        media = await density._media(calls, args.seconds + 1)
        spy.join()
        figures["ms"] = (cpu_seconds(pid) - cpu0) / (len(calls) * media["wall"]) * 1000
        lat = sorted(x * 1000 for c in calls for x in c.latencies)
        figures["p50"], figures["p99"] = density.percentile(lat, 0.5), density.percentile(lat, 0.99)
        figures["lost"] = sum(c.lost for c in calls)
        for c in calls:
            await c.pc.close()

    density._with_transceiver("engine", body)
    totals, samples = categorize(raw)
    print(f"{args.calls} engine calls: transceiver {figures['ms']:.2f} ms CPU per call-second, added latency "
          f"p50 {figures['p50']:.1f} p99 {figures['p99']:.1f} ms, echoes lost {figures['lost']}")
    _print_shares(totals, samples)
    if args.raw is None:
        os.unlink(raw)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.profile_transceiver",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--engine", action="store_true", help="carry the calls on the media engine")
    ap.add_argument("--complexity", type=int, default=DEFAULT_COMPLEXITY, help="the engine's Opus complexity")
    ap.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks here")
    ap.add_argument("--generator", action="store_true",
                    help="the density run's cheap clients (tests/bench/loopback_calls.py) instead of whole "
                         "aiortc clients: 50-100 calls on this machine (implies --engine)")
    args = ap.parse_args(argv)
    if args.generator:
        return _profile_generator(args)
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("spawn").Process(target=_transceiver, args=(child, args.engine, args.complexity), daemon=True)
    proc.start()
    raw = args.raw or Path(tempfile.mkstemp(suffix=".raw")[1])
    figures: dict[str, float] = {}
    assert parent.recv() == "ready"
    figures["rss_idle_mb"] = rss_mb(proc.pid)

    def on_media() -> None:
        figures["rss_calls_mb"] = rss_mb(proc.pid)
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        _record(proc.pid, args.seconds, raw)
        figures["cpu_s"] = cpu_seconds(proc.pid) - cpu0
        figures["wall_s"] = time.monotonic() - t0

    received = asyncio.run(_clients(parent, args.calls, args.seconds, on_media))
    parent.send(None)
    proc.join(10)
    totals, samples = categorize(raw)
    ms = figures["cpu_s"] / (args.calls * figures["wall_s"]) * 1000
    print(f"{args.calls} calls, {figures['wall_s']:.1f} s: transceiver CPU {figures['cpu_s']:.2f} s "
          f"= {ms:.1f} ms per call-second; echo frames at the clients: min {min(received)}; "
          f"memory {(figures['rss_calls_mb'] - figures['rss_idle_mb']) / args.calls:.2f} MB per call (RSS)")
    _print_shares(totals, samples)
    if args.raw is None:
        os.unlink(raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
