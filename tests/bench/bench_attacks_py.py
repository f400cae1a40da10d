"""The attacks the Python side answers, measured in a lab: an ICE-TCP
connection flood from 2,600 addresses of one IPv6 /64, and an offer split
across two TCP writes 300 ms apart.

For the flood: the most connections the /64 held at once (sampled from the
control API); relayd's and the owning transceiver's CPU while it ran, beside
the same window just before it (one call held, nothing else); the SYNs XDP
dropped; what a call held across the flood lost (RTP sequence gaps on the
wire, both ways); and the time new calls took to connect during it: aiortc
over UDP, then Chromium (relayd's page, loaded ahead: the offer's POST to
`connected`, and whether the agent's echo came back), then, with UDP blocked
at the client, aiortc and Chromium over ICE-TCP. The flood runs twice on the
same relayd, one after the other: first with the ICE-TCP listeners' XDP SYN
limit lifted (its tcp_listeners entries made unlimited: relayd's own
per-source accept rate alone, the baseline), then with it. For split
offers: the status of the same offer sent in one write and in two.

Prints JSON; asserts nothing about speed.

    .venv/bin/python -m tests.bench.bench_attacks_py [--seconds 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from manager.lab.client import client_call
from manager.lab.ice_tcp import TcpAdapter
from manager.lab.netns import NetnsExecutor
from manager.lab.services import LAB_TCP_PORT, running_lab
from manager.relay.control_client import ControlClient
from manager.relay.kernel import libbpf
from manager.relay.kernel.structs import SynLimit, VipKey
from tests.bench.provenance import run_info
from tests.support.browser_call import BrowserCaller
from tests.support.held_call import HeldCall
from tests.support.tcp_calls import BLOCK_UDP
from tests.support.tcp_flood import Flood, cpu_window, route_flood_prefix, unroute_flood_prefix


async def _offer() -> str:
    from aiortc import RTCConfiguration, RTCPeerConnection

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio")
    pc.createDataChannel("x")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def _post(url: str, body: bytes, pause: float | None) -> int:
    """POST an offer, in one write or in two `pause` s apart; the status."""
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        head = (b"POST /v1/calls HTTP/1.1\r\nHost: relay\r\nContent-Type: application/sdp\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        if pause is None:
            s.sendall(head + body)
        else:
            s.sendall(head + body[:len(body) // 2])
            time.sleep(pause)  # pacing: the second half as a later segment, as a slow link sends it
            s.sendall(body[len(body) // 2:])
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    location = next((line.split(b":", 1)[1].strip().decode() for line in reply.split(b"\r\n")
                     if line.lower().startswith(b"location:")), None)
    if location:  # end it: only the status matters here
        with socket.create_connection((u.hostname, u.port), timeout=10) as s:
            s.sendall(f"DELETE {location} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n".encode())
            while s.recv(65536):
                pass
    return status


def split_offers(lab, browser: BrowserCaller) -> dict:
    """The same offer in one write and in two; then split offers one after
    another while a Chromium call is placed."""
    with NetnsExecutor(lab.client_ns) as ex:
        body = ex.call(asyncio.run, _offer()).encode()
        out = {"one_write": ex.call(_post, lab.signaling_url, body, None),
               "two_writes_300ms": ex.call(_post, lab.signaling_url, body, 0.3)}
        stop, statuses = threading.Event(), []

        def keep_splitting() -> None:
            while not stop.is_set():
                statuses.append(_post(lab.signaling_url, body, 0.3))

        splitting = ex.submit(keep_splitting)
        try:
            out["browser_call_during"] = browser.call()
        finally:
            stop.set()
            splitting.result()
        out["during_sent"], out["during_answered_201"] = len(statuses), statuses.count(201)
    return out


def _tcp_call(lab):
    async def call():
        adapter = await TcpAdapter.start((lab.vip4, LAB_TCP_PORT))
        try:
            return await client_call(lab.signaling_url, duration=1.0, messages=2,
                                     rewrite_answer=adapter.rewrite_answer)
        finally:
            adapter.close()

    with NetnsExecutor(lab.client_ns) as ex:
        return ex.call(asyncio.run, call())


def _udp_call(lab):
    with NetnsExecutor(lab.client_ns) as ex:
        return ex.call(asyncio.run, client_call(lab.signaling_url, duration=1.0, messages=2))


@contextlib.contextmanager
def xdp_syn_limit_lifted(svc):
    """relayd's ICE-TCP listeners without their XDP SYN limit (every SYN
    passes, counted), restored after: the baseline, on the same relayd."""
    with libbpf.PinnedMap(str(Path(svc.config["datapath"]["pin_dir"]) / "tcp_listeners"), VipKey, SynLimit) as m:
        saved = [(k, m.lookup(k)) for k in list(m.keys())]
        try:
            for k, _ in saved:
                m.update(k, SynLimit())
            yield
        finally:
            for k, v in saved:
                m.update(k, v)


def _syn_counts(ctl) -> dict[str, int]:
    rows = ctl.request("GET", "/stats")["fastpath"]["counters"]
    return {r["name"]: r["packets"] for r in rows if r["name"] in ("pass_tcp_syn", "drop_tcp_syn_rate")}


def tcp_flood(lab, svc, ctl, browser: BrowserCaller, seconds: float) -> dict:
    with HeldCall(lab, ctl) as held:
        pids = {"relayd": svc.procs["relayd"].pid, "owner": svc.procs[f"tx{held.session['transceiver']}"].pid}
        idle = cpu_window(pids, seconds)  # the held call alone
        route_flood_prefix(lab)
        peak = {"connections": 0, "largest_source": 0}
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.2):
                tcp = ctl.request("GET", "/stats")["slowpath"]["tcp"]
                peak["connections"] = max(peak["connections"], tcp["connections"])
                peak["largest_source"] = max(peak["largest_source"], tcp.get("largest_source", tcp["connections"]))

        sampler = threading.Thread(target=sample, daemon=True)
        syn0, events0 = _syn_counts(ctl), ctl.request("GET", "/stats")["slowpath"]["tcp"]["events"]
        # SYNs left unanswered are given up after 10 ms (the lab answers within
        # one when it answers): the flooder's pace is its own, XDP drops or not.
        flood = Flood(lab, addresses=2600, per_address=4, settle_s=0.01).start()
        sampler.start()
        blocked = False
        try:
            t0 = time.monotonic()
            flood.wait_first_round()
            o0 = flood.opened
            cpu = cpu_window(pids, seconds)  # the flood goes on, round after round
            in_window = flood.opened - o0
            udp = _udp_call(lab)
            browser_udp = browser.call()
            t1 = time.monotonic()  # the held call's window ends here: UDP is blocked next
            lab.run(lab.client_ns, ["nft", "-f", "-"], check=True,
                    input=BLOCK_UDP.format(vip4=lab.vip4, vip6=lab.vip6, port=lab.port))
            blocked = True
            tcp = _tcp_call(lab)
            browser_tcp = browser.call()
            events = ctl.request("GET", "/stats")["slowpath"]["tcp"]["events"]
            syn1 = _syn_counts(ctl)
        finally:
            flood.stop()
            stop.set()
            sampler.join()
            unroute_flood_prefix(lab)
            if blocked:  # UDP again, for the held call's hang-up and the next run
                lab.run(lab.client_ns, ["nft", "delete", "table", "inet", "splitrelay_test_block"])
    return {
        "addresses": 2600, "per_address": 4, "connections_opened": flood.opened,
        "connections_unanswered": flood.unanswered,
        "syns_passed_in_xdp": syn1["pass_tcp_syn"] - syn0["pass_tcp_syn"],
        "syns_dropped_in_xdp": syn1["drop_tcp_syn_rate"] - syn0["drop_tcp_syn_rate"],
        "first_round_s": round(flood.first_round_s, 2) if flood.first_round_s else None,
        "opened_per_s": round(flood.opened / (time.monotonic() - t0)),
        "peak_connections_held": peak["connections"], "peak_held_by_the_64": peak["largest_source"],
        "relayd_cpu_pct": round(max(0.0, cpu["relayd"] - idle["relayd"]), 1),
        "relayd_cpu_total_pct": cpu["relayd"],
        "relayd_cpu_us_per_connection": round(max(0.0, cpu["relayd"] - idle["relayd"]) / 100 * seconds
                                              / max(1, in_window) * 1e6, 1),
        "relayd_idle_cpu_pct": idle["relayd"],
        "owner_cpu_pct": cpu["owner"], "owner_idle_cpu_pct": idle["owner"],
        "established": held.loss(t0, t1),
        "new_udp_call_connected_s": udp.connected_after_s if udp.connected else None,
        "new_tcp_call_connected_s": tcp.connected_after_s if tcp.connected else None,
        "browser_call_udp": browser_udp, "browser_call_tcp": browser_tcp,
        "bridge_events": {k: v - events0.get(k, 0) for k, v in events.items()
                          if k.startswith(("refused", "evicted", "accepted")) and v > events0.get(k, 0)},
    }


def run(seconds: float) -> dict:
    with running_lab(f"ba{secrets.token_hex(3)}", Path(tempfile.mkdtemp(prefix="bench-attacks-"))) as (lab, svc):
        ctl = ControlClient(svc.config["control_socket"])
        browser = BrowserCaller(lab)
        try:
            browser.start()  # the page loaded ahead: a browser's start-up is not a call's set-up
            quiet = browser.call()
            print("  split offers...", file=sys.stderr)
            offers = split_offers(lab, browser)
            print(f"  /64 ICE-TCP flood for {seconds:g} s after its first round, XDP SYN limit lifted...",
                  file=sys.stderr)
            with xdp_syn_limit_lifted(svc):
                before = tcp_flood(lab, svc, ctl, browser, seconds)
            print(f"  /64 ICE-TCP flood for {seconds:g} s after its first round, XDP SYN limit on...",
                  file=sys.stderr)
            after = tcp_flood(lab, svc, ctl, browser, seconds)
        finally:
            browser.stop()
    return {"split_offer_status": offers, "browser_call_quiet": quiet,
            "before_label": "accept rate only", "after_label": "+ XDP SYN limit",
            "before": {"tcp_flood_64": before}, "after": {"tcp_flood_64": after}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    out = {"run": run_info("tests.bench.bench_attacks_py"),
           "what": "ICE-TCP connection flood from 2,600 addresses x 4 of one IPv6 /64 (round after round, "
                   "silent connections), and an offer sent in two writes 300 ms apart; lab on one 2-core machine "
                   "shared with other jobs; the two floods ran one after the other on the same relayd",
           **run(args.seconds)}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
