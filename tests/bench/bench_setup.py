"""Set-up rate of the slow path: legs per second taken from a client's first
STUN check to a flow in the kernel's maps.

    sudo .venv/bin/python -m tests.bench.bench_setup [--json] [--quick] [--profile]

A leg is the whole walk relayd makes for a new client tuple: the check is
read from the public socket and admitted (STUN parse, routing hint MAC, the
call, the bounds), a flow source is taken, the check goes to the owner from
it, the owner's success comes back on the shared flow socket and goes to
the client, and the flow is installed in the kernel (owner entry, flow and
return entries). Everything is the production code (SlowPath, FlowSockets,
Datapath with the real program's maps) in a namespace of its own; only the
two ends are synthetic:

- the clients: one process sending Binding requests shaped as a browser's
  ICE check (USERNAME with the call's ufrag, PRIORITY, ICE-CONTROLLING,
  MESSAGE-INTEGRITY, FINGERPRINT), each leg from its own address of
  10.98.0.0/16 (local to the namespace, so the success reaches it), paced at
  the offered rate;
- the owner: one process answering every check with a success
  (XOR-MAPPED-ADDRESS, MESSAGE-INTEGRITY, FINGERPRINT), as a transceiver's
  ICE agent does once it authenticated it.

Each step offers fresh calls (one leg each) at a rate; the figure is legs
installed per second of the relay's wall clock from the first check read to
the last flow installed, checked against the slow path's counters and the
number of entries in the kernel's flows map. XDP is not in front here
(loopback): its admission is measured by bench_flood. Prints figures;
asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import platform
import pstats
import socket
import statistics
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aioice import stun

from manager.lab.netns import run_in_netns
from manager.protocol.addresses import OwnerAddr
from manager.protocol.ufrag import encode_ufrag
from manager.relay.config import DatapathConfig, Endpoint
from manager.relay.kernel.datapath import Datapath
from manager.relay.kernel.flow_sockets import FlowSockets
from manager.relay.registry import Registry
from manager.relay.slowpath import SlowPath
from tests.bench.provenance import run_info

KEY = bytes(range(32))
VIP = ("10.99.0.1", 3478)
OWNER = ("10.99.0.2", 5000)
POOL = "10.99.1.1"               # first of the flow-source addresses
POOL_COUNT = 4
CLIENT_NET = (10 << 24) | (98 << 16)  # 10.98.0.0/16: one address per leg
CLIENT_PORT = 40000
CLIENT_UFRAG = "cli1"
ICE_PWD = "benchpasswordbenchpassword"  # both ends' (the relay never reads it)
TRANSCEIVER = 1


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the two synthetic ends (run as `python -m tests.bench.bench_setup owner|clients`) ------

def check_packet(server_ufrag: str, client: tuple[str, int]) -> bytes:
    """A browser-shaped ICE check from `client` as an IPv4/UDP datagram
    (header included: the clients send through a raw socket)."""
    msg = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    msg.attributes["USERNAME"] = f"{server_ufrag}:{CLIENT_UFRAG}"
    msg.attributes["PRIORITY"] = 1853817087
    msg.attributes["ICE-CONTROLLING"] = 0x1234567890ABCDEF
    msg.add_message_integrity(ICE_PWD.encode())
    msg.add_fingerprint()
    payload = bytes(msg)
    udp = struct.pack("!HHHH", client[1], VIP[1], 8 + len(payload), 0) + payload  # checksum 0: none (IPv4)
    src, dst = socket.inet_aton(client[0]), socket.inet_aton(VIP[0])
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, socket.IPPROTO_UDP, 0, src, dst)
    return ip + udp


def client_addr(i: int) -> str:
    a = CLIENT_NET + 1 + i
    return socket.inet_ntoa(a.to_bytes(4, "big"))


def run_clients(ufrags_file: str, rate: float, first: int) -> None:
    """Send one check per ufrag (a leg each, from client addresses `first`
    on) at `rate` checks/s."""
    with open(ufrags_file) as f:
        ufrags = f.read().split()
    packets = [check_packet(u, (client_addr(first + i), CLIENT_PORT)) for i, u in enumerate(ufrags)]
    # The successes come back to CLIENT_PORT at every client address: one
    # socket on the wildcard address takes them (unread: once its queue is
    # full the kernel drops them, as cheap as a NIC sending them away), so
    # no client address answers with an ICMP port unreachable.
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("0.0.0.0", CLIENT_PORT))
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    t0 = time.monotonic()
    for i, p in enumerate(packets):
        due = t0 + i / rate
        while (now := time.monotonic()) < due:
            time.sleep(min(due - now, 0.001))  # pacing
        s.sendto(p, (VIP[0], 0))
    print(json.dumps({"sent": len(packets), "seconds": time.monotonic() - t0}), flush=True)
    sink.close()


def run_owner() -> None:
    """Answer every Binding request with a success, until terminated."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind(OWNER)
    s.settimeout(0.2)
    print("ready", flush=True)
    answered = 0
    while True:
        try:
            data, sender = s.recvfrom(2048)
        except TimeoutError:
            continue
        try:
            req = stun.parse_message(data)
        except ValueError:
            continue
        res = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE,
                           transaction_id=req.transaction_id)
        res.attributes["XOR-MAPPED-ADDRESS"] = sender
        res.add_message_integrity(ICE_PWD.encode())
        res.add_fingerprint()
        s.sendto(bytes(res), sender)
        answered += 1


