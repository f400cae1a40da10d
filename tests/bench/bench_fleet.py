"""Fleet benchmark: two relayd processes sharing a real redis-server, in the
lab (edge router, VIP routed to one relay), with an aiortc client.

* Ownership propagation: a live call whose media runs through relay 1 is
  migrated back and forth by asking relay 2. A thread polls both relays'
  pinned owner entries (bpf syscalls, no relayd involved) and takes the time
  from relay 2's kernel flip to relay 1's. Also reported: relay 1's own
  publish → applied latency of the fleet messages it received.
* Failover gap: relay 1 dies mid-call (relayd SIGKILLed, its links down) and
  the VIP route moves to relay 2; the longest RTP gap on the wire is taken at
  the transceivers (client → owner) and at the client (owner → client).

Prints figures; asserts nothing about speed.

    .venv/bin/python -m tests.bench.bench_fleet [--moves 30] [--failovers 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from manager.lab.capture import WireClock, is_rtp, longest_gap
from manager.lab.client import client_call
from manager.lab.netns import NetnsExecutor
from manager.lab.routing import route_vip, set_relay_links
from manager.lab.services import running_lab
from tests.support.lab_calls import audio_flowing, ssrc_published
from tests.support.waiting import NotYet, eventually_async


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 3)


class OwnerWatch(threading.Thread):
    """Records when each relay's kernel owner entry of one call changes."""

    def __init__(self, svc, conn_id: int) -> None:
        super().__init__(daemon=True)
        self.svc, self.conn_id = svc, conn_id
        self.changes: dict[int, list[tuple[float, object]]] = {1: [], 2: []}
        self.stop = threading.Event()
        self.ready = threading.Event()  # the first reading is taken

    def run(self) -> None:
        dps = {r: self.svc.open_datapath(r) for r in (1, 2)}
        try:
            last = {r: dp.get_owner(self.conn_id) for r, dp in dps.items()}
            self.ready.set()
            while not self.stop.is_set():
                for r, dp in dps.items():
                    owner = dp.get_owner(self.conn_id)
                    if owner != last[r]:
                        self.changes[r].append((time.monotonic(), owner))
                        last[r] = owner
                time.sleep(0.0001)  # the sampling period of the measurement
        finally:
            for dp in dps.values():
                dp.close()


def propagation(lab, svc, moves: int) -> dict:
    delays: list[float] = []

    async def move_many(pc, rep):
        await audio_flowing(pc)
        s = await eventually_async(lambda: asyncio.to_thread(lambda: next(
            (x for x in svc.control_of(2).sessions()["sessions"] if x["state"] == "active"), None)), 10,
            what="relay 2 to know the active call")
        watch = OwnerWatch(svc, s["conn_id"])
        watch.start()
        await asyncio.to_thread(watch.ready.wait, 10)
        tx = s["transceiver"]
        for i in range(moves):
            tx = 2 if tx == 1 else 1
            n1, n2 = len(watch.changes[1]), len(watch.changes[2])
            res = await asyncio.to_thread(svc.control_of(2).request, "POST", f"/sessions/{s['call_id']}/migrate",
                                          {"to": tx})
            with contextlib.suppress(NotYet):  # a move not seen within 1 s is left out of the figures
                await eventually_async(lambda n1=n1, n2=n2: len(watch.changes[1]) > n1 and len(watch.changes[2]) > n2, 1.0,
                                       what="both kernels to change", interval=0.001)
            if len(watch.changes[1]) > n1 and len(watch.changes[2]) > n2:
                d = (watch.changes[1][n1][0] - watch.changes[2][n2][0]) * 1000
                delays.append(d)
                print(f"  move {i + 1}/{moves} ({res['outcome']}): relay 1's kernel {d:.2f} ms after relay 2's",
                      file=sys.stderr)
            await asyncio.sleep(0.3)  # pacing between moves
        watch.stop.set()
        watch.join(2)

    with NetnsExecutor(lab.client_ns) as ex:
        rep = ex.call(asyncio.run, client_call(lab.signaling_url, duration=moves * 0.4 + 2.5, messages=2,
                                               on_connected=move_many))
    status = svc.control_of(1).status()["registry"]
    return {"moves": moves, "measured": len(delays), "kernel_to_kernel_ms": {
        "p50": _pct(delays, 0.5), "p99": _pct(delays, 0.99), "max": round(max(delays), 3) if delays else None},
        "messages_publish_to_applied_ms": status.get("propagation_ms"), "client_lost": rep.rtp_packets_lost,
        "call_error": rep.error}


