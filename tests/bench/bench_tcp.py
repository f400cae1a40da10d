"""ICE-TCP benchmark: what the TCP bridge costs next to the UDP fast path.

The same lab, the same aiortc clients and echo transceivers, in one run:
first N concurrent calls over UDP (XDP forwards them), then N over ICE-TCP
(UDP to the VIP blocked in the client namespace; relayd bridges each
connection to its owner in Python). For each path:

- relayd's CPU time (utime + stime from /proc; on veth, stime also holds
  the receiving side's softirq work of what relayd sends) while the calls run, less
  what it spends with no call over the same time (measured first), and from
  it the calls one core of relayd could bridge at this rate
  (50 audio packets/s each way per call, plus data-channel pings);
- round trips through the relay and the transceiver: the clients' RTCP
  round-trip time and data-channel echo p50. The TCP figure also holds the
  client-side adapter's hop (manager/lab/ice_tcp.py), so the difference is
  an upper bound of what the bridge adds.

Prints figures; asserts nothing about speed.

    .venv/bin/python -m tests.bench.bench_tcp [--calls 4] [--seconds 8] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

from manager.lab.client import client_call
from manager.lab.ice_tcp import TcpAdapter
from manager.lab.netns import NetnsExecutor
from manager.lab.services import LAB_TCP_PORT, running_lab
from manager.relay.control_client import ControlClient
from tests.support.tcp_calls import BLOCK_UDP

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS  # utime, stime (fields 14, 15)


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


async def _calls(lab, n: int, seconds: float, tcp: bool, marks: dict) -> list:
    adapters = [await TcpAdapter.start((lab.vip4, LAB_TCP_PORT)) for _ in range(n)] if tcp else []
    started = asyncio.Event()
    connected = 0

    async def on_connected(pc, rep):
        # The calls' media phases overlap: each waits for the others (a call
        # that never connects must not hold the rest).
        nonlocal connected
        connected += 1
        if connected == n:
            marks["all_connected"] = time.monotonic()
            started.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(started.wait(), 20)

    try:
        return await asyncio.gather(*(
            client_call(lab.signaling_url, duration=seconds, messages=int(seconds * 5), on_connected=on_connected,
                        rewrite_answer=adapters[i].rewrite_answer if tcp else None)
            for i in range(n)))
    finally:
        for a in adapters:
            a.close()


def idle_cpu(pid: int, seconds: float) -> float:
    """A process's CPU with no call at all over `seconds` (housekeeping, probes)."""
    cpu0 = cpu_seconds(pid)
    time.sleep(seconds)  # the measurement window
    return cpu_seconds(pid) - cpu0


def measure(lab, svc, ctl, n: int, seconds: float, tcp: bool, idle: float) -> dict:
    pid = svc.procs["relayd"].pid
    marks: dict = {}
    before = ctl.request("GET", "/stats")["slowpath"]
    (user0, sys0), t0 = cpu_times(pid), time.monotonic()
    cpu0 = user0 + sys0
    with NetnsExecutor(lab.client_ns) as ex:
        reps = ex.call(asyncio.run, _calls(lab, n, seconds, tcp, marks))
    (user1, sys1), t1 = cpu_times(pid), time.monotonic()
    cpu1 = user1 + sys1
    after = ctl.request("GET", "/stats")["slowpath"]
    ok = [r for r in reps if r.connected and r.error is None]
    rtt = [r.rtcp_rtt_ms for r in ok if r.rtcp_rtt_ms is not None]
    dc = [r.dc_rtt_ms_p50 for r in ok if r.dc_rtt_ms_p50 is not None]
    cpu = max(0.0, cpu1 - cpu0 - idle * (t1 - t0) / seconds)  # less what relayd spends with no call
    # Call-seconds carried: each call's media ran `seconds` (set-up and hang-up are in the CPU time too).
    call_seconds = len(ok) * seconds
    frames = (after["tcp"]["events"].get("frames_in", 0) - (before["tcp"] or {}).get("events", {}).get("frames_in", 0)
              if tcp else None)
    return {
        "path": "tcp" if tcp else "udp", "calls": n, "connected": len(ok), "wall_s": round(t1 - t0, 2),
        "relayd_cpu_s": round(cpu, 3), "relayd_user_s": round(user1 - user0, 3),
        "relayd_system_s": round(sys1 - sys0, 3), "idle_cpu_per_s_ms": round(idle / seconds * 1000, 3), "relayd_cpu_per_call_second_ms": round(cpu / call_seconds * 1000, 3),
        "calls_per_core": round(call_seconds / cpu, 1) if cpu > 0 else None,
        "rtcp_rtt_ms_p50": round(statistics.median(rtt), 3) if rtt else None,
        "dc_echo_ms_p50": round(statistics.median(dc), 3) if dc else None,
        "tone_ratio_min": round(min((r.tone_ratio for r in ok), default=0.0), 1),
        "lost": sum(r.rtp_packets_lost for r in ok), "bridge_frames_in": frames,
    }


def run(n: int, seconds: float) -> dict:
    with running_lab(f"bt{secrets.token_hex(3)}", Path(tempfile.mkdtemp(prefix="bench-tcp-"))) as (lab, svc):
        ctl = ControlClient(svc.config["control_socket"])
        print(f"  relayd with no call for {seconds:g} s...", file=sys.stderr)
        idle = idle_cpu(svc.procs["relayd"].pid, seconds)
        print(f"  {n} UDP calls for {seconds:g} s...", file=sys.stderr)
        udp = measure(lab, svc, ctl, n, seconds, tcp=False, idle=idle)
        lab.run(lab.client_ns, ["nft", "-f", "-"],
                input=BLOCK_UDP.format(vip4=lab.vip4, vip6=lab.vip6, port=lab.port), check=True)
        print(f"  {n} ICE-TCP calls for {seconds:g} s (UDP blocked)...", file=sys.stderr)
        tcp = measure(lab, svc, ctl, n, seconds, tcp=True, idle=idle)
    added = {k: round(tcp[k] - udp[k], 3) for k in ("rtcp_rtt_ms_p50", "dc_echo_ms_p50")
             if tcp[k] is not None and udp[k] is not None}
    return {"udp": udp, "tcp": tcp, "tcp_added_ms": added}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=4)  # 8 aiortc clients saturate 2 CPUs
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = run(args.calls, args.seconds)
    if args.json:
        print(json.dumps(res, indent=1))
        return
    print(f"{'path':5s} {'calls':>5s} {'relayd CPU':>10s} {'ms CPU/call-s':>13s} {'calls/core':>10s} "
          f"{'RTCP RTT p50':>12s} {'DC echo p50':>11s} {'lost':>5s}")
    for row in (res["udp"], res["tcp"]):
        print(f"{row['path']:5s} {row['connected']:>2d}/{row['calls']:<2d} {row['relayd_cpu_s']:>9.3f}s "
              f"{row['relayd_cpu_per_call_second_ms']:>13.3f} {row['calls_per_core'] or '-':>10} "
              f"{row['rtcp_rtt_ms_p50'] or '-':>10} ms {row['dc_echo_ms_p50'] or '-':>8} ms {row['lost']:>5d}")
    print(f"added by ICE-TCP (bridge + the client's adapter hop): {res['tcp_added_ms']}")


if __name__ == "__main__":
    main()
