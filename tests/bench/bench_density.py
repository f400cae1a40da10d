"""Transceiver density: concurrent echo calls one core of a transceiver carries.

One lab with a single transceiver (every call lands on it). For each step
of N concurrent calls (aiortc clients in the client namespace, each playing
a tone and sending data-channel pings for S seconds), the transceiver's CPU
time (utime + stime from /proc) while the calls run, less what it spends
with no call over the same time (measured first), gives:

- CPU per call-second (its ICE, DTLS, SRTP, the echo agent's audio decode
  and encode, the data channel);
- calls per core = call-seconds carried / CPU seconds spent.

Each step also reports how many calls connected and the echo's quality
(tone ratio, packets lost), so a step where the machine ran out of CPU
shows as such rather than as a figure. The clients run on the same
machine: 8 aiortc clients saturate 2 CPUs, so the steps stay small and the
per-core figure is what the transceiver's own accounting gives.
Prints figures; asserts nothing about speed.

    sudo .venv/bin/python -m tests.bench.bench_density [--calls 1 2 4] [--seconds 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

from manager.lab.netns import NetnsExecutor
from manager.lab.services import running_lab
from tests.bench.bench_tcp import _calls, cpu_seconds, idle_cpu
from tests.bench.provenance import run_info

TRANSCEIVER = "tx1"


def step(lab, pid: int, n: int, seconds: float, idle_per_s: float) -> dict:
    import asyncio

    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    with NetnsExecutor(lab.client_ns) as ex:
        reps = ex.call(asyncio.run, _calls(lab, n, seconds, False, {}))
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    ok = [r for r in reps if r.connected and r.error is None]
    cpu = max(0.0, cpu1 - cpu0 - idle_per_s * (t1 - t0))
    call_seconds = len(ok) * seconds  # media time; set-up and hang-up are in the CPU too
    return {
        "calls": n, "connected": len(ok), "wall_s": round(t1 - t0, 2), "transceiver_cpu_s": round(cpu, 3),
        "cpu_ms_per_call_second": round(cpu / call_seconds * 1000, 2) if call_seconds else None,
        "calls_per_core": round(call_seconds / cpu, 1) if cpu > 0 and call_seconds else None,
        "tone_ratio_min": round(min((r.tone_ratio for r in ok), default=0.0), 1),
        "audio_frames_min": min((r.audio_frames_received for r in ok), default=0),
        "rtp_lost": sum(r.rtp_packets_lost for r in ok),
    }


def run(counts: list[int], seconds: float) -> dict:
    with running_lab(f"bd{secrets.token_hex(3)}", Path(tempfile.mkdtemp(prefix="bench-density-")),
                     transceivers=1) as (lab, svc):
        pid = svc.procs[TRANSCEIVER].pid
        print(f"  transceiver with no call for {seconds:g} s...", file=sys.stderr)
        idle = idle_cpu(pid, seconds) / seconds
        steps = []
        for n in counts:
            print(f"  {n} concurrent echo calls for {seconds:g} s...", file=sys.stderr)
            steps.append(step(lab, pid, n, seconds, idle))
    return {"idle_cpu_ms_per_s": round(idle * 1000, 2), "seconds": seconds, "steps": steps}


def table(res: dict) -> str:
    head = f"{'calls':>5} {'connected':>9} {'CPU s':>7} {'ms CPU/call-s':>13} {'calls/core':>10} {'tone':>6} {'lost':>5}"
    lines = [head, "-" * len(head)]
    for s in res["steps"]:
        lines.append(f"{s['calls']:>5} {s['connected']:>9} {s['transceiver_cpu_s']:>7.2f} "
                     f"{s['cpu_ms_per_call_second'] or 0:>13.1f} {s['calls_per_core'] or 0:>10.1f} "
                     f"{s['tone_ratio_min']:>6.0f} {s['rtp_lost']:>5}")
    lines.append(f"transceiver idle: {res['idle_cpu_ms_per_s']} ms CPU/s; {res['seconds']:g} s of media per call")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.bench_density", description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, nargs="+", default=[1, 2, 4], help="concurrent calls, one step each")
    ap.add_argument("--seconds", type=float, default=8.0, help="media time per call")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", type=Path, help="also write the JSON here (docs/bench-density.json: make bench-report)")
    args = ap.parse_args(argv)
    res = run(args.calls, args.seconds)
    res["run"] = run_info("tests.bench.bench_density", argv)
    if args.save:
        args.save.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1) if args.json else table(res))
    return 0 if all(s["connected"] == s["calls"] for s in res["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
