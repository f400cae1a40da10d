"""What the cyclic collector finds in a transceiver after N hand-overs.

The transceiver runs in a child process (tests/bench/profile_transceiver.py)
with this module as its agents' module: the echo agent, and ``report(tx)``
answering a census. N calls are placed with the density run's cheap clients
(tests/bench/loopback_calls.py) and handed over to the media engine; then
the child runs one full collection with ``gc.DEBUG_SAVEALL``, so what it
would have freed stays in ``gc.garbage`` to be counted by type, and times a
second full collection (what is left for it to walk: the calls' live
objects). The runtime's pause figures since start (``GET /health`` →
``runtime``) come with it. Needs no root.

    .venv/bin/python -m tests.bench.gc_census [--calls 50 100] [--top 15]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from collections import Counter
from typing import Any

from manager.transceiver import runtime
from manager.transceiver.agent import EchoAgent

Agent = EchoAgent
TOP = 15


def _type_name(obj: object) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def report(tx: Any) -> dict:
    """Child side: the census (the calls stay up)."""
    paused = runtime.PAUSES.info()
    tracked = len(gc.get_objects())
    gc.set_debug(gc.DEBUG_SAVEALL)
    t0 = time.perf_counter()
    found = gc.collect()
    first_ms = (time.perf_counter() - t0) * 1000
    gc.set_debug(0)
    by_type = Counter(_type_name(o) for o in gc.garbage)
    aiortc = sum(n for name, n in by_type.items() if name.startswith(("aiortc.", "aioice.")))
    gc.garbage.clear()
    t0 = time.perf_counter()
    gc.collect()
    second_ms = (time.perf_counter() - t0) * 1000
    return {"calls": len(tx.calls()), "runtime_gc": paused, "tracked": tracked, "garbage": found,
            "garbage_aiortc": aiortc, "full_collect_ms": round(first_ms, 1),
            "full_collect_after_ms": round(second_ms, 1), "top": by_type.most_common(TOP)}


def census(n: int) -> dict:
    from tests.bench import loopback_density as density

    async def body(conn, pid, idle_rss):
        calls, setup = await density.place_calls(conn, n, voiced_bytes=density.VOICED_BYTES["engine"])
        conn.send("report")
        out = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        for c in calls:
            await c.pc.close()
        return {"placed": n, "connected": len(calls), **out}

    return density._with_transceiver("engine", body, agents=__name__)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.gc_census", description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, nargs="+", default=[50, 100])
    args = ap.parse_args(argv)
    for n in args.calls:
        r = census(n)
        g = r["runtime_gc"]
        print(f"{n} calls ({r['connected']} connected, {r['calls']} on the transceiver): since start "
              f"{g['collections']} collections, longest pause {g['max_pause_ms']} ms, total {g['total_ms']} ms; "
              f"a full collection now frees {r['garbage']} objects ({r['garbage_aiortc']} aiortc/aioice) in "
              f"{r['full_collect_ms']} ms, the next one {r['full_collect_after_ms']} ms; "
              f"{r['tracked']} objects tracked")
        for name, count in r["top"]:
            print(f"  {count:>7} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
