"""Flood benchmark: forged STUN at the highest rate this machine injects,
into the lab relay's public interface, while a real call is established and
new real calls are placed.

The injector is BPF_PROG_TEST_RUN with live frames on the lab client's
interface: bpf/testing/flood.bpf.c rewrites a STUN Binding request with a
random source (198.18.0.0/15) and port each run and sends it out (XDP_TX) to
the relay's pub0, where the relay's own XDP program meets it. Two variants:

- random ufrags: our ufrag's shape with a random tail (passes the shape check
  in XDP, fails the MAC in the slow path);
- one valid ufrag replayed: the established call's own server ufrag, from
  every random tuple (passes everything up to the slow path's bounds);
- IP options: the replayed check with a NOP option in its IPv4 header (XDP
  drops what it cannot take for the relay: drop_ip_options);
- live-SSRC spoof: RTP carrying the established call's own SSRC from every
  random tuple, each a NAT-rebinding candidate (XDP passes at most that
  SSRC's bucket: pass_rebind, the rest drop_rebind_call_rate).

Each variant holds one call across the flood. Reported per variant:
injected packets/s, what XDP did with them, the slow-path packets/s that
reached Python; relayd's and the owning transceiver's CPU over the flood's
window before new calls are placed (and over the held call alone just
before the flood, the owner's share for that call's media); the set-up time
of new aiortc calls during the flood against without it; a new Chromium call
(relayd's page, loaded ahead) from the offer's POST to `connected`, and
whether the agent's echo came back; and RTP packets the held call lost
(sequence gaps on the wire, both directions, its own streams only).

At full speed the injector outruns the relay's XDP on this machine (they
share its 2 cores): the client's veth then finds the relay's 256-frame ring
full and drops what it sends, the held call's packets among the flood's
(`link_drops`: the client's tx_dropped beyond its xdp_xmit_errors). `--rate
attack` injects at the rates the attacks were first measured at instead.

    .venv/bin/python -m tests.bench.bench_flood [--seconds 8] [--variants ...] [--rate full|attack] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

from manager.lab.client import client_call
from manager.lab.netns import NetnsExecutor, ns_run
from manager.lab.services import running_lab
from manager.relay.control_client import ControlClient
from tests.bench.provenance import run_info
from tests.support.browser_call import BrowserCaller
from tests.support.held_call import HeldCall
from tests.support.tcp_flood import cpu_window
from tests.support.waiting import eventually
from tests.support.xdp_flood import NOP_OPTION, Flood, live_ssrc, rtp_template, template

QUIET_S = 3.0  # the held call alone, before each flood: the CPU it costs by itself


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


VARIANTS = ("random ufrags", "one valid ufrag replayed", "IP options", "live-SSRC spoof")
# The rates the attacks were first measured at (one core's raw-socket options
# flood; the spoof's live frames against a relay without the per-SSRC bucket).
ATTACK_PPS = {"IP options": 160_000, "live-SSRC spoof": 540_000}


def setup_times(lab, n: int) -> list[float]:
    out = []
    with NetnsExecutor(lab.client_ns) as ex:
        for _ in range(n):
            rep = ex.call(asyncio.run, client_call(lab.signaling_url, duration=0.2, messages=0))
            out.append(rep.connected_after_s if rep.connected_after_s is not None else float("nan"))
    return out


def link_drops(lab) -> dict[str, int]:
    """The drop and error counters of the lab's veths, both ends: where a packet
    the held call lost was dropped, if a link dropped it (a veth whose peer
    runs XDP queues frames in a 256-slot ring, full while a flood outruns the
    peer's XDP)."""
    out: dict[str, int] = {}
    for ep in lab.endpoints:
        for ns, ifname, side in ((ep.ns, ep.ifname, ep.name), (lab.relay_ns, ep.relay_ifname, "relay")):
            for line in ns_run(ns, ["ethtool", "-S", ifname], check=False).stdout.splitlines():
                name, _, value = line.strip().partition(":")
                if ("drop" in name or "err" in name) and value.strip().isdigit():
                    out[f"{side}/{ifname}/{name.strip()}"] = int(value)
            link = json.loads(ns_run(ns, ["ip", "-s", "-j", "link", "show", "dev", ifname]).stdout)[0]["stats64"]
            for way in ("rx", "tx"):
                out[f"{side}/{ifname}/{way}_dropped"] = link[way]["dropped"]
    return out


def snapshot(ctl: ControlClient) -> tuple[dict, dict]:
    st = ctl.stats()
    return {c["name"]: c["packets"] for c in st["fastpath"]["counters"]}, dict(st["slowpath"]["events"])


def delta(a: dict, b: dict) -> dict:
    return {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b) if b.get(k, 0) - a.get(k, 0)}


