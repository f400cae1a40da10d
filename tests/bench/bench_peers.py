"""splitrelay against what an operator would otherwise run, in one run.

    .venv/bin/python -m tests.bench.bench_peers [--json] [--quick] [--plot DIR] [--save FILE]
    make bench-peers [ARGS=--json]

Same topology, generator and sink for every row (tests/bench/peers_paths.py
describes the rows, tests/bench/peers_gen.py the generator and the sink):
frames are injected with BPF_PROG_TEST_RUN live frames into the relay
namespace's public interface, and an XDP program on the far end of its
internal interface counts them and reads the generator's timestamp.

Per row:
- delivered Mpps at the highest offered load (the generator flat out on one
  core, the median of --rounds windows, rows interleaved within a round);
- ratio: splitrelay's Mpps over the row's, per round, median;
- latency at --load (50%) of the row's own maximum: p50/p99/p999 from the
  sink's histogram, minus the same percentiles of the direct route (the
  generator's frame redirected straight into the sink's veth) run at the same
  rate and bursts;
- calls per core at 100 packets/s per call, from the CPU time the path used in
  that run: the generator thread's time inside its calls (for the kernel
  paths the whole path runs there) plus the peer process's and ksoftirqd's,
  minus the generator's own cost (the same run with every frame dropped at
  once).

Counters are checked around every figure (the row's `check`); a failed check
is printed as CHECK FAILED and makes the exit status 1. Speed goals are
reported, never asserted. docs/benchmarks.md ("Method") explains
the method and its limits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from manager.lab import xdp_harness as hx
from manager.relay.kernel.datapath import ensure_kernel_headers
from manager.relay.kernel.structs import BPF_TESTING_DIR
from tests.bench import peers_gen as pg
from tests.bench import peers_paths as pp
from tests.bench.provenance import run_info

GOALS = {"netfilter": 3.0, "coturn": 10.0, "rtpengine": 10.0, "python": 50.0}
PACKETS_PER_CALL = 100


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Plan:
    max_seconds: float = 2.0    # flat-out window per row per round (after warmup)
    warmup: float = 0.3         # flat out before the window opens
    rounds: int = 3
    lat_seconds: float = 2.0    # each paced run
    load: float = 0.5           # latency and CPU at this fraction of the row's max
    step_seconds: float = 1.0   # each step of a userspace row's ramp
    ramp_start: float = 10_000  # packets/s, doubled until the path falls behind


@dataclass
class Bench:
    env: pp.Env
    gs: pg.GenSink
    rows: list[pp.Row]
    progs: dict[str, int]
    bcc: list


def setup(rows: tuple[str, ...] = pp.ROW_NAMES, progress: Callable[[str], None] = log) -> Bench:
    """The relay namespace with the relay loaded, the client namespace, the
    generator and the sink, and every row's path started."""
    ensure_kernel_headers()
    from bcc import BPF

    chosen = [cls() for cls in pp.ROWS if cls.name in rows]
    for r in chosen:
        why = r.missing()
        if why:
            raise RuntimeError(f"row {r.name}: {why}")
    progress("bench_peers: building namespaces, loading the relay, generator and sink")
    h = hx.build(max_flows=65536)
    tmp = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    env = gs = None
    bcc: list = []
    started: list[pp.Row] = []
    try:
        env = pp.Env(h, tmp)
        redir = BPF(src_file=str(BPF_TESTING_DIR / "redirect_only.bpf.c").encode(),
                    cflags=[f"-DIFINDEX={h.ifindex['int']}"])
        # The floor reads the relay's own pinned flows4 (bcc opens the pin).
        floor = BPF(src_file=str(BPF_TESTING_DIR / "lookup_only.bpf.c").encode(), cflags=h.dp.cflags())
        bcc += [redir, floor]
        progs = {"redirect": redir.load_func(b"xdp_redirect_only", BPF.XDP).fd,
                 "lookup_redirect": floor.load_func(b"xdp_lookup_redirect", BPF.XDP).fd}
        gs = pg.GenSink(h.ex, h.ns, h.ifindex["pub"], "intp")
        progs["drop"] = gs.drop_fd
        for r in chosen:
            progress(f"bench_peers: starting {r.name}")
            r.start(env)
            started.append(r)
        return Bench(env=env, gs=gs, rows=chosen, progs=progs, bcc=bcc)
    except BaseException:
        _teardown(h, env, gs, started, bcc, tmp)
        raise


