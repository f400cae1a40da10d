"""`make bench-report`: the "current figures" of docs/benchmarks.md, rendered
from the committed results (docs/bench-<topic>.json) between the markers

    <!-- bench-report:begin -->
    <!-- bench-report:end -->

so the rest of the page stays hand-written. tests/unit/test_bench_report.py
holds the committed page equal to what this renders: edit a JSON, run
`make bench-report`, commit both. Rendering is deterministic (no clock, files
in the order of RENDERERS), so running it twice changes nothing.

Every result carries `run`: the command that produced it, the machine (CPU
model, kernel, cores) and the date (tests/bench/provenance.py writes it); each
table names them.

Adding a benchmark's section, for a new docs/bench-<topic>.json:

    @renderer("topic", "What the table shows")
    def _topic(data: dict) -> str:
        return md_table(["column", ...], [[...], ...])  # markdown, without the heading

The heading, the reproduce/machine/date line and the raw file's name are added
around what the function returns. A docs/bench-*.json without a renderer is
an error, so a new result cannot be forgotten.

    python -m tests.bench.report            # rewrite docs/benchmarks.md
    python -m tests.bench.report --check    # exit 1 if it is not up to date
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGE = DOCS / "benchmarks.md"
BEGIN = "<!-- bench-report:begin -->"
END = "<!-- bench-report:end -->"


class ReportError(Exception):
    pass


@dataclass(frozen=True)
class Renderer:
    topic: str
    title: str
    body: Callable[[dict], str]


RENDERERS: dict[str, Renderer] = {}  # in page order


def renderer(topic: str, title: str) -> Callable[[Callable[[dict], str]], Callable[[dict], str]]:
    """Register the section of docs/bench-<topic>.json."""
    def register(fn: Callable[[dict], str]) -> Callable[[dict], str]:
        if topic in RENDERERS:
            raise ReportError(f"two renderers for bench-{topic}.json")
        RENDERERS[topic] = Renderer(topic, title, fn)
        return fn
    return register


# --- helpers for renderers ---------------------------------------------------------------------

def md_table(headers: list[str], rows: list[list[object]], align: str | None = None) -> str:
    """A markdown table; `align` one letter per column (l/r), numbers right by default."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join("–" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def num(v: float | None, spec: str = ",.0f") -> str:
    return "–" if v is None else format(v, spec)


def provenance(topic: str, data: dict) -> str:
    run = data.get("run")
    if not run:
        raise ReportError(f"docs/bench-{topic}.json has no `run` (command, machine, date): "
                          "rerun the benchmark, or add it by hand from the run's record")
    m = run["machine"]
    line = (f"Reproduce: `{run['command']}`  \n"
            f"Ran on {run['date']}: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}. "
            f"Raw: `docs/bench-{topic}.json`.")
    if run.get("note"):
        line += f"  \n*Provenance {run['note']}.*"
    return line


# --- the sections ------------------------------------------------------------------------------

@renderer("xdp", "XDP fast path: ns per packet by map occupancy")
def _xdp(data: dict) -> str:
    return "```\n" + data["text"].rstrip("\n") + "\n```"


@renderer("peers", "Against real peers: delivered Mpps, CPU and added latency")
def _peers(data: dict) -> str:
    labels = data["details"]["rows"]
    rows = []
    for key, mpps in data["mpps"].items():
        lat = data["latency_us"].get(key) or {}
        rows.append([labels.get(key, key), num(mpps, ".3f"), num(data["ratio"].get(key), ".2f"),
                     num(data["calls_per_core"].get(key)), num(lat.get("p50"), ".1f"),
                     num(lat.get("p99"), ".1f"), num(lat.get("p999"), ".1f")])
    goals = [f"- splitrelay ≥ {g['want']:g}x {name}: {g['got']:.2f}x, {'met' if g['met'] else '**not met**'}"
             for name, g in data["goals"].items()]
    checks = "every row's counter checks passed" if data["checks_ok"] else "**a counter check FAILED**"
    return "\n".join([
        md_table(["row", "Mpps", "÷ row", "calls/core", "+p50 µs", "+p99 µs", "+p999 µs"], rows),
        "", *goals, f"- {checks}", "",
        "![delivered Mpps and calls per core](bench-peers.png)",
        "![latency added at 50% load](bench-peers-latency.png)",
    ])