def failover(lab, svc) -> dict:
    seen: dict = {}
    to_owner = [WireClock(tx.ns, ifname, is_rtp) for tx in lab.transceivers for ifname in ("eth0", "eth1")]
    to_client = WireClock(lab.client_ns, lab.client.ifname, lambda d: d.src[1] == lab.port and is_rtp(d))

    async def fail(pc, rep):
        await ssrc_published(svc)
        seen["t"] = time.monotonic()
        rep.mark("failover")
        await asyncio.to_thread(svc.stop_one, "relayd", signal.SIGKILL)
        await asyncio.to_thread(set_relay_links, lab, 1, False)
        await asyncio.to_thread(route_vip, lab, 2)
        await asyncio.sleep(2.0)  # the window the gaps are measured over

    route_vip(lab, 1)
    try:
        with contextlib.ExitStack() as clocks:
            for clock in (to_client, *to_owner):
                clocks.enter_context(clock)
            with NetnsExecutor(lab.client_ns) as ex:
                rep = ex.call(asyncio.run, client_call(lab.signaling_url, duration=4.5, messages=5,
                                                       on_connected=fail))
    finally:
        set_relay_links(lab, 1, True)
        route_vip(lab, 1)
        svc.start_relayd()
        svc.wait_signaling(30.0)
        svc.wait_transceivers(len(lab.transceivers), 30.0)
    t = seen["t"]
    return {"to_owner_ms": longest_gap(sorted(x for c in to_owner for x in c.times), t, t + 2.0),
            "to_client_ms": longest_gap(to_client.times, t, t + 2.0),
            "played_ms": rep.gap_after_ms.get("failover"), "ice_states": rep.ice_states,
            "dc_echoed": f"{rep.dc_echoed}/{rep.dc_sent}", "call_error": rep.error}


def run(moves: int, failovers: int) -> dict:
    with running_lab(f"bf{secrets.token_hex(3)}", Path(tempfile.mkdtemp(prefix="bench-fleet-")), relays=2) as (
            lab, svc):
        out = {"propagation": propagation(lab, svc, moves), "failover": []}
        for i in range(failovers):
            r = failover(lab, svc)
            print(f"  failover {i + 1}/{failovers}: gap client→owner {r['to_owner_ms']} ms, "
                  f"owner→client {r['to_client_ms']} ms", file=sys.stderr)
            out["failover"].append(r)
    gaps = [max(r["to_owner_ms"], r["to_client_ms"]) for r in out["failover"]]
    out["failover_gap_ms"] = {"median": statistics.median(gaps) if gaps else None, "max": max(gaps, default=None)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moves", type=int, default=30)
    ap.add_argument("--failovers", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = run(args.moves, args.failovers)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    p = out["propagation"]
    k = p["kernel_to_kernel_ms"]
    print(f"ownership propagation (relay 2 kernel → relay 1 kernel), {p['measured']} moves: "
          f"p50 {k['p50']} ms, p99 {k['p99']} ms, max {k['max']} ms")
    print(f"fleet messages publish → applied at relay 1: {p['messages_publish_to_applied_ms']}")
    for i, r in enumerate(out["failover"], 1):
        print(f"failover {i}: longest wire gap client→owner {r['to_owner_ms']} ms, owner→client "
              f"{r['to_client_ms']} ms; played by the client {r['played_ms']} ms; data channel {r['dc_echoed']}")
    print(f"failover gap (worse direction): median {out['failover_gap_ms']['median']} ms, "
          f"max {out['failover_gap_ms']['max']} ms")


if __name__ == "__main__":
    main()