def _teardown(h, env, gs, rows, bcc, tmp) -> None:
    for r in rows:
        try:
            r.stop(env)
        except Exception as exc:
            log(f"bench_peers: stopping {r.name}: {exc}")
    if gs is not None:
        gs.cleanup()
    for b in bcc:
        try:
            b.cleanup()
        except Exception:
            pass
    if env is not None:
        env.close()
    hx.teardown(h)
    shutil.rmtree(tmp, ignore_errors=True)


def teardown(b: Bench) -> None:
    _teardown(b.env.h, b.env, b.gs, b.rows, b.bcc, b.env.tmp)


# --- measurements ------------------------------------------------------------------------

def _counters(b: Bench, row: pp.Row) -> dict[str, int]:
    return pp.common_counters(b.env) | row.counters(b.env)


def _moved(c0: dict[str, int], c1: dict[str, int]) -> dict[str, int]:
    return {k: c1.get(k, 0) - c0.get(k, 0) for k in set(c0) | set(c1) if c1.get(k, 0) != c0.get(k, 0)}


def _prepare(b: Bench, row: pp.Row, route: str) -> None:
    """route: "row" (the row's own path), "direct" (the splitrelay frame
    redirected straight to the sink), "null" (every frame dropped at once)."""
    if route == "row":
        frame, off = row.frame()
        b.gs.set_template(frame, off)
        b.gs.set_next(row.slot(b.env, b.progs))
    else:
        frame, off = pp.SplitRelay().frame()
        b.gs.set_template(frame, off)
        b.gs.set_next(b.progs["redirect" if route == "direct" else "drop"])


def measure_flat(b: Bench, row: pp.Row, plan: Plan) -> dict:
    """The generator flat out through the row's path; delivered and offered
    rates over a window after `warmup`; counters checked over the whole run."""
    row.enter(b.env)
    try:
        _prepare(b, row, "row")
        c0, g0, s0 = _counters(b, row), b.gs.generated(), b.gs.sink()
        stop = threading.Event()
        fut, _ = b.gs.start_max(stop, b.env.gen_cpu)
        try:
            time.sleep(plan.warmup)  # the warm-up
            ta, ga, sa = time.perf_counter(), b.gs.generated(), b.gs.sink()
            time.sleep(plan.max_seconds)  # the measurement window
            tb, gb, sb = time.perf_counter(), b.gs.generated(), b.gs.sink()
        finally:
            stop.set()
            fut.result()
        s1 = b.gs.settle()
        g1 = b.gs.generated()
        c1 = _counters(b, row)
    finally:
        row.leave(b.env)
    gen, delivered = g1 - g0, s1.stamped - s0.stamped
    ok, text = row.check(gen, delivered, _moved(c0, c1))
    win = tb - ta
    return {"how": "flat out", "mpps": (sb.stamped - sa.stamped) / win / 1e6, "offered_mpps": (gb - ga) / win / 1e6,
            "window_s": round(win, 3), "generated": gen, "delivered": delivered, "ok": ok, "check": text}


