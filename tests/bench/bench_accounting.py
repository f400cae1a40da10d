"""Cost of per-flow media accounting on the hit path: the previous release
(before: its own tree from git, its program and its bench) against this
checkout (after), alternating in one run, so both see the same machine load.

    .venv/bin/python -m tests.bench.bench_accounting [--rounds N] [--save docs/bench-accounting.json]

Each round runs bench_xdp --quick (BPF_PROG_TEST_RUN: ns per hit, IPv4 and
IPv6, one flow and random flows) and bench_peers --quick --rows splitrelay
(real packets through veths: Mpps) of each side; the figures are the
medians over rounds of after / before. Prints figures; asserts nothing
about speed (the target, at most 5% on the hit path, is read off them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.bench.provenance import run_info
from tests.support import previous_release

REPO = Path(__file__).resolve().parents[2]
# bench_xdp cases (program "relay") compared, at the occupancy FLOWS.
HIT_CASES = ("hit → REDIRECT", "hit → REDIRECT, one flow", "hit → REDIRECT, random flows",
             "return hit → REDIRECT, one flow", "IPv6 hit → REDIRECT, one flow")
FLOWS = 100_000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _bench(tree: Path | None, argv: list[str]) -> dict:
    env = previous_release.env(tree) if tree else dict(os.environ)
    done = subprocess.run([sys.executable, "-m", *argv, "--json"], cwd=tree or REPO, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} ({'before' if tree else 'after'}) failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def xdp_figures(tree: Path | None) -> dict[str, float]:
    res = _bench(tree, ["tests.bench.bench_xdp", "--quick", "--live", "0", "--flows", str(FLOWS)])
    return {m["case"]: m["ns"] for m in res["results"] if m["program"] == "relay" and m["case"] in HIT_CASES}


def peers_mpps(tree: Path | None) -> float:
    return _bench(tree, ["tests.bench.bench_peers", "--quick", "--rows", "splitrelay"])["mpps"]["splitrelay"]


def run(rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        before_tree = previous_release.extract("v1", Path(tmp) / "v1")
        xdp: dict[str, dict[str, list[float]]] = {c: {"before": [], "after": [], "ratio": []} for c in HIT_CASES}
        mpps: dict[str, list[float]] = {"before": [], "after": [], "ratio": []}
        for r in range(rounds):
            # Alternate which side goes first: a drift in load favours neither.
            order = [("before", before_tree), ("after", None)]
            if r % 2:
                order.reverse()
            figs, rates = {}, {}
            for side, tree in order:
                log(f"bench_accounting: round {r + 1}/{rounds}, {side}")
                figs[side], rates[side] = xdp_figures(tree), peers_mpps(tree)
            for case in HIT_CASES:
                b, a = figs["before"][case], figs["after"][case]
                xdp[case]["before"].append(b)
                xdp[case]["after"].append(a)
                xdp[case]["ratio"].append(a / b)
            mpps["before"].append(rates["before"])
            mpps["after"].append(rates["after"])
            mpps["ratio"].append(rates["after"] / rates["before"])

    def med(xs: list[float]) -> float:
        return round(statistics.median(xs), 3)

    return {
        "release_before": previous_release.RELEASES["v1"],
        "flows": FLOWS,
        "rounds": rounds,
        "xdp_ns": {c: {k: med(v) for k, v in d.items()} | {"samples": d} for c, d in xdp.items()},
        "peers_mpps": {k: med(v) for k, v in mpps.items()} | {"samples": mpps},
    }


def table(res: dict) -> str:
    lines = [f"per-flow media accounting: before (release {res['release_before'][:10]}) and after, "
             f"{res['rounds']} alternating rounds, medians",
             f"{'case':44} {'before':>8} {'after':>8} {'after/before':>13}"]
    for case, d in res["xdp_ns"].items():
        lines.append(f"{case + ' (ns)':44} {d['before']:8.1f} {d['after']:8.1f} {d['ratio']:13.3f}")
    p = res["peers_mpps"]
    lines.append(f"{'bench_peers splitrelay (Mpps)':44} {p['before']:8.2f} {p['after']:8.2f} {p['ratio']:13.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.bench_accounting", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", type=Path, help="also write the JSON here (docs/bench-accounting.json)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_accounting: needs root", file=sys.stderr)
        return 2
    res = run(args.rounds)
    if args.save:
        args.save.write_text(json.dumps({**res, "text": table(res),
                                         "run": run_info("tests.bench.bench_accounting", argv or sys.argv[1:])},
                                        indent=1) + "\n")
    print(json.dumps(res, indent=1) if args.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