@renderer("accounting", "Per-flow media accounting: the hit path before and after, one run")
def _accounting(data: dict) -> str:
    rows = [[case, num(d["before"], ".1f"), num(d["after"], ".1f"), num(d["ratio"], ".3f")]
            for case, d in data["xdp_ns"].items()]
    p = data["peers_mpps"]
    rows.append(["bench_peers splitrelay (Mpps)", num(p["before"], ".2f"), num(p["after"], ".2f"),
                 num(p["ratio"], ".3f")])
    return "\n".join([
        md_table(["case (bench_xdp ns/packet at {:,} flows)".format(data["flows"]), "before", "after",
                  "after / before"], rows),
        "", f"Before: release `{data['release_before'][:10]}`, its own program and benches; after: this one. "
        f"{data['rounds']} rounds alternating which side runs first; medians over rounds (ratios taken within "
        "each round). The machine was shared with other work: read the ratios, not the absolute figures.",
    ])


@renderer("setup", "Set-up rate: legs per second from a client's check to a kernel flow")
def _setup(data: dict) -> str:
    rows = [[num(s["offered_rate"]), num(s["legs"]), num(s["installed"]), num(s["legs_per_s"]),
             num(s["cpu_us_per_leg"]), num(s["setup_ms"].get("p50"), ".2f"), num(s["setup_ms"].get("p99"), ".2f"),
             num(s["setup_ms"].get("max"), ".2f"), "ok" if s["ok"] else "FAILED"] for s in data["steps"]]
    best = max((s["legs_per_s"] for s in data["steps"] if s["ok"]), default=0)
    return "\n".join([
        md_table(["offered legs/s", "legs", "installed", "legs/s", "CPU µs/leg", "set-up p50 ms", "p99 ms", "max ms",
                  "check"], rows, "rrrrrrrrl"),
        "", f"Highest set-up rate with every leg installed: {best:,.0f} legs/s (goal: 5,000).",
    ])


@renderer("density", "Transceiver density: concurrent echo calls per core")
def _density(data: dict) -> str:
    rows = [[s["calls"], s["connected"], num(s["transceiver_cpu_s"], ".2f"), num(s["cpu_ms_per_call_second"], ".1f"),
             num(s["calls_per_core"], ".1f"), num(s["tone_ratio_min"]), s["rtp_lost"]] for s in data["steps"]]
    return "\n".join([
        md_table(["calls", "connected", "CPU s", "ms CPU per call-second", "calls/core", "tone ratio", "RTP lost"], rows,
                 "rrrrrrr"),
        "", f"{data['seconds']:g} s of media per call; the transceiver idle: {data['idle_cpu_ms_per_s']} ms CPU/s.",
    ])


@renderer("loopback-density", "Transceiver density and loss: media engine against aiortc, one run (make bench-density)")
def _loopback_density(data: dict) -> str:
    rows = [[path, s["calls"], s["connected"], num(s.get("setup_s"), ".0f"), num(s["ms_per_call_second"], ".1f"),
             num(s["calls_per_core"], ".1f"), num(s["echo_ratio"], ".2f"), s["echo_lost"],
             num(s["added_latency_ms"]["p50"], ".1f"), num(s["added_latency_ms"]["p99"], ".1f"), s["tone_ok"],
             num(s["mb_per_call"], ".2f"), num(s["generator_ms_per_call_second"], ".1f"), "yes" if s["holds"] else "no"]
            for path, steps in data["steps"].items() for s in steps]
    best = ", ".join(f"{p} {num(v, '.0f')}" for p, v in data["calls_per_core"].items())
    loss = [[path, f"{float(x):.0%}", r.get("mode", "sender"), r["connected"], num(r["frames_delivered"], ".4f"),
             num(r["frames_real"], ".4f"), r["frames_fec"], r["frames_concealed"], r.get("frames_expanded", "-"),
             num(r["longest_gap_ms"], ".0f")]
            for path, runs in data.get("loss", {}).items() for x, r in runs.items()]
    by_calls = {p: {s["calls"]: s for s in steps} for p, steps in data["steps"].items()}
    batched = [f"{n} calls {num(s['ms_per_call_second'], '.1f')} against {num(by_calls['engine-sendto'][n]['ms_per_call_second'], '.1f')}"
               for n, s in by_calls.get("engine", {}).items() if n in by_calls.get("engine-sendto", {})]
    return "\n".join([
        md_table(["path", "calls", "connected", "set-up s", "ms CPU per call-second", "calls/core", "voiced echoes",
                  "echo lost", "+p50 ms", "+p99 ms", "tone", "MB per call", "generator ms per call-second", "holds"],
                 rows, "lrrrrrrrrrrrrl"),
        "", f"Calls per core at the highest step that holds: {best} (docs/media-engine.md).",
        *(["", "Engine ms CPU per call-second with sendmmsg against one sendto per datagram (engine-sendto): "
           + "; ".join(batched) + "."] if batched else []),
        "", md_table(["path", "uplink loss", "dropped by", "calls", "frames delivered", "own packet", "from FEC",
                      "concealed", "expanded", "longest gap ms"], loss, "lrlrrrrrrr"),
        "", "![calls per core and CPU per call-second against N](bench-loopback-density.png)",
    ])