def measure_capacity(b: Bench, row: pp.Row, plan: Plan) -> dict:
    """Delivered Mpps at the highest offered load. Kernel paths: the generator
    flat out. Userspace peers shed what they cannot take at their socket, and
    rtpengine's overload protection stops reading a call for good after five
    over-full wake-ups: for them, a ramp of paced loads (doubling from
    ramp_start until less than 90% arrives, then two bisection steps) and flat
    out, and the highest delivered rate of all."""
    flat = measure_flat(b, row, plan)
    if not row.userspace:
        return {**flat, "flat_mpps": flat["mpps"], "flat_offered_mpps": flat["offered_mpps"], "steps": []}
    steps = []
    rate, good, bad = plan.ramp_start, None, None
    while rate < 4e6:
        m = measure_paced(b, row, "row", rate, plan.step_seconds, hist=False)
        steps.append(m)
        if m["delivered_pps"] < 0.9 * m["offered_pps"]:
            bad = rate
            break
        good, rate = rate, rate * 2
    for _ in range(2 if good and bad else 0):
        mid = (good * bad) ** 0.5
        m = measure_paced(b, row, "row", mid, plan.step_seconds, hist=False)
        steps.append(m)
        if m["delivered_pps"] < 0.9 * m["offered_pps"]:
            bad = mid
        else:
            good = mid
    best = max(steps, key=lambda m: m["delivered_pps"])
    out = {"flat_mpps": flat["mpps"], "flat_offered_mpps": flat["offered_mpps"], "flat": flat,
           "steps": [{k: m[k] for k in ("rate", "burst", "offered_pps", "delivered_pps", "generated", "delivered",
                                        "ok", "check")} for m in steps],
           "ok": flat["ok"] and all(m["ok"] for m in steps)}
    if best["delivered_pps"] / 1e6 > flat["mpps"]:
        out.update(how=f"paced, {best['offered_pps'] / 1e6:.4f} Mpps offered", mpps=best["delivered_pps"] / 1e6,
                   offered_mpps=best["offered_pps"] / 1e6, check=best["check"])
    else:
        out.update(how="flat out", mpps=flat["mpps"], offered_mpps=flat["offered_mpps"], check=flat["check"])
    bad_steps = [m["check"] for m in steps if not m["ok"]] + ([flat["check"]] if not flat["ok"] else [])
    if bad_steps:
        out["check"] += "; FAILED: " + " | ".join(bad_steps)
    return out


def measure_paced(b: Bench, row: pp.Row, route: str, rate: float, seconds: float, hist: bool = True) -> dict:
    """The generator at `rate` (bursts) through the row's path, or through the
    direct route or the null route at the row's rate: latency histogram, CPU."""
    if route == "row":
        row.enter(b.env)
    try:
        _prepare(b, row, route)
        pids = row.pids() + pg.ksoftirqd_pids()
        c0, g0, s0 = _counters(b, row), b.gs.generated(), b.gs.sink(hist=hist)
        cpu0 = pg.cpu_ns(pids)
        run = b.gs.run_paced(rate, seconds, b.env.gen_cpu)
        in_run = b.gs.sink().stamped - s0.stamped
        b.gs.settle()
        cpu1 = pg.cpu_ns(pids)
        s1, g1, c1 = b.gs.sink(hist=hist), b.gs.generated(), _counters(b, row)
    finally:
        if route == "row":
            row.leave(b.env)
    d = s1 - s0
    gen = g1 - g0
    res = {"route": route, "rate": rate, **{k: run[k] for k in ("burst", "calls", "offered_pps", "forgiven")},
           "wall_s": run["wall_s"], "generated": gen, "delivered": d.stamped,
           "delivered_pps": in_run / run["wall_s"],
           "cpu_ns": run["gen_cpu_ns"] + cpu1 - cpu0, "gen_cpu_ns": run["gen_cpu_ns"], "peer_cpu_ns": cpu1 - cpu0,
           "pct_ns": {str(q): v for q, v in pg.percentiles(d.hist).items()} if hist else {},
           "mean_ns": d.late_sum_ns / d.stamped if d.stamped else None}
    if route == "row":
        res["ok"], res["check"] = row.check(gen, d.stamped, _moved(c0, c1))
    elif route == "direct":
        res["ok"] = gen == d.stamped and not pp._relay_moved(_moved(c0, c1))
        res["check"] = f"sink {d.stamped:,} of {gen:,} generated"
    else:
        res["ok"] = d.frames == 0 and not pp._relay_moved(_moved(c0, c1))
        res["check"] = f"{gen:,} generated and dropped, sink {d.frames}"
    return res