# --- the relay side ---------------------------------------------------------------------

@dataclass
class Step:
    offered_rate: float         # checks/s the clients sent at
    legs: int                   # checks sent (one fresh call each)
    sent_seconds: float = 0.0
    installed: int = 0          # flows_installed counted by the slow path
    kernel_flows: int = 0       # entries in the flows map after the step (cumulative)
    seconds: float = 0.0        # first check read → last flow installed
    legs_per_s: float = 0.0
    cpu_us_per_leg: float = 0.0  # the relay thread's CPU time (user + kernel) per installed leg
    setup_ms: dict = field(default_factory=dict)  # check read → flow installed, p50/p99/max
    stats: dict = field(default_factory=dict)     # slow-path counters that moved
    ok: bool = False


def _ns_setup(ns: str) -> None:
    def ip(*args: str) -> None:
        subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)

    ip("link", "set", "lo", "up")
    for addr in (VIP[0], OWNER[0], *(socket.inet_ntoa((int.from_bytes(socket.inet_aton(POOL), "big") + k)
                                                       .to_bytes(4, "big")) for k in range(POOL_COUNT))):
        ip("addr", "add", f"{addr}/32", "dev", "lo")
    ip("route", "add", "local", "10.98.0.0/16", "dev", "lo")  # every client address is local


async def _relay(ns: str, plan: list[tuple[float, int]], profile: cProfile.Profile | None) -> dict:
    cfg = DatapathConfig(pin_dir=f"/sys/fs/bpf/srsetup-{ns[-8:]}", vips=[Endpoint(addr=VIP[0], port=VIP[1])],
                         internal_addr4=POOL, internal_addr_count=POOL_COUNT,
                         flow_port_min=20000, flow_port_max=59999,
                         max_flows=1 << 18, max_reverse=1 << 18, max_owners=1 << 18)
    dp = Datapath(cfg)
    dp.load(upgrade=True)
    fs = FlowSockets(cfg)
    fs.open()
    registry = Registry(heartbeat_timeout=3600.0)
    registry.register_transceiver(TRANSCEIVER, "http://127.0.0.1:1", 1_000_000)
    latencies: list[float] = []
    # Admission (XDP's, and the slow path's backstop behind it) is bench_flood's to measure.
    sp = SlowPath(registry, dp, fs, hint_key=KEY, vips=[VIP], on_flow_installed=latencies.append,
                  source_rate=0, budget_rate=0)
    await sp.start()
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    owner = subprocess.Popen([sys.executable, "-m", "tests.bench.bench_setup", "owner"], cwd=root,
                             stdout=subprocess.PIPE, text=True)
    steps: list[Step] = []
    try:
        if owner.stdout.readline().strip() != "ready":
            raise RuntimeError("the owner stand-in did not start")
        for rate, legs in plan:
            ufrags = []
            for _ in range(legs):
                conn = registry.allocate_conn_id()
                ufrag = encode_ufrag(KEY, TRANSCEIVER, conn)
                registry.add_call(conn_id=conn, transceiver_id=TRANSCEIVER, client_ufrag=CLIENT_UFRAG,
                                  server_ufrag=ufrag)
                registry.activate(conn, OwnerAddr(addr4=OWNER[0], port4=OWNER[1]))
                ufrags.append(ufrag)
            path = f"/tmp/srsetup-{ns[-8:]}.ufrags"
            with open(path, "w") as f:
                f.write("\n".join(ufrags))
            before = dict(sp.stats)
            latencies.clear()
            step = Step(offered_rate=rate, legs=legs)
            log(f"bench: offering {legs:,} legs at {rate:,.0f}/s")
            if profile:
                profile.enable()
            cpu0 = time.thread_time()
            clients = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.bench.bench_setup", "clients", path, str(rate),
                str(sum(s_.legs for s_ in steps)), cwd=root,
                stdout=asyncio.subprocess.PIPE)
            first = last = None
            seen = 0
            deadline = time.monotonic() + legs / rate + 10.0
            while time.monotonic() < deadline:
                opened = sp.stats["legs_opened"] - before.get("legs_opened", 0)
                done = sp.stats["flows_installed"] - before.get("flows_installed", 0)
                if opened and first is None:
                    first = time.monotonic()
                if done > seen:
                    seen, last = done, time.monotonic()
                if done >= legs or (last is not None and clients.returncode is not None
                                    and time.monotonic() - last > 2.0):
                    break  # all installed, or the clients are done and nothing moved for 2 s
                await asyncio.sleep(0.002)  # the measurement's sampling period
            cpu = time.thread_time() - cpu0
            out, _ = await clients.communicate()
            if profile:
                profile.disable()
            sent = json.loads(out)
            step.sent_seconds = round(sent["seconds"], 3)
            step.installed = sp.stats["flows_installed"] - before.get("flows_installed", 0)
            last = last or time.monotonic()
            step.seconds = round(last - (first or last), 4)
            step.legs_per_s = round(step.installed / step.seconds, 1) if step.seconds else 0.0
            step.cpu_us_per_leg = round(cpu / step.installed * 1e6, 1) if step.installed else 0.0
            if latencies:
                ms = sorted(x * 1000 for x in latencies)
                step.setup_ms = {"p50": round(statistics.median(ms), 2),
                                 "p99": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2),
                                 "max": round(ms[-1], 2)}
            step.stats = {k: v - before.get(k, 0) for k, v in sp.stats.items() if v != before.get(k, 0)}
            step.kernel_flows = len(dp.maps.flows)
            step.ok = step.installed == legs == step.stats.get("legs_opened", 0) and step.kernel_flows == sum(
                s_.installed for s_ in steps) + step.installed
            steps.append(step)
            log(f"bench: {step.installed:,}/{legs:,} installed in {step.seconds:.3f} s: {step.legs_per_s:,.0f} legs/s, "
                f"set-up p50 {step.setup_ms.get('p50')} ms p99 {step.setup_ms.get('p99')} ms; "
                f"kernel flows {step.kernel_flows:,}{'' if step.ok else '  CHECK FAILED'}")
            os.unlink(path)
    finally:
        owner.terminate()
        owner.wait()
        await sp.stop()
        fs.close()
        dp.detach(purge=True)
        dp.close()
    return {"steps": [asdict(s) for s in steps]}