@renderer("flood", "Forged STUN flood against a live relay")
def _flood(data: dict) -> str:
    quiet = statistics.median(data["setup_s_quiet"])  # as bench_flood takes it
    rows = [["none", "–", "–", "–", f"{quiet * 1000:.0f} ms", "–"]]
    for v in data["variants"]:
        drops = {k: n for k, n in v["xdp"].items() if k.startswith("drop_")}
        top = max(drops, key=drops.get)
        during = statistics.median(v["setup_s_during"])
        e = v["established"]
        rows.append([v["variant"], f"{v['injected_pps'] / 1e6:.2f} Mpps",
                     f"{v['slowpath_pps']:,} packets/s ({drops[top] / 1e6:.1f} M `{top}`)",
                     f"{v['relayd_cpu_percent']}%", f"{during * 1000:.0f} ms ({v['setup_ratio']}x)",
                     f"{e['lost_to_owner']}/{e['rtp_to_owner']} to the owner, "
                     f"{e['lost_to_client']}/{e['rtp_to_client']} to the client"])
    return md_table(["flood", "injected", "reached Python", "relayd CPU", "new-call set-up (median)",
                     "established call lost"], rows, "llllll")


def browser_call(b: dict | None) -> str:
    """A Chromium call placed into a flood (tests/support/browser_call.py): POST → connected, echo."""
    if not b:
        return "–"
    if b["post_to_connected_s"] is None:
        return f"not connected: {b['error']}"
    proto = (b.get("path") or "").split(" ", 1)[0]
    heard = "echo heard" if b["echo_ok"] else f"echo NOT heard: {b['error']}"
    return f"{b['post_to_connected_s'] * 1000:.0f} ms{' ' + proto if proto else ''}, {heard}"


def held_call_lost(e: dict) -> str:
    return f"{e['lost_to_owner']}/{e['rtp_to_owner']}, {e['lost_to_client']}/{e['rtp_to_client']}"


def cpu_beside(during: float, alone: float | None) -> str:
    return f"{during}%" + (f" ({alone}%)" if alone is not None else "")


def own_packets_the_link_dropped(v: dict) -> str:
    """What the client's veth dropped of its own stack's packets (its tx drops
    beyond the injector's frames the relay's full ring refused)."""
    d = v.get("link_drops")
    if d is None:
        return "–"
    return str(d.get("client/eth0/tx_dropped", 0) - d.get("client/eth0/tx_queue_0_xdp_xmit_errors", 0))


ATTACK_RUNS = (("before", "before"), ("after", "after, full speed"), ("after_attack_rate", "after, attack's rate"))


@renderer("attacks", "Attacks through XDP: IP options and a spoofed live SSRC, before and after the refusals")
def _attacks(data: dict) -> str:
    rows = []
    for when, label in ATTACK_RUNS:
        if when not in data:
            continue
        quiet = statistics.median(data[when]["setup_s_quiet"])
        for v in data[when]["variants"]:
            during = statistics.median(v["setup_s_during"])
            rows.append([v["variant"], label, f"{v['injected_pps'] / 1e6:.2f} Mpps", f"{v['slowpath_pps']:,} packets/s",
                         cpu_beside(v["relayd_cpu_percent"], v.get("relayd_cpu_percent_quiet")),
                         cpu_beside(v["owner_cpu_percent"], v.get("owner_cpu_percent_quiet")),
                         held_call_lost(v["established"]), own_packets_the_link_dropped(v),
                         f"{during * 1000:.0f} ms ({during / quiet:.1f}x quiet)", browser_call(v.get("browser_call"))])
    out = [md_table(["flood", "relay", "injected", "reached relayd", "relayd CPU (held call alone)",
                     "owner CPU (held call alone)", "held call lost (up, down)", "client's packets the link dropped",
                     "new aiortc call set-up (median)", "new Chromium call: POST → connected"], rows, "llllllllll")]
    if data["after"].get("browser_call_quiet"):
        out += ["", f"Without a flood, a Chromium call connected {browser_call(data['after']['browser_call_quiet'])}."]
    return "\n".join(out)


