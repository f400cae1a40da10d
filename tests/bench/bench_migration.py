"""Migration benchmark: one live call (aiortc client, 50 packets/s each way)
moved back and forth between two transceivers through the real relay.

For every migration: flip time (request → ownership entry updated) and switch
time (request → first packet the kernel forwarded from the new owner), the
client's inbound packets lost across that switch (from its RTP statistics),
and the data channel across it: the client sends a numbered message every
20 ms, the agent echoes each; of the messages sent from the request until the
next one, how many came back late (round trip over DELAYED_MS) or never, and
the worst round trip. Prints figures; asserts nothing about speed.

    .venv/bin/python -m tests.bench.bench_migration [--count 30] [--interval 1.0] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import tempfile
from pathlib import Path

from manager.lab.client import client_call
from manager.lab.netns import NetnsExecutor
from manager.lab.services import running_lab
from manager.relay.control_client import ControlClient
from tests.support.lab_calls import audio_flowing


async def _lost(pc) -> int:
    stats = await pc.getStats()
    return sum(max(0, s.packetsLost) for s in stats.values() if s.type == "inbound-rtp")


DC_INTERVAL = 0.020
DELAYED_MS = 50.0  # an echo round trip is ~2-5 ms in the lab: over this, the switch held the message


def _dc_per_switch(rep, marks: list[float], interval: float) -> list[dict]:
    echoed = {n: t for n, t in rep.dc_numbered_echoes}
    out = []
    for at in marks:
        window = [(n, sent) for n, sent in enumerate(rep.dc_numbered_sent_at)
                  if at - 0.05 <= sent < at + interval - 0.05]
        delays = [(echoed[n] - sent) * 1000 for n, sent in window if n in echoed]
        out.append({"messages": len(window), "delayed": sum(d > DELAYED_MS for d in delays),
                    "lost": len(window) - len(delays), "worst_ms": round(max(delays, default=0.0), 1)})
    return out


def run(count: int, interval: float) -> dict:
    rows: list[dict] = []
    with running_lab(f"bm{secrets.token_hex(3)}", Path(tempfile.mkdtemp(prefix="bench-migration-"))) as (lab, svc):
        ctl = ControlClient(svc.config["control_socket"])
        marks: list[float] = []

        async def migrate_many(pc, rep):
            await audio_flowing(pc)
            call_id = rep.call_url.rsplit("/", 1)[1]
            for i in range(count):
                call = await asyncio.to_thread(svc.call, call_id)
                target = 2 if call["transceiver_id"] == 1 else 1
                before = await _lost(pc)
                rep.mark(f"m{i}")
                marks.append(rep.marks[f"m{i}"])
                res = await asyncio.to_thread(ctl.request, "POST", f"/sessions/{call_id}/migrate", {"to": target})
                await asyncio.sleep(interval)  # pacing: the bench's interval between migrations
                res["lost"] = await _lost(pc) - before
                rows.append(res)
                print(f"  migration {i + 1}/{count}: {res['source']}→{res['target']} flip "
                      f"{res['flip_s'] * 1000:.1f} ms, first packet {_ms(res['switch_s'])} ms, lost {res['lost']}",
                      file=sys.stderr)

        with NetnsExecutor(lab.client_ns) as ex:
            rep = ex.call(asyncio.run, client_call(lab.signaling_url, duration=count * interval + 1.5,
                                                   messages=3, on_connected=migrate_many,
                                                   dc_interval=DC_INTERVAL))
        for row, dc in zip(rows, _dc_per_switch(rep, marks, interval), strict=True):
            row["dc"] = dc
    switch = [r["switch_s"] * 1000 for r in rows if r["switch_s"] is not None]
    flip = [r["flip_s"] * 1000 for r in rows]
    lost = [r["lost"] for r in rows]
    dc = [r["dc"] for r in rows]
    sent = len(rep.dc_numbered_sent_at)
    order = [n for n, _ in rep.dc_numbered_echoes]
    return {
        "migrations": len(rows), "moved": sum(r["outcome"] == "moved" for r in rows),
        "flip_ms": _summary(flip), "switch_ms": _summary(switch),
        "lost_per_switch": {"max": max(lost, default=0), "total": sum(lost),
                            "switches_with_loss": sum(1 for x in lost if x)},
        "data_channel": {"sent": sent, "echoed": len(order), "exactly_once_in_order": order == list(range(sent)),
                         "per_switch": dc, "delayed_max": max((d["delayed"] for d in dc), default=0),
                         "lost_total": sum(d["lost"] for d in dc),
                         "worst_ms": max((d["worst_ms"] for d in dc), default=0.0)},
        "call": {"connected": rep.connected, "states": rep.connection_states,
                 "rtp_sent": rep.rtp_packets_sent, "rtp_received": rep.rtp_packets_received,
                 "rtp_lost": rep.rtp_packets_lost, "tone_ratio": rep.tone_ratio},
    }


def _ms(v):
    return "-" if v is None else f"{v * 1000:.1f}"


def _summary(xs: list[float]) -> dict:
    if not xs:
        return {}
    xs = sorted(xs)
    return {"p50": round(statistics.median(xs), 2), "p95": round(xs[min(len(xs) - 1, int(len(xs) * 0.95))], 2),
            "max": round(xs[-1], 2), "min": round(xs[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=30)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between migrations")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = run(args.count, args.interval)
    if args.json:
        print(json.dumps(res, indent=1))
        return
    print(f"migrations: {res['moved']}/{res['migrations']} moved; call stayed {res['call']['states']}")
    for name in ("flip_ms", "switch_ms"):
        s = res[name]
        print(f"{name:10s} p50 {s.get('p50')}  p95 {s.get('p95')}  max {s.get('max')}  min {s.get('min')}")
    lp = res["lost_per_switch"]
    print(f"client packets lost per switch: max {lp['max']}, total {lp['total']} over {res['migrations']} "
          f"switches ({lp['switches_with_loss']} with any loss); call RTP sent {res['call']['rtp_sent']}, "
          f"received {res['call']['rtp_received']}")
    d = res["data_channel"]
    print(f"data channel: {d['sent']} messages sent, {d['echoed']} echoed, exactly once in order: "
          f"{d['exactly_once_in_order']}; per switch: delayed (> {DELAYED_MS:g} ms) max {d['delayed_max']}, "
          f"lost {d['lost_total']} in all, worst round trip {d['worst_ms']} ms")


if __name__ == "__main__":
    main()