def latency_and_cpu(b: Bench, row: pp.Row, rate: float, seconds: float) -> dict:
    runs = {route: measure_paced(b, row, route, rate, seconds) for route in ("row", "direct", "null")}
    r, direct, null = runs["row"], runs["direct"], runs["null"]
    added = {}
    for q, key in (("0.5", "p50"), ("0.99", "p99"), ("0.999", "p999")):
        a, dq = r["pct_ns"][q], direct["pct_ns"][q]
        added[key] = round((a - dq) / 1000, 2) if a is not None and dq is not None else None
    null_per_frame = null["cpu_ns"] / null["generated"] if null["generated"] else 0.0
    path_ns = r["cpu_ns"] - null_per_frame * r["generated"]
    per_packet = path_ns / r["delivered"] if r["delivered"] else None
    return {"runs": runs, "added_us": added,
            "abs_us": {k: round(r["pct_ns"][q] / 1000, 2) if r["pct_ns"][q] is not None else None
                       for q, k in (("0.5", "p50"), ("0.99", "p99"), ("0.999", "p999"))},
            "direct_us": {k: round(direct["pct_ns"][q] / 1000, 2) if direct["pct_ns"][q] is not None else None
                          for q, k in (("0.5", "p50"), ("0.99", "p99"), ("0.999", "p999"))},
            "path_ns_per_packet": round(per_packet, 1) if per_packet else None,
            "gen_ns_per_frame": round(null_per_frame, 1),
            "cores": round(path_ns / 1e9 / r["wall_s"], 3),
            "calls_per_core": int(1e9 / (per_packet * PACKETS_PER_CALL)) if per_packet and per_packet > 0 else None,
            "ok": all(x["ok"] for x in runs.values())}


def run(plan: Plan, rows: tuple[str, ...] = pp.ROW_NAMES, progress: Callable[[str], None] = log) -> dict:
    """The whole benchmark; returns everything as one dict (--json prints the summary keys)."""
    t0 = time.monotonic()
    b = setup(rows, progress)
    try:
        rounds: list[dict[str, dict]] = []
        for i in range(plan.rounds):
            got = {}
            for row in b.rows:
                got[row.name] = m = measure_capacity(b, row, plan)
                progress(f"bench_peers: round {i + 1} {row.name:<16} {m['mpps']:7.4f} Mpps delivered "
                         f"({m['offered_mpps']:.4f} offered, {m['how']}; flat out {m['flat_mpps']:.4f} of "
                         f"{m['flat_offered_mpps']:.3f}){'' if m['ok'] else '  CHECK FAILED: ' + m['check']}")
            rounds.append(got)
        names = [r.name for r in b.rows]
        mpps = {n: statistics.median(rd[n]["mpps"] for rd in rounds) for n in names}
        ratio = {}
        if "splitrelay" in names:
            for n in names:
                per = [rd["splitrelay"]["mpps"] / rd[n]["mpps"] for rd in rounds if rd[n]["mpps"] > 0]
                ratio[n] = round(statistics.median(per), 2) if per else None
        lat = {}
        for row in b.rows:
            rate = plan.load * mpps[row.name] * 1e6
            if rate <= 0:
                continue
            lat[row.name] = res = latency_and_cpu(b, row, rate, plan.lat_seconds)
            progress(f"bench_peers: {row.name:<16} at {rate / 1e6:.3f} Mpps: added p50/p99/p999 "
                     f"{res['added_us']['p50']}/{res['added_us']['p99']}/{res['added_us']['p999']} µs, "
                     f"{res['path_ns_per_packet']} ns/packet, {res['calls_per_core']} calls/core"
                     f"{'' if res['ok'] else '  CHECK FAILED'}")
    finally:
        teardown(b)
    checks_ok = all(rd[n]["ok"] for rd in rounds for n in rd) and all(v["ok"] for v in lat.values())
    goals = {}
    for n, want in GOALS.items():
        if n in ratio and ratio[n] is not None:
            goals[n] = {"want": want, "got": ratio[n], "met": ratio[n] >= want}
    return {
        "mpps": {n: round(v, 4) for n, v in mpps.items()},
        "latency_us": {n: v["added_us"] for n, v in lat.items()},
        "calls_per_core": {n: v["calls_per_core"] for n, v in lat.items()},
        "ratio": ratio,
        "goals": goals,
        "checks_ok": checks_ok,
        "details": {
            "machine": machine(),
            "plan": asdict(plan),
            "realtime": pg.REALTIME,
            "generator_calls_cut_short": dict(b.gs.call_errors),
            "rows": {r.name: r.label for r in b.rows},
            "rounds": rounds,
            "latency": lat,
            "elapsed_s": round(time.monotonic() - t0, 1),
        },
    }