@renderer("walks", "Kernel walks at scale: adopting and expiring flows")
def _walks(data: dict) -> str:
    a, x = data["adoption"], data["expiry"]
    return md_table(["walk", "flows", "now", "before (same run)"], [
        ["adopt at start: longest event-loop stall", f"{a['adopted']:,}", f"{a['longest_loop_stall_ms']:.0f} ms",
         f"{a['baseline_loop_stall_ms']:.0f} ms"],
        ["expire one idle flow", f"{data['flows']:,}", f"{x['expire_one_ms']:.0f} ms",
         f"{x['baseline_expire_one_ms']:.0f} ms"],
    ], "lrrr")


@renderer("attacks-py", "Attacks on the Python side: a /64 of ICE-TCP connections, split offers")
def _attacks_py(data: dict) -> str:
    b, a = data["before"], data["after"]
    fb, fa = b["tcp_flood_64"], a["tcp_flood_64"]

    def offers(r: dict) -> str:
        status = data.get("split_offer_status") or r["split_offer_status"]  # once per run, or per side
        return f"{status['one_write']} / {status['two_writes_300ms']}"

    def both(f: Callable[[dict], object]) -> list[object]:
        return [f(fb), f(fa)]

    rows = [
        ["connections the /64 held at once (peak)", *both(lambda f: num(f["peak_held_by_the_64"]))],
        ["connections opened by the flood per second", *both(lambda f: num(f["opened_per_s"]))],
        ["SYNs dropped in XDP (drop_tcp_syn_rate)", *both(lambda f: num(f.get("syns_dropped_in_xdp", 0)))],
        ["relayd CPU during the flood, % of a core (held call alone)",
         *both(lambda f: cpu_beside(f["relayd_cpu_total_pct"], f["relayd_idle_cpu_pct"]) if "relayd_cpu_total_pct" in f
               else num(f["relayd_cpu_pct"], ".1f") + " over idle")],
        ["relayd CPU per connection, µs", *both(lambda f: num(f["relayd_cpu_us_per_connection"], ".1f"))],
        ["owner CPU during the flood, % of a core (held call alone)",
         *both(lambda f: cpu_beside(f["owner_cpu_pct"], f["owner_idle_cpu_pct"]) if "owner_cpu_pct" in f else None)],
        ["held call lost (up, down)", *both(lambda f: held_call_lost(f["established"]) if "established" in f else None)],
        ["a new aiortc UDP call connected after, s", *both(lambda f: num(f["new_udp_call_connected_s"], ".3f"))],
        ["a new aiortc ICE-TCP call connected after, s", *both(lambda f: num(f["new_tcp_call_connected_s"], ".3f"))],
        ["a new Chromium call, UDP: POST → connected", *both(lambda f: browser_call(f.get("browser_call_udp")))],
        ["a new Chromium call, UDP blocked: POST → connected",
         *both(lambda f: browser_call(f.get("browser_call_tcp")))],
        ["an offer in one write / two writes 300 ms apart", offers(b), offers(a)],
    ]
    out = [md_table(["", data.get("before_label", "before"), data.get("after_label", "after")], rows, "lrr")]
    status = data.get("split_offer_status") or {}
    if "browser_call_during" in status:
        out += ["", f"While split offers arrived one after another ({status['during_answered_201']} of "
                    f"{status['during_sent']} answered 201), a Chromium call connected "
                    f"{browser_call(status['browser_call_during'])}; without them, "
                    f"{browser_call(data.get('browser_call_quiet'))}."]
    return "\n".join(out)


