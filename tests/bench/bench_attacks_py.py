"""The attacks the Python side answers, measured in a lab: an ICE-TCP
connection flood from 2,600 addresses of one IPv6 /64, and an offer split
across two TCP writes 300 ms apart.

For the flood: the most connections the /64 held at once (sampled from the
control API), relayd's CPU while it ran (less what it spends idle), and the
time a new aiortc call (UDP, then ICE-TCP with UDP blocked) took to connect
during it. For split offers: the status of the same offer sent in one write
and in two.

Run it from a checkout to measure that checkout (docs/benchmarks.md ran it
on main and on the branch, one after the other). Prints JSON; asserts
nothing about speed.

    .venv/bin/python -m tests.bench.bench_attacks_py [--seconds 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
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
from tests.bench.provenance import run_info
from tests.support.tcp_calls import BLOCK_UDP
from tests.support.tcp_flood import Flood, cpu_seconds, route_flood_prefix, unroute_flood_prefix


async def _offer() -> str:
    from aiortc import RTCPeerConnection

    pc = RTCPeerConnection()
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


def split_offers(lab) -> dict:
    with NetnsExecutor(lab.client_ns) as ex:
        body = ex.call(asyncio.run, _offer()).encode()
        return {"one_write": ex.call(_post, lab.signaling_url, body, None),
                "two_writes_300ms": ex.call(_post, lab.signaling_url, body, 0.3)}


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


def tcp_flood(lab, svc, ctl, seconds: float) -> dict:
    pid = svc.procs["relayd"].pid
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)  # the idle measurement window
    idle = (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
    route_flood_prefix(lab)
    peak = {"connections": 0, "largest_source": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            tcp = ctl.request("GET", "/stats")["slowpath"]["tcp"]
            peak["connections"] = max(peak["connections"], tcp["connections"])
            peak["largest_source"] = max(peak["largest_source"], tcp.get("largest_source", tcp["connections"]))

    sampler = threading.Thread(target=sample, daemon=True)
    flood = Flood(lab, addresses=2600, per_address=4).start()
    sampler.start()
    try:
        c0, t0 = cpu_seconds(pid), time.monotonic()
        flood.wait_first_round()
        time.sleep(seconds)  # the flood goes on, round after round
        c1, t1 = cpu_seconds(pid), time.monotonic()
        udp = _udp_call(lab)
        lab.run(lab.client_ns, ["nft", "-f", "-"], check=True,
                input=BLOCK_UDP.format(vip4=lab.vip4, vip6=lab.vip6, port=lab.port))
        tcp = _tcp_call(lab)
        events = ctl.request("GET", "/stats")["slowpath"]["tcp"]["events"]
    finally:
        flood.stop()
        stop.set()
        sampler.join()
        unroute_flood_prefix(lab)
    return {
        "addresses": 2600, "per_address": 4, "connections_opened": flood.opened,
        "first_round_s": round(flood.first_round_s, 2) if flood.first_round_s else None,
        "opened_per_s": round(flood.opened / (time.monotonic() - t0)),
        "peak_connections_held": peak["connections"], "peak_held_by_the_64": peak["largest_source"],
        "relayd_cpu_pct": round(max(0.0, (c1 - c0) / (t1 - t0) - idle) * 100, 1),
        "relayd_cpu_us_per_connection": round(max(0.0, c1 - c0 - idle * (t1 - t0)) / max(1, flood.opened) * 1e6, 1),
        "relayd_idle_cpu_pct": round(idle * 100, 1),
        "new_udp_call_connected_s": udp.connected_after_s if udp.connected else None,
        "new_tcp_call_connected_s": tcp.connected_after_s if tcp.connected else None,
        "bridge_events": {k: v for k, v in events.items() if k.startswith(("refused", "evicted", "accepted"))},
    }


def run(seconds: float) -> dict:
    with running_lab(f"ba{secrets.token_hex(3)}", Path(tempfile.mkdtemp(prefix="bench-attacks-"))) as (lab, svc):
        ctl = ControlClient(svc.config["control_socket"])
        print("  split offers...", file=sys.stderr)
        offers = split_offers(lab)
        print(f"  /64 ICE-TCP flood for {seconds:g} s after its first round...", file=sys.stderr)
        flood = tcp_flood(lab, svc, ctl, seconds)
    return {"split_offer_status": offers, "tcp_flood_64": flood}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    out = {"run": run_info("tests.bench.bench_attacks_py"), **run(args.seconds)}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