def machine() -> dict:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(), "load": os.getloadavg()}


def _fmt(v, spec: str, none: str = "–") -> str:
    return none if v is None else format(v, spec)


def table(res: dict) -> str:
    d = res["details"]
    head = (f"{'row':<32}{'Mpps':>8}{'offered':>9}{'flat out':>10}{'÷ row':>8}{'calls/core':>12}"
            f"{'+p50 µs':>9}{'+p99 µs':>9}{'+p999 µs':>10}  checks")
    lines = [head, "-" * len(head)]
    for n, label in d["rows"].items():
        def med(key: str) -> float:
            return statistics.median(rd[n][key] for rd in d["rounds"])  # noqa: B023 - used right away

        lat = res["latency_us"].get(n, {})
        ok = all(rd[n]["ok"] for rd in d["rounds"]) and d["latency"].get(n, {}).get("ok", False)
        lines.append(f"{label:<32}{res['mpps'][n]:>8.3f}{med('offered_mpps'):>9.3f}{med('flat_mpps'):>10.3f}"
                     f"{_fmt(res['ratio'].get(n), '.2f'):>8}{_fmt(res['calls_per_core'].get(n), ','):>12}"
                     f"{_fmt(lat.get('p50'), '.1f'):>9}{_fmt(lat.get('p99'), '.1f'):>9}{_fmt(lat.get('p999'), '.1f'):>10}"
                     f"  {'ok' if ok else 'CHECK FAILED'}")
    lines += [
        "",
        "Mpps: delivered at the highest offered load, median of the rounds (userspace rows: the best of a paced",
        "ramp and flat out; 'flat out': what arrived with the generator flat out). ÷ row: splitrelay's Mpps over",
        "the row's, per round, median. +pXX: latency added over the direct route at 50% of the row's Mpps.",
    ]
    for n, g in res["goals"].items():
        lines.append(f"goal splitrelay ≥ {g['want']:g}x {n}: {g['got']}x, {'met' if g['met'] else 'NOT met'}")
    lines.append("")
    lines.append("at 50% load: offered rate, bursts; absolute latency p50/p99/p999 µs (the direct route's); CPU:")
    for n, v in d["latency"].items():
        r = v["runs"]["row"]
        a, dr = v["abs_us"], v["direct_us"]
        lines.append(f"  {n:<16} {r['offered_pps'] / 1e6:.4f} Mpps, bursts of {r['burst']}: "
                     f"{a['p50']}/{a['p99']}/{a['p999']} ({dr['p50']}/{dr['p99']}/{dr['p999']}); "
                     f"path {v['path_ns_per_packet']} ns/packet = {v['cores']} cores; delivered "
                     f"{r['delivered']:,}/{r['generated']:,}")
    if d.get("generator_calls_cut_short"):
        lines.append(f"generator calls the kernel cut short (their frames are counted all the same): "
                     f"{d['generator_calls_cut_short']}")
    lines.append("checks (last round's best figure; the 50%-load run):")
    last = d["rounds"][-1]
    for n in d["rows"]:
        lines.append(f"  {n:<16} {last[n]['check']}{'' if last[n]['ok'] else '  CHECK FAILED'}")
        if n in d["latency"]:
            r = d["latency"][n]["runs"]["row"]
            lines.append(f"  {'':<16} {r['check']}{'' if r['ok'] else '  CHECK FAILED'}")
    return "\n".join(lines)