def run_variant(lab, svc, ctl, browser: BrowserCaller, name: str, seconds: float, calls: int,
                pps: float | None = None) -> dict:
    log(f"bench_flood: {name}: establishing a call")
    with HeldCall(lab, ctl) as held:
        session = held.session
        ip_hlen = 20
        if name == "live-SSRC spoof":
            ssrc = eventually(lambda: live_ssrc(svc, session["conn_id"]), 10, what="the call's SSRC learned by XDP")
            frame, off = rtp_template(lab, ssrc), 0
        elif name == "IP options":
            frame, off = template(lab, f"{session['server_ufrag']}:flood", NOP_OPTION)
            ip_hlen = 20 + len(NOP_OPTION)
        else:
            frame, off = template(lab, f"{session['server_ufrag']}:flood")
        pids = {"relayd": svc.procs["relayd"].pid, "owner": svc.procs[f"tx{session['transceiver']}"].pid}
        quiet = cpu_window(pids, QUIET_S)  # the held call alone: what the owner spends on its media
        fp0, sp0 = snapshot(ctl)
        drops0 = link_drops(lab)
        t0 = time.monotonic()
        with Flood(lab, frame, off, random_ufrag=name == "random ufrags", ip_hlen=ip_hlen,
                   pps=pps) as flood:
            time.sleep(1.0)  # the flood at full rate before anything is measured
            cpu = cpu_window(pids, seconds)  # the flood alone (with the held call), before new calls load both
            during = setup_times(lab, calls)
            log(f"bench_flood: {name}: a Chromium call")
            browser_call = browser.call()
        t1 = time.monotonic()
        fp1, sp1 = snapshot(ctl)
        drops = delta(drops0, link_drops(lab))
    fp, sp = delta(fp0, fp1), delta(sp0, sp1)
    wall = t1 - t0
    # What XDP handed the kernel for relayd's sockets (pass_ip_options: a relay without the refusals).
    slow = sum(fp.get(k, 0) for k in ("pass_stun_unknown", "pass_rebind", "pass_ip_options"))
    return {
        "variant": name, "seconds": round(wall, 2), "cpu_window_s": seconds, "target_pps": pps,
        "injected": flood.injected, "injected_pps": round(flood.injected / flood.seconds),
        "xdp": dict(sorted(fp.items())), "slowpath_events": dict(sorted(sp.items())),
        "slowpath_pps": round(slow / wall), "relayd_cpu_percent": cpu["relayd"], "owner_cpu_percent": cpu["owner"],
        "relayd_cpu_percent_quiet": quiet["relayd"], "owner_cpu_percent_quiet": quiet["owner"],
        "setup_s_during": during, "browser_call": browser_call, "link_drops": dict(sorted(drops.items())),
        "established": held.loss(t0, t1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="flood length per variant")
    ap.add_argument("--calls", type=int, default=4, help="new calls placed with and without the flood")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="floods to run")
    ap.add_argument("--rate", choices=("full", "attack"), default="full",
                    help="inject at full speed, or at the rate each attack was first measured at (ATTACK_PPS)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    results: dict = {}
    with running_lab(f"fl{secrets.token_hex(2)}", Path(tempfile.mkdtemp(prefix="bench-flood-"))) as (lab, svc):
        ctl = ControlClient(svc.config["control_socket"])
        browser = BrowserCaller(lab)
        try:
            browser.start()  # the page loaded ahead: a browser's start-up is not a call's set-up
            log("bench_flood: set-up without a flood")
            results["setup_s_quiet"] = setup_times(lab, args.calls)
            results["browser_call_quiet"] = browser.call()
            results["variants"] = [run_variant(lab, svc, ctl, browser, name, args.seconds, args.calls,
                                               ATTACK_PPS.get(name) if args.rate == "attack" else None)
                                   for name in args.variants]
        finally:
            browser.stop()
    quiet = statistics.median(results["setup_s_quiet"])
    print(f"set-up without flood: median {quiet * 1000:.0f} ms {results['setup_s_quiet']}; "
          f"Chromium {results['browser_call_quiet']}")
    for v in results["variants"]:
        during = statistics.median(v["setup_s_during"])
        v["setup_ratio"] = round(during / quiet, 2)
        e = v["established"]
        print(f"{v['variant']}: injected {v['injected_pps'] / 1e6:.2f} Mpps for {v['seconds']} s; "
              f"to the slow path {v['slowpath_pps']} pkt/s; relayd CPU {v['relayd_cpu_percent']}%, owner "
              f"{v['owner_cpu_percent']}%; "
              f"set-up median {during * 1000:.0f} ms ({v['setup_ratio']}x quiet); established call lost "
              f"{e['lost_to_owner']}/{e['rtp_to_owner']} RTP to the owner, {e['lost_to_client']}/{e['rtp_to_client']} "
              f"to the client")
        print(f"  quiet (held call alone): relayd {v['relayd_cpu_percent_quiet']}%, owner {v['owner_cpu_percent_quiet']}%")
        print(f"  Chromium: {v['browser_call']}")
        print(f"  XDP: {v['xdp']}")
        print(f"  slow path: {v['slowpath_events']}")
        print(f"  links dropped: {v['link_drops']}")
    results["run"] = run_info("tests.bench.bench_flood")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
