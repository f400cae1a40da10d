"""Loop stalls of the walks relayd makes over the kernel's flows, at scale.

    sudo .venv/bin/python -m tests.bench.bench_walks [--flows 100000] [--json out.json]

Two walks, each beside its baseline in the same run (the same maps, the
same process):

- adoption at start (SlowPath.adopt_kernel_flows): the maps are walked in a
  thread and the legs made in batches that yield to the event loop. The
  figure is the longest the loop went without a turn (a 1 ms ticker's
  largest gap) during adoption; the baseline is the whole adoption's time,
  which the loop spent blocked when the walk and the legs ran on it.
- expiry of one idle flow (Datapath.expire_idle): the return entries of the
  expiring flows only are read (through the writer's index); the baseline
  decodes the whole reverse map to find them, as before.

Real program, real maps (the XDP fixture harness), real SlowPath; prints
figures, asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from manager.lab import xdp_harness as hx
from manager.protocol.addresses import OwnerAddr
from manager.relay.kernel.flow_sockets import FlowSockets
from manager.relay.kernel.structs import ReverseKey, flow_key
from manager.relay.registry import Registry
from manager.relay.slowpath import SlowPath

FLOWS_PER_CALL = 2
PORTS = (4000, 65535)


def install(h: hx.Harness, n: int) -> None:
    """n flows, FLOWS_PER_CALL per call, each with its return entry."""
    owner = OwnerAddr(addr4=hx.TX1_4, port4=5000)
    ports = PORTS[1] - PORTS[0] + 1
    for i in range(n):
        conn = 1 + i // FLOWS_PER_CALL
        if i % FLOWS_PER_CALL == 0:
            h.dp.set_owner(conn, owner)
        client = (f"10.{100 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}", 40000)
        h.dp.add_flow(client, (hx.VIP4, hx.VIP_PORT), conn, PORTS[0] + i % ports, owner,
                      flow_addr=i // ports)


async def _adopt(sp: SlowPath) -> tuple[float, float]:
    """(adoption's seconds, the loop's longest gap) while adopt_kernel_flows runs."""
    gaps = [0.0]
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)  # pacing: the ticker's period
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)  # pacing: the ticker takes its first readings before the walk
    t0 = time.perf_counter()
    adopted = await sp.adopt_kernel_flows()
    took = time.perf_counter() - t0
    done.set()
    await tick
    assert adopted == len(sp.legs), (adopted, len(sp.legs))
    return took, max(gaps)


def adoption(h: hx.Harness) -> dict:
    sp = SlowPath(Registry(), h.dp, FlowSockets(h.dp.cfg), hint_key=bytes(32), vips=[(hx.VIP4, hx.VIP_PORT)])
    took, gap = h.ex.call(asyncio.run, _adopt(sp))
    return {"adopted": len(sp.legs), "seconds": round(took, 3), "longest_loop_stall_ms": round(gap * 1000, 1),
            "baseline_loop_stall_ms": round(took * 1000, 1)}


def expiry(h: hx.Harness, rounds: int) -> dict:
    """expire_idle with one idle flow, against the same walk decoding the whole reverse map."""
    dp = h.dp
    flows = dp.flows()

    def one(baseline: bool) -> float:
        victim = flows.pop()
        if baseline:  # the expiring flows' return entries found by decoding the whole map
            dp._entries_of = lambda clients: dp._reverse_index()
        try:
            t0 = time.perf_counter()
            expired = _expire_one(dp, victim)
            took = time.perf_counter() - t0
        finally:
            dp.__dict__.pop("_entries_of", None)
        assert [(f.client, f.vip) for f in expired] == [(victim.client, victim.vip)], expired
        return took

    after = sorted(one(False) for _ in range(rounds))
    before = sorted(one(True) for _ in range(rounds))
    return {"rounds": rounds, "expire_one_ms": round(after[len(after) // 2] * 1000, 1),
            "baseline_expire_one_ms": round(before[len(before) // 2] * 1000, 1)}


def _expire_one(dp, victim) -> list:
    """expire_idle when exactly `victim` is idle: its last-seen set far back (both directions)."""
    key = flow_key(victim.client, victim.vip)
    info = dp.maps.flows.lookup(key)
    info.last_seen_ns = 1
    dp.maps.flows.update(key, info)
    for rk in list(dp._rev_index.get(bytes(key), ())):
        rkey = ReverseKey.from_buffer_copy(rk)
        rv = dp.maps.reverse.lookup(rkey)
        rv.last_seen_ns = 1
        dp.maps.reverse.update(rkey, rv)
    return dp.expire_idle(3600.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    h = hx.build(max_flows=1 << (args.flows - 1).bit_length(), flow_ports=PORTS)
    try:
        t0 = time.perf_counter()
        install(h, args.flows)
        print(f"installed {args.flows} flows in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        res = {"flows": args.flows, "adoption": adoption(h), "expiry": expiry(h, args.rounds)}
    finally:
        hx.teardown(h)
    a, e = res["adoption"], res["expiry"]
    print(f"adoption of {a['adopted']} flows: {a['seconds']} s; the loop's longest stall {a['longest_loop_stall_ms']} ms "
          f"(baseline, all on the loop: {a['baseline_loop_stall_ms']} ms)")
    print(f"expire_idle with one idle flow of {args.flows}: {e['expire_one_ms']} ms "
          f"(baseline, decoding the whole reverse map: {e['baseline_expire_one_ms']} ms)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