def plot(res: dict, outdir: Path) -> list[Path]:
    """docs/bench-peers.png (Mpps and calls per core) and
    docs/bench-peers-latency.png (added latency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["mpps"])
    labels = [res["details"]["rows"][n].replace(" (", "\n(").replace(": ", ":\n") for n in names]
    colors = ["#1f77b4" if n == "splitrelay" else "#7f7f7f" if n in ("redirect_ceiling", "lookup_floor")
              else "#ff7f0e" for n in names]
    out = []
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ax = axes[0]
    ax.bar(range(len(names)), [res["mpps"][n] for n in names], color=colors)
    ax.set_yscale("log")
    ax.set_ylabel("delivered Mpps (log)")
    ax.set_title("Delivered at the highest offered load")
    for i, n in enumerate(names):
        ax.text(i, res["mpps"][n], f"{res['mpps'][n]:.3g}", ha="center", va="bottom", fontsize=8)
    ax = axes[1]
    cpc = [res["calls_per_core"].get(n) or 0 for n in names]
    ax.bar(range(len(names)), cpc, color=colors)
    ax.set_yscale("log")
    ax.set_ylabel("calls per core at 100 packets/s (log)")
    ax.set_title("Calls per core (CPU at 50% load)")
    for i, v in enumerate(cpc):
        ax.text(i, v or 1, f"{v:,}", ha="center", va="bottom", fontsize=8)
    for ax in axes:
        ax.set_xticks(range(len(names)), labels, fontsize=7)
    fig.suptitle("splitrelay against real peers (one run, same generator and sink)")
    fig.tight_layout()
    p = outdir / "bench-peers.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(p)

    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.27
    lat_names = [n for n in names if n in res["latency_us"]]
    for j, key in enumerate(("p50", "p99", "p999")):
        vals = [max(res["latency_us"][n][key] or 0, 0.01) for n in lat_names]
        ax.bar([i + (j - 1) * width for i in range(len(lat_names))], vals, width, label=key)
    ax.set_yscale("log")
    ax.set_ylabel("µs added over the direct route (log; ≤0 shown at 0.01)")
    ax.set_title("Latency added at 50% of each path's own maximum")
    ax.set_xticks(range(len(lat_names)), [labels[names.index(n)] for n in lat_names], fontsize=7)
    ax.legend()
    fig.tight_layout()
    p = outdir / "bench-peers-latency.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(p)
    return out


def summary(res: dict) -> dict:
    """What --json prints: the figures, goals and checks, and the details."""
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.bench_peers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    ap.add_argument("--quick", action="store_true", help="one round, shorter runs (~40 s; noisier)")
    ap.add_argument("--rounds", type=int, default=None, help="flat-out rounds (default 3)")
    ap.add_argument("--seconds", type=float, default=None, help="flat-out window per row per round (default 2)")
    ap.add_argument("--lat-seconds", type=float, default=None, help="each paced run (default 2)")
    ap.add_argument("--rows", nargs="+", choices=pp.ROW_NAMES, default=list(pp.ROW_NAMES))
    ap.add_argument("--no-rt", action="store_true",
                    help="leave the generator and the userspace peers at normal priority (not SCHED_FIFO)")
    ap.add_argument("--save", type=Path, help="also write the JSON here (e.g. docs/bench-peers.json)")
    ap.add_argument("--plot", type=Path, help="write bench-peers.png and bench-peers-latency.png into this directory")
    ap.add_argument("--replot", type=Path, help="only plot (--plot DIR) from a saved JSON file; runs nothing")
    args = ap.parse_args(argv)
    if args.replot:
        for p in plot(json.loads(args.replot.read_text()), args.plot or args.replot.parent):
            print(p)
        return 0
    if os.geteuid() != 0:
        print("bench_peers: needs root (namespaces, XDP); run it as root or via `make bench-peers`", file=sys.stderr)
        return 2
    if args.no_rt:
        pg.REALTIME = False
    plan = Plan(max_seconds=1.0, rounds=1, lat_seconds=1.0, step_seconds=0.5) if args.quick else Plan()
    if args.rounds:
        plan.rounds = args.rounds
    if args.seconds:
        plan.max_seconds = args.seconds
    if args.lat_seconds:
        plan.lat_seconds = args.lat_seconds
    res = run(plan, tuple(args.rows))
    res["run"] = run_info("tests.bench.bench_peers", argv)
    if args.save:
        args.save.write_text(json.dumps(res, indent=1) + "\n")
    if args.plot:
        for p in plot(res, args.plot):
            log(f"bench_peers: wrote {p}")
    if args.json:
        print(json.dumps(summary(res), indent=1))
    else:
        m = res["details"]["machine"]
        print(f"splitrelay against real peers: kernel {m['kernel']}, {m['cpu']}, {m['cpus']} CPUs; "
              f"{res['details']['elapsed_s']} s")
        print(table(res))
    return 0 if res["checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