def run(plan: list[tuple[float, int]], profile: bool = False) -> dict:
    ns = f"srsetup-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    prof = cProfile.Profile() if profile else None
    try:
        _ns_setup(ns)
        res = run_in_netns(ns, asyncio.run, _relay(ns, plan, prof))
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    res["machine"] = {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version()}
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        res["profile"] = buf.getvalue()
    return res


def table(res: dict) -> str:
    head = (f"{'offered legs/s':>15}{'legs':>8}{'installed':>11}{'legs/s':>10}{'CPU µs/leg':>12}"
            f"{'set-up p50':>12}{'p99':>9}{'max':>9}  check")
    lines = [head, "-" * len(head)]
    for s in res["steps"]:
        lines.append(f"{s['offered_rate']:>15,.0f}{s['legs']:>8,}{s['installed']:>11,}{s['legs_per_s']:>10,.0f}"
                     f"{s['cpu_us_per_leg']:>12,.0f}"
                     f"{s['setup_ms'].get('p50', float('nan')):>10.2f}ms{s['setup_ms'].get('p99', float('nan')):>7.2f}ms"
                     f"{s['setup_ms'].get('max', float('nan')):>7.2f}ms  {'ok' if s['ok'] else 'FAILED'}")
    best = max((s["legs_per_s"] for s in res["steps"] if s["ok"]), default=0)
    lines.append(f"highest set-up rate with every leg installed: {best:,.0f} legs/s")
    cpu = [s["cpu_us_per_leg"] for s in res["steps"] if s["installed"]]
    if cpu:
        lines.append(f"relay thread CPU per leg: {min(cpu):,.0f}-{max(cpu):,.0f} µs "
                     f"(one core: {1e6 / statistics.median(cpu):,.0f} legs/s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["owner"]:
        run_owner()
        return 0
    if argv[:1] == ["clients"]:
        run_clients(argv[1], float(argv[2]), int(argv[3]))
        return 0
    ap = argparse.ArgumentParser(prog="python -m tests.bench.bench_setup", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    ap.add_argument("--quick", action="store_true", help="two small steps (~5 s)")
    ap.add_argument("--profile", action="store_true", help="profile the relay side (cProfile, by own time)")
    ap.add_argument("--rates", type=float, nargs="+", default=None,
                    help="offered legs/s, one step each (default 1000 2000 5000 10000 20000)")
    ap.add_argument("--legs", type=int, default=None, help="legs per step (default 10,000)")
    ap.add_argument("--save", type=Path, help="also write the JSON here (docs/bench-setup.json: make bench-report)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_setup: needs root (namespaces, BPF); run it as root", file=sys.stderr)
        return 2
    rates = args.rates or ([1000.0, 5000.0] if args.quick else [1000.0, 2000.0, 5000.0, 10000.0, 20000.0])
    legs = args.legs or (1000 if args.quick else 10_000)
    t0 = time.monotonic()
    res = run([(r, legs) for r in rates], profile=args.profile)
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    res["run"] = run_info("tests.bench.bench_setup", argv)
    if args.save:
        args.save.write_text(json.dumps(res, indent=2) + "\n")
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        m = res["machine"]
        print(f"splitrelay set-up rate: kernel {m['kernel']}, {m['cpus']} CPUs, Python {m['python']}; "
              f"{res['elapsed_s']} s")
        print(table(res))
        if "profile" in res:
            print(res["profile"])
    return 0 if all(s["ok"] for s in res["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
