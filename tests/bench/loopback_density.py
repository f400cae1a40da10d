"""`make bench-density`: transceiver density with cheap clients, the paths in one run.

Each call's ICE and DTLS handshake is real (an aiortc client per call,
straight to the transceiver's shared socket on 127.0.0.1, no relay: it
forwards packets unchanged); the clients are placed in batches and skip
aiortc's media path (tests/bench/loopback_calls.py). Once connected, one loop
in this process drives every call's SRTP with that call's keys: a
pre-encoded Opus tone in bursts (0.5 s of tone, 0.5 s of silence), one
packet per 20 ms. The echoes are counted by sequence number (gaps are
losses) and by payload size (voiced or not); the time from a burst's first
packet sent to its echo's first voiced packet is the latency the transceiver
adds (the loopback network's share is a few µs); a few calls' echoes are
decoded and checked for the tone. The transceiver runs in a child process
(tests/bench/profile_transceiver.py); its CPU time over the media window
gives CPU per call-second and calls per core, its RSS growth the MB per
call. This process's own CPU per call-second shows the load generator is
the cheap side. The paths: ``engine`` (the media engine, sends batched with
sendmmsg), ``engine-sendto`` (one sendto per datagram) and ``aiortc``; each
step runs every path in turn, so their ratios are read under the same load.

The loss run (``--loss``): random uplink loss, applied by the kernel on a
veth into the transceiver's network namespace when run as root
(tests/bench/loopback_netns.py), else by the sender (each result says which
``mode``); the transceiver's agent (tests/bench/metered_agent.py) counts the
frames it got, concealed and rebuilt, and the longest gap it heard.

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
import sys
import time
from pathlib import Path

from manager.lab.client import tone_power
from manager.transceiver.opus import Decoder, Encoder
from tests.bench import loopback_netns
from tests.bench.bench_tcp import cpu_seconds
from tests.bench.loopback_calls import BURST, VOICED_BYTES, CheapCall, place_calls
from tests.bench.profile_transceiver import _transceiver, rss_mb
from tests.bench.provenance import run_info

TONE = 440.0
SAMPLED = 3  # calls whose echo is decoded and checked for the tone
LOSS_CALLS = 20
METERED = "tests.bench.metered_agent"
SEND_GROUPS = 10  # the calls' send times spread over each frame (_media)


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


async def _media(calls: list[CheapCall], seconds: float) -> dict:
    """Drive every call's media for `seconds`: this process's CPU and how late its sends ran.

    The calls send in SEND_GROUPS groups spread over each 20 ms frame, as
    independent clients' clocks fall: all at one instant, the last call's
    echo would wait for the transceiver to work through every other call's
    packet first, a queue no real set of clients builds."""
    packets = tone_packets()
    start, own0, lag = time.monotonic(), _own_cpu(), 0.0
    groups = [calls[g::SEND_GROUPS] for g in range(SEND_GROUPS)]
    for k in range(int(seconds / 0.02)):
        for g, group in enumerate(groups):
            due = start + k * 0.02 + g * 0.02 / SEND_GROUPS
            await asyncio.sleep(max(0.0, due - time.monotonic()))  # pacing: this group's place in the frame
            now = time.monotonic()
            lag = max(lag, now - due)
            for c in group:
                c.send(packets[k % len(packets)], k, now)
    await asyncio.sleep(0.3)  # pacing: the last echoes come back
    return {"wall": time.monotonic() - start, "own_cpu": _own_cpu() - own0, "lag": lag}


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


async def _step(conn, pid: int, n: int, seconds: float, engine: bool = True) -> dict:
    calls, setup = await place_calls(conn, n, sampled=SAMPLED, voiced_bytes=VOICED_BYTES["engine" if engine else "aiortc"])
    rss0 = rss_mb(pid)
    cpu0 = cpu_seconds(pid)
    udp0 = _udp_rcvbuf_errors()
    media = await _media(calls, seconds)
    cpu, wall = cpu_seconds(pid) - cpu0, media["wall"]
    udp_errors = _udp_rcvbuf_errors() - udp0
    conn.send("calls")
    health = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
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
        "rss_mb": round(rss0, 1), **setup,
        "udp_rcvbuf_errors": udp_errors,  # the whole machine's (other sessions' too)
        "engine": {k: health["engine"][k] for k in ("calls", "late_ticks", "max_tick_ms")},
        "demux_rx": health["demux"].get("rx", 0),
        "runtime": {k: health["runtime"][k] for k in ("loop", "gc")} if "runtime" in health else None,
    }


def _udp_rcvbuf_errors() -> int:
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Udp:")]
    return int(lines[1][lines[0].index("RcvbufErrors")])


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


async def _loss_step(conn, n: int, seconds: float, loss: float, host: str, kernel: bool) -> dict:
    loop = asyncio.get_running_loop()
    calls, _ = await place_calls(conn, n, loss=0.0 if kernel else loss, host=host)
    conn.send("report")  # what the agents heard so far (the set-up) is reset
    await loop.run_in_executor(None, conn.recv)
    if kernel:
        loopback_netns.drop(loss)
    await _media(calls, seconds)
    dropped = loopback_netns.dropped() if kernel else sum(c.dropped for c in calls)
    if kernel:
        loopback_netns.clear()
    conn.send("report")
    heard = await loop.run_in_executor(None, conn.recv)
    for c in calls:
        await c.pc.close()
    sent = sum(c.sent for c in calls)

    def share(x: int) -> float | None:
        return round(x / sent, 4) if sent else None

    return {
        "loss": loss, "mode": "kernel" if kernel else "sender", "calls": n, "connected": len(calls),
        "frames_sent": sent, "frames_dropped": dropped,
        # Each sent frame the agent heard in its time slot: from its own
        # packet, rebuilt from FEC, or concealed because it was lost.
        "frames_delivered": share(heard["delivered"]),
        "frames_real": share(heard["real"]),
        "frames_concealed": heard["concealed"], "frames_fec": heard["fec"],
        # Concealment played while a late frame was awaited (added delay, not a frame sent).
        "frames_expanded": heard["expanded"],
        "longest_gap_ms": heard["longest_gap_ms"],
    }


#: The paths a run compares: (calls on the media engine, sends batched with sendmmsg).
PATHS = {"engine": (True, True), "engine-sendto": (True, False), "aiortc": (False, True)}


def _with_transceiver(path: str, body, agents: str | None = None, host: str = "127.0.0.1",
                      netns: str | None = None):
    """Run `body(conn, pid, idle_rss)` against a fresh transceiver child carrying calls on `path`."""
    engine, batched = PATHS[path]
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("spawn").Process(
        target=_transceiver, args=(child, engine, 1, agents, host, netns, batched), daemon=True)
    proc.start()
    assert parent.recv() == "ready"
    try:
        return asyncio.run(body(parent, proc.pid, rss_mb(proc.pid)))
    finally:
        parent.send(None)
        proc.join(15)


def _run_step(path: str, n: int, seconds: float) -> dict:
    print(f"  {path}: {n} calls for {seconds:g} s...", file=sys.stderr)

    async def body(conn, pid, idle_rss):
        step = await _step(conn, pid, n, seconds, PATHS[path][0])
        step["mb_per_call"] = round((step.pop("rss_mb") - idle_rss) / max(step["connected"], 1), 2)
        return step

    return _with_transceiver(path, body)


def run_steps(paths: list[str], counts: list[int], seconds: float,
              keep_going: tuple[str, ...] = ()) -> dict[str, list[dict]]:
    """Each step of `counts` calls on every path in turn (their ratios are read
    under the same load); a path stops at its first step that degrades, unless
    it is in `keep_going`."""
    steps: dict[str, list[dict]] = {p: [] for p in paths}
    for n in counts:
        for path in paths:
            done = steps[path]
            if done and not holds(done[-1]) and path not in keep_going:
                continue  # degraded: the next step up would only be worse
            done.append(_run_step(path, n, seconds))
    return steps


def run_path(path: str, counts: list[int], seconds: float) -> list[dict]:
    return run_steps([path], counts, seconds)[path]


def run_loss(path: str, losses: list[float], seconds: float, calls: int = LOSS_CALLS,
             kernel: bool | None = None) -> list[dict]:
    """The loss run: by the kernel on a veth into the transceiver's namespace
    when root (`kernel` None: if possible), else by the sender."""
    kernel = loopback_netns.kernel_loss_available() if kernel is None else kernel
    out = []
    for loss in losses:
        print(f"  {path}: {calls} calls at {loss:.0%} uplink loss "
              f"({'kernel' if kernel else 'sender'})...", file=sys.stderr)
        if kernel:
            with loopback_netns.link() as (gen, tx):
                out.append(_with_transceiver(
                    path, lambda conn, pid, rss, loss=loss: _loss_step(conn, calls, seconds, loss, gen, True),
                    METERED, tx, loopback_netns.NETNS))
        else:
            out.append(_with_transceiver(
                path, lambda conn, pid, rss, loss=loss: _loss_step(conn, calls, seconds, loss, "127.0.0.1", False),
                METERED))
    return out


NOTE = ("the machine's 2 cores are shared with other sessions' test runs and with the load generator, "
        "so absolute figures move between runs; the paths run each step in turn: compare them within this run")

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
    ap.add_argument("--calls", type=int, nargs="+", default=[10, 25, 50, 100, 150, 200, 300],
                    help="steps of N concurrent calls (each path stops at its first step that degrades)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--paths", nargs="+", default=["engine", "engine-sendto", "aiortc"], choices=list(PATHS),
                    help="engine-sendto: the engine with one sendto per datagram (no sendmmsg)")
    ap.add_argument("--keep-going", nargs="*", default=["engine"], choices=list(PATHS),
                    help="paths that run every step, degraded or not (the load generator's 300 calls)")
    ap.add_argument("--loss-paths", nargs="+", default=["engine", "aiortc"], choices=list(PATHS))
    ap.add_argument("--loss", type=float, nargs="*", default=[0.0, 0.01, 0.02, 0.05],
                    help=f"uplink loss rates for the loss run ({LOSS_CALLS} calls each; none: skip it)")
    ap.add_argument("--note", default=NOTE, help="the provenance note kept with the figures (what disturbed them)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", type=Path, help="also write the JSON here (docs/bench-loopback-density.json)")
    ap.add_argument("--plot", type=Path, help="write the plot here (docs/bench-loopback-density.png)")
    args = ap.parse_args(argv)
    load0 = os.getloadavg()[0]
    res = summary(run_steps(args.paths, args.calls, args.seconds, tuple(args.keep_going)))
    res["loss"] = {p: {f"{x:g}": run_loss(p, [x], args.seconds)[0] for x in args.loss}
                   for p in args.loss_paths} if args.loss else {}
    res["run"] = run_info("tests.bench.loopback_density", argv)
    load = f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    res["run"]["note"] = f"note: {args.note}; {load}"
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
                print(f"{path:>13} {s['calls']:>4} calls: {s['ms_per_call_second']} ms/call-s, "
                      f"{s['calls_per_core']} calls/core, echo {s['echo_ratio']}, lost {s['echo_lost']}, "
                      f"latency p50 {lat['p50']} p99 {lat['p99']} ms, tone {s['tone_ok']}, "
                      f"ended early {s['ended_early']}, {s['mb_per_call']} MB/call, generator "
                      f"{s['generator_ms_per_call_second']} ms/call-s, set-up {s['setup_s']} s, failed {s['failed']}"
                      f"{'' if s['holds'] else ' (degraded)'}")
        for path, runs in res["loss"].items():
            for x, r in runs.items():
                print(f"{path:>13} loss {x} ({r['mode']}): delivered {r['frames_delivered']}, real {r['frames_real']}, "
                      f"concealed {r['frames_concealed']}, fec {r['frames_fec']}, expanded {r['frames_expanded']}, "
                      f"longest gap {r['longest_gap_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
