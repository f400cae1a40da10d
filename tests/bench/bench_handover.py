"""Network handover: the audio gap of an ICE restart, over N handovers in one lab.

    sudo .venv/bin/python -m tests.bench.bench_handover [--runs 10] [--json] [--save docs/bench-handover.json]

Each run is tests/e2e/test_ice_handover.py's handover (tests/support/handover.py):
Chromium in the client namespace places a call by WHIP, the namespace's
addresses move to fresh ones (both families), the page restarts ICE by PATCH
(RFC 9725) and the echo comes back on the new path; the call is then ended
and the next run starts from the addresses the last one moved to. Per run,
on the wire: the longest gap of echoed RTP reaching the client from
restartIce() on (the restart's own gap), the longest gap into the owner, the
gap from the move (which includes the browser noticing its new network), and
when the restart's first connectivity check was sent, passed XDP up to the
relay, reached the owner and was answered. Prints figures; asserts nothing
about speed.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
from pathlib import Path

GOAL_MS = 300  # docs: an ICE restart's audio gap


def addresses(i: int) -> tuple[str, str]:
    """Run i's new client addresses (fresh ones: the relay has no neighbour entry for them)."""
    return f"10.10.1.{20 + i}", f"fd00:10:1::{20 + i:x}"


def spread(values: list[float]) -> dict:
    if not values:
        return {"median": None, "max": None, "min": None}
    return {"median": round(statistics.median(values), 1), "max": round(max(values), 1),
            "min": round(min(values), 1)}


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if r.get("error") is None]
    figures = ("restart_gap_to_client_ms", "restart_gap_to_owner_ms", "move_gap_to_client_ms", "patch_ms")
    checks = ("first_sent_ms", "first_at_owner_ms", "first_answered_ms")
    out = {"runs": len(runs), "ok": len(ok), "errors": sorted({r["error"] for r in runs if r.get("error")}),
           "goal_ms": GOAL_MS}
    out.update({name: spread([r["figures"][name] for r in ok]) for name in figures})
    out["checks"] = {name: spread([r["checks"][name] for r in ok if r["checks"][name] is not None])
                     for name in checks}
    out["over_goal"] = sum(1 for r in ok if r["figures"]["restart_gap_to_client_ms"] > GOAL_MS)
    return out


def run(n: int, trace: bool = False) -> dict:
    from manager.lab.services import running_lab
    from tests.support.handover import run_handover
    from tests.support.waiting import eventually

    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-handover-") as tmp, \
            running_lab(f"bh{secrets.token_hex(3)}", Path(tmp), transceivers=1) as (lab, svc):
        old = (lab.client.addr4, lab.client.addr6)
        for i in range(n):
            new = addresses(i)
            try:
                h = run_handover(lab, svc, old, new, trace=trace)
                runs.append({"figures": h.figures, "checks": h.checks, "applied_ms": round(h.restart["applied_ms"], 1),
                             "gathered": h.restart["gathered"], **({"pings": h.restart["pings"]} if trace else {}),
                             "counters": {k: v for k, v in h.stats_delta.items() if any(
                                 w in k for w in ("drop", "pass", "fail", "refus", "counters"))}})
            except Exception as exc:  # one failed run is a figure too; the others go on
                runs.append({"error": f"{type(exc).__name__}: {str(exc)[:120]}"})
            old = new
            for s in svc.control.sessions()["sessions"]:
                svc.control.end_session(s["call_id"])
            eventually(lambda: not svc.control.sessions()["sessions"], 10, what="the run's call ended")
            print(_line(i, runs[-1]), file=sys.stderr, flush=True)
    return {"summary": summarise(runs), "runs": runs}


def _line(i: int, r: dict) -> str:
    if r.get("error"):
        return f"run {i + 1}: {r['error']}"
    f, c = r["figures"], r["checks"]
    return (f"run {i + 1}: gap to client {f['restart_gap_to_client_ms']} ms, to owner {f['restart_gap_to_owner_ms']} "
            f"ms, PATCH {f['patch_ms']} ms; first check sent {c['first_sent_ms']} ms, at relay "
            f"{c['first_at_relay_ms']}, at owner {c['first_at_owner_ms']}, answered {c['first_answered_ms']} "
            f"({c['sent_before_owner']} sent before one reached the owner); answer applied {r['applied_ms']} ms, "
            f"gathered {r['gathered'][:4]} {r['counters']}")


def table(res: dict) -> str:
    s = res["summary"]
    lines = [f"{s['ok']}/{s['runs']} handovers; {s['over_goal']} over {s['goal_ms']} ms"]
    for name in ("restart_gap_to_client_ms", "restart_gap_to_owner_ms", "move_gap_to_client_ms", "patch_ms"):
        lines.append(f"  {name:28} median {s[name]['median']}  max {s[name]['max']}")
    for name, v in s["checks"].items():
        lines.append(f"  check {name:22} median {v['median']}  max {v['max']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import os

    from tests.bench.provenance import run_info

    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m tests.bench.bench_handover", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="handovers (default 10)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    ap.add_argument("--trace", action="store_true", help="record the candidate pairs Chromium pings after each "
                    "restart (getStats every 10 ms: disturbs the figures a little)")
    ap.add_argument("--save", type=Path, help="also write the JSON here (docs/bench-handover.json: make bench-report)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_handover: needs root (the lab's namespaces, XDP); run it as root", file=sys.stderr)
        return 2
    if not 1 <= args.runs <= 200:
        print("bench_handover: --runs must be 1 to 200", file=sys.stderr)
        return 2
    res = run(args.runs, args.trace)
    res["run"] = run_info("tests.bench.bench_handover", argv)
    if args.save:
        args.save.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2) if args.json else table(res))
    return 0 if res["summary"]["ok"] == res["summary"]["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