@renderer("ttfa", "Time to first audio: the offer's POST to the first echoed audio frame at the client")
def _ttfa(data: dict) -> str:
    phases = ("answer", "ice", "dtls", "audio")
    rows = []
    for variant, r in data["variants"].items():
        for client, c in r["clients"].items():
            rows.append([f"{client}, {variant}", f"{c['ok']}/{c['calls']}", num(c["total_ms"]["p50"], ".1f"),
                         num(c["total_ms"]["p99"], ".1f"),
                         *(f"{num(c['phases_ms'][p]['p50'], '.1f')} / {num(c['phases_ms'][p]['p99'], '.1f')}"
                           for p in phases),
                         num(c.get("total_heard_ms", {}).get("p50"), ".1f")])
    before = " ".join(data["variants"].get("before", {}).get("transceiver_args", [])) or "–"
    return "\n".join([
        md_table(["client, lab", "calls", "total p50 ms", "p99 ms", "answer p50 / p99", "ICE", "DTLS",
                  "first echo", "aiortc decoded p50"], rows, "lrrrrrrrr"),
        "", f"Phases (ms, p50 / p99): POST → 201 with the answer, → ICE connected, → DTLS connected, → the "
            f"first echoed frame arrives. \"before\" is the transceiver with `{before}`, \"after\" as it "
            "runs now, in the same run. aiortc decoded: the total plus the aiortc client's own 4-frame jitter "
            "buffer and decoder. Goal: aiortc p50 ≤ 100 ms.",
    ])


@renderer("handover", "Network handover: the audio gap of an ICE restart by PATCH, per run")
def _handover(data: dict) -> str:
    s = data["summary"]
    rows = []
    for i, r in enumerate(data["runs"], 1):
        if r.get("error"):
            rows.append([i, r["error"], "", "", "", "", ""])
            continue
        f, c = r["figures"], r["checks"]
        rows.append([i, num(f["restart_gap_to_client_ms"], ".1f"), num(f["restart_gap_to_owner_ms"], ".1f"),
                     num(f["patch_ms"], ".1f"), num(c["first_sent_ms"], ".1f"), num(c["first_at_owner_ms"], ".1f"),
                     num(f["move_gap_to_client_ms"], ".0f")])
    gap = s["restart_gap_to_client_ms"]
    return "\n".join([
        md_table(["run", "gap owner → client ms", "client → owner ms", "PATCH ms", "first new check sent ms",
                  "at the owner ms", "gap from the move ms"], rows, "rrrrrrr"),
        "", f"{s['ok']}/{s['runs']} handovers. The audio gap from `restartIce()` to the echo at the client's new "
            f"address: median {num(gap['median'], '.1f')} ms, max {num(gap['max'], '.1f')} ms; "
            f"{s['over_goal']} run(s) over the goal of {s['goal_ms']} ms. The checks' times are from "
            "`restartIce()`, on the wire (the client's own check with the new credentials, and its arrival at the "
            "owner). A long gap follows a late first check, which Chromium sends late and the relay hands to the "
            "owner within 1 ms (docs/http-api.md, ICE restart). The gap from the move includes Chromium noticing "
            "its new network (it re-reads the interfaces every 2 s).",
    ])


# --- the page ----------------------------------------------------------------------------------

def results(docs: Path = DOCS) -> dict[str, dict]:
    """Every docs/bench-<topic>.json, by topic; a topic without a renderer is an error."""
    found = {}
    for path in sorted(docs.glob("bench-*.json")):
        topic = path.stem.removeprefix("bench-")
        if topic not in RENDERERS:
            raise ReportError(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: no renderer for "
                              f"topic {topic!r}; add one in tests/bench/report.py (see its docstring)")
        try:
            found[topic] = json.loads(path.read_text())
        except ValueError as exc:
            raise ReportError(f"{path}: not JSON: {exc}") from None
    return found


def render_figures(found: dict[str, dict]) -> str:
    parts = []
    for topic, r in RENDERERS.items():
        if topic in found:
            data = found[topic]
            parts.append(f"### {r.title}\n\n{provenance(topic, data)}\n\n{r.body(data)}\n")
    return "\n".join(parts)


def render_page(page: str, found: dict[str, dict]) -> str:
    """`page` with the text between the markers replaced by the rendered figures."""
    if page.count(BEGIN) != 1 or page.count(END) != 1 or page.index(BEGIN) > page.index(END):
        raise ReportError(f"the page needs one {BEGIN} and one {END} after it")
    head, rest = page.split(BEGIN)
    _, tail = rest.split(END)
    note = "<!-- Rendered by `make bench-report` from docs/bench-*.json: edit those, not this. -->"
    return f"{head}{BEGIN}\n{note}\n\n{render_figures(found)}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check that the page is up to date")
    args = ap.parse_args(argv)
    try:
        page = PAGE.read_text()
        new = render_page(page, results())
    except ReportError as exc:
        print(f"bench-report: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new != page:
            print(f"bench-report: {PAGE.relative_to(REPO)} is not what the results render: run make bench-report",
                  file=sys.stderr)
            return 1
        return 0
    if new != page:
        PAGE.write_text(new)
        print(f"bench-report: wrote {PAGE.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
