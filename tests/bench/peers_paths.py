"""The rows of bench_peers: one forwarding path each, between the same
generator (frames entering the relay namespace's public interface `pub`) and
the same sink (XDP on the far end of its internal interface `int`, standing
in for the call's owner OWNER = 10.10.2.2:5000).

- splitrelay: the relay's XDP program (bpf/relay.bpf.c, loaded by
  manager.relay.kernel.datapath as relayd loads it) with one call's flow
  installed, client 10.10.1.2:40000 → VIP 10.10.1.1:3478 → owner.
- redirect_ceiling: bpf/testing/redirect_only.bpf.c, every frame redirected
  to `int` unread: the least an XDP forwarder can do.
- lookup_floor: bpf/testing/lookup_only.bpf.c, the relay's flows4 lookup of
  the splitrelay row's flow and a redirect: the least a forwarder that keeps
  an entry per flow does.
- netfilter: DNAT (VIP:3481 → owner) and SNAT (→ 10.10.0.1:20100) through
  conntrack, nftables in the relay namespace, kernel forwarding.
- coturn: Debian's turnserver on VIP:3479 (relay address 10.10.2.1), a real
  allocation and channel bind made by aioice's TURN client from the client
  namespace, then ChannelData frames.
- rtpengine: Debian's rtpengine in userspace mode (--table=-1), a call set up
  with offer and answer over its ng control protocol (bencode over UDP),
  then RTP to the port its answer gave the caller.
- python: relayd's own slow path (tests/bench/peers_slowpath.py runs
  manager.relay.slowpath.SlowPath) forwarding a client's packets to the owner.

Userspace peers run on their own CPU (PEER_CPU) with their own ports and a
temporary directory, and are stopped afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

from aioice import stun, turn
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from manager.lab import xdp_harness as hx
from manager.lab.netns import NetnsExecutor, ns_popen
from manager.relay.kernel.datapath import OwnerAddr, read_counters
from tests.bench import peers_gen as pg
from tests.bench.peers_gen import STAMP_MAGIC
from tests.support.waiting import Hopeless, eventually

ROOT = Path(__file__).resolve().parents[2]
OWNER = (hx.TX1_4, 5000)
CONN = 1
TURNSERVER = "/usr/bin/turnserver"
RTPENGINE = "/usr/bin/rtpengine"
TURN_USER, TURN_PASS, TURN_REALM = "bench", "bench-secret", "splitrelay.bench"
TURN_CHANNEL = 0x4000
NG_PORT = 22223
NFT_TABLE = "srbench"

# An Opus-sized RTP packet (12-byte header, 160 bytes of payload, 10 bytes
# where an SRTP tag would be), PT 0 (the codec the rtpengine call offers):
# the stamp placeholder sits right after the header.
RTP = bytes([0x80, 0]) + b"\x00\x01" + b"\x00\x00\x00\xa0" + b"\x12\x34\x56\x78" + STAMP_MAGIC + bytes(8) \
    + b"p" * 148 + b"t" * 10
RTP_STAMP = 12   # offset of the stamp in RTP


def udp_frame(sport: int, dst: tuple[str, int], payload: bytes) -> bytes:
    """A client frame arriving on `pub`; UDP checksum 0 (none, allowed for
    IPv4): the generator rewrites the stamp in every frame, and every path
    here keeps a zero checksum zero."""
    return bytes(Ether(src=hx.MAC["client"], dst=hx.MAC["pub"]) / IP(src=hx.CLIENT4, dst=dst[0], ttl=64)
                 / UDP(sport=sport, dport=dst[1], chksum=0) / Raw(payload))


PAYLOAD_OFF = 14 + 20 + 8


# --- the environment every row shares --------------------------------------------------

class Env:
    """The relay namespace (xdp_harness), a client namespace on the other end
    of `pub`, and the CPUs: the generator on gen_cpu, userspace peers on peer_cpu."""

    def __init__(self, h: hx.Harness, tmp: Path):
        self.h = h
        self.tmp = tmp
        self.client_ns = h.ns.replace("srfx-", "srpc-")
        cpus = sorted(os.sched_getaffinity(0))
        self.gen_cpu = cpus[0] if len(cpus) > 1 else None
        self.peer_cpu = cpus[1] if len(cpus) > 1 else None
        subprocess.run(["ip", "netns", "add", self.client_ns], check=True)
        for args in (["link", "set", "pubp", "netns", self.client_ns],):
            subprocess.run(["ip", "-n", h.ns, *args], check=True, capture_output=True)
        for args in (["link", "set", "pubp", "address", hx.MAC["client"]], ["addr", "add", f"{hx.CLIENT4}/24", "dev", "pubp"],
                     ["link", "set", "pubp", "up"], ["link", "set", "lo", "up"]):
            subprocess.run(["ip", "-n", self.client_ns, *args], check=True, capture_output=True)
        self.client = NetnsExecutor(self.client_ns)

    def close(self) -> None:
        self.client.shutdown()
        subprocess.run(["ip", "netns", "del", self.client_ns], capture_output=True)

    def pin(self, argv: list[str]) -> list[str]:
        """A userspace peer on its own CPU, and (pg.REALTIME) at SCHED_FIFO
        priority 1 like the generator thread, in whose context the kernel
        paths run: at normal priority a peer waited up to a scheduler tick
        (4 ms) behind the shared machine's other load in ~1% of its packets."""
        if pg.REALTIME:
            argv = ["chrt", "-f", str(pg.RT_PRIORITY), *argv]
        return ["taskset", "-c", str(self.peer_cpu), *argv] if self.peer_cpu is not None else argv

    def udp_counters(self) -> dict[str, int]:
        """The relay namespace's UDP counters (/proc/net/snmp) and the drops on
        `int` (frames a peer sent that never reached the sink's veth)."""
        def read() -> dict[str, int]:
            lines = [ln.split() for ln in Path("/proc/thread-self/net/snmp").read_text().splitlines()
                     if ln.startswith("Udp:")]
            out = {f"udp_{k}": int(v) for k, v in zip(lines[0][1:], lines[1][1:], strict=True)}
            st = Path("/proc/thread-self/net/dev").read_text()
            for ln in st.splitlines():
                name, _, rest = ln.strip().partition(":")
                if name == "int":
                    f = rest.split()
                    out["int_tx_dropped"] = int(f[11])
            return out
        return self.h.ex.call(read)


def udp_queued(ex: NetnsExecutor, addr: str, port: int) -> int:
    """Bytes waiting in the receive queues of the UDP sockets bound to addr:port."""
    want = f"{socket.htonl(int.from_bytes(socket.inet_aton(addr), 'big')):08X}:{port:04X}"

    def read() -> int:
        total = 0
        for ln in Path("/proc/thread-self/net/udp").read_text().splitlines()[1:]:
            f = ln.split()
            if f[1] == want:
                total += int(f[4].split(":")[1], 16)
        return total
    return ex.call(read)


def wait_udp(ex: NetnsExecutor, addr: str, port: int, timeout: float = 15.0, proc=None, what: str = "") -> None:
    """Until a UDP socket is bound to addr:port in the namespace of ex."""
    want = f"{socket.htonl(int.from_bytes(socket.inet_aton(addr), 'big')):08X}:{port:04X}"

    def bound() -> bool:
        return any(ln.split()[1] == want for ln in Path("/proc/thread-self/net/udp").read_text().splitlines()[1:])

    def listening() -> bool:
        if proc is not None and proc.poll() is not None:
            raise Hopeless(f"{what} exited with {proc.returncode} before listening on {addr}:{port}")
        return ex.call(bound)

    eventually(listening, timeout, what=f"{what} listening on {addr}:{port}", interval=0.05)


def stop_process(p: subprocess.Popen | None, timeout: float = 5.0) -> None:
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout)


# --- rows ---------------------------------------------------------------------------------

class Row:
    name = ""
    label = ""
    userspace = False
    needs: str | None = None        # a binary the row needs

    def start(self, env: Env) -> None:
        """Set the path up once (processes, allocations, flows)."""

    def stop(self, env: Env) -> None:
        pass

    def enter(self, env: Env) -> None:
        """Before each measurement of this row."""

    def leave(self, env: Env) -> None:
        """After each measurement of this row."""

    def frame(self) -> tuple[bytes, int]:
        """(frame, offset of the stamp in it)."""
        raise NotImplementedError

    def slot(self, env: Env, progs: dict[str, int]) -> int | None:
        return None

    def pids(self) -> list[int]:
        return []

    def counters(self, env: Env) -> dict[str, int]:
        """The path's own counters (cumulative), besides the relay's and the
        namespace's UDP counters that every measurement reads."""
        return {}

    def check(self, gen: int, delivered: int, moved: dict[str, int]) -> tuple[bool, str]:
        """Do the counters account for every frame? (ok, what was checked)"""
        raise NotImplementedError

    def missing(self) -> str | None:
        if self.needs and not os.path.exists(self.needs):
            return f"{self.needs} is not installed (scripts/setup.sh installs it)"
        return None


def _relay_moved(moved: dict[str, int]) -> dict[str, int]:
    return {k[6:]: v for k, v in moved.items() if k.startswith("relay_") and v}


class SplitRelay(Row):
    name, label = "splitrelay", "splitrelay (XDP)"

    def start(self, env: Env) -> None:
        dp = env.h.dp
        dp.set_owner(CONN, OwnerAddr(addr4=OWNER[0], port4=OWNER[1], addr6=hx.TX1_6, port6=OWNER[1]))
        dp.add_flow((hx.CLIENT4, 40000), (hx.VIP4, hx.VIP_PORT), CONN, 20001)

    def frame(self) -> tuple[bytes, int]:
        return udp_frame(40000, (hx.VIP4, hx.VIP_PORT), RTP), PAYLOAD_OFF + RTP_STAMP

    def slot(self, env: Env, progs: dict[str, int]) -> int | None:
        return env.h.dp.prog_fd

    def check(self, gen: int, delivered: int, moved: dict[str, int]) -> tuple[bool, str]:
        relay = _relay_moved(moved)
        fwd = relay.pop("fwd_in_rtp", 0)
        ok = fwd == gen == delivered and not relay
        return ok, f"relay fwd_in_rtp +{fwd:,} of {gen:,} generated, sink {delivered:,}" + (
            f", other relay counters moved: {relay}" if relay else ", no other relay counter moved")


class RedirectCeiling(SplitRelay):
    name, label = "redirect_ceiling", "ceiling: bare XDP redirect"

    def start(self, env: Env) -> None:
        pass

    def slot(self, env: Env, progs: dict[str, int]) -> int | None:
        return progs["redirect"]

    def check(self, gen: int, delivered: int, moved: dict[str, int]) -> tuple[bool, str]:
        relay = _relay_moved(moved)
        ok = gen == delivered and not relay
        return ok, f"sink {delivered:,} of {gen:,} generated" + (f", relay counters moved: {relay}" if relay else "")


class LookupFloor(RedirectCeiling):
    name, label = "lookup_floor", "floor: flows4 lookup + redirect"

    def slot(self, env: Env, progs: dict[str, int]) -> int | None:
        return progs["lookup_redirect"]


class Netfilter(Row):
    name, label = "netfilter", "netfilter DNAT+SNAT (conntrack)"
    needs = "/usr/sbin/nft"
    PORT = 3481
    SNAT = (hx.INT4, 20100)

    def rules(self) -> str:
        return f"""table ip {NFT_TABLE} {{
  chain pre {{ type nat hook prerouting priority dstnat; policy accept;
    ip daddr {hx.VIP4} udp dport {self.PORT} dnat to {OWNER[0]}:{OWNER[1]}
  }}
  chain post {{ type nat hook postrouting priority srcnat; policy accept;
    ip saddr {hx.CLIENT4} ip daddr {OWNER[0]} udp dport {OWNER[1]} snat to {self.SNAT[0]}:{self.SNAT[1]}
  }}
  chain counted {{ type filter hook forward priority filter; policy accept;
    ip daddr {OWNER[0]} udp dport {OWNER[1]} counter
  }}
}}
"""

    def enter(self, env: Env) -> None:
        # Only while this row is measured: conntrack hooks in the namespace
        # would otherwise tax the userspace rows' packets too.
        subprocess.run(["ip", "netns", "exec", env.h.ns, "nft", "-f", "-"], input=self.rules(), text=True,
                       check=True, capture_output=True)

    def leave(self, env: Env) -> None:
        subprocess.run(["ip", "netns", "exec", env.h.ns, "nft", "delete", "table", "ip", NFT_TABLE],
                       capture_output=True)
        subprocess.run(["ip", "netns", "exec", env.h.ns, "conntrack", "-F"], capture_output=True)

    def frame(self) -> tuple[bytes, int]:
        return udp_frame(40010, (hx.VIP4, self.PORT), RTP), PAYLOAD_OFF + RTP_STAMP

    def counters(self, env: Env) -> dict[str, int]:
        out = subprocess.run(["ip", "netns", "exec", env.h.ns, "nft", "-j", "list", "table", "ip", NFT_TABLE],
                             capture_output=True, text=True)
        if out.returncode != 0:
            return {"nft_forwarded": 0, "conntrack_entries": 0}
        fwd = 0
        for item in json.loads(out.stdout)["nftables"]:
            rule = item.get("rule")
            if rule and rule.get("chain") == "counted":
                fwd += sum(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
        ct = subprocess.run(["ip", "netns", "exec", env.h.ns, "conntrack", "-L", "-p", "udp", "--orig-port-dst",
                             str(self.PORT)], capture_output=True, text=True)
        entries = len([ln for ln in ct.stdout.splitlines() if ln.startswith("udp")])
        return {"nft_forwarded": fwd, "conntrack_entries": entries}

    def check(self, gen: int, delivered: int, moved: dict[str, int]) -> tuple[bool, str]:
        # The counters are read before the table goes: moved["nft_forwarded"] is
        # the whole count (the table is new each time), conntrack_entries the end state.
        fwd = moved.get("nft_forwarded", 0)
        ok = fwd == gen == delivered and moved.get("conntrack_entries") == 1 and not _relay_moved(moved)
        return ok, (f"nft forward counter {fwd:,} of {gen:,} generated, sink {delivered:,}, "
                    f"{moved.get('conntrack_entries')} conntrack entry")


def _udp_accounting(gen: int, delivered: int, moved: dict[str, int], own: str) -> tuple[bool, str]:
    """Userspace peers: every generated frame was delivered, dropped at the
    peer's socket (its receive buffer full), or is still in that socket's
    queue (a peer that stopped reading: each frame there takes at least 256
    bytes of the buffer)."""
    drops = moved.get("udp_RcvbufErrors", 0)
    noport = moved.get("udp_NoPorts", 0)
    vdrop = moved.get("int_tx_dropped", 0)
    queued_bytes = moved.get("peer_queued_bytes", 0)
    left = gen - delivered - drops - vdrop
    ok = delivered > 0 and (left == 0 or 0 < left * 256 <= queued_bytes) and not noport and not _relay_moved(moved)
    return ok, (f"sink {delivered:,} + dropped at the peer's socket {drops:,}" + (f" + on int {vdrop:,}" if vdrop else "")
                + (f" + {left:,} still in the peer's socket queue ({queued_bytes:,} bytes)" if left else "")
                + f" = {delivered + drops + vdrop + left:,} of {gen:,} generated" + (f"; {noport} to no socket" if noport else "")
                + (f"; {own}" if own else ""))


class Coturn(Row):
    name, label = "coturn", "coturn 4.6 (TURN ChannelData)"
    userspace = True
    needs = TURNSERVER
    PORT = 3479
    CLIENT_PORT = 40020

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.relayed: tuple[str, int] | None = None

    def start(self, env: Env) -> None:
        d = env.tmp / "coturn"
        d.mkdir()
        argv = [TURNSERVER, "-n", f"--listening-ip={hx.VIP4}", f"--listening-port={self.PORT}",
                "--relay-ip=10.10.2.1", "--min-port=49152", "--max-port=49199",
                "--lt-cred-mech", f"--user={TURN_USER}:{TURN_PASS}", f"--realm={TURN_REALM}",
                f"--userdb={d / 'turndb'}", f"--pidfile={d / 'turnserver.pid'}", f"--log-file={d / 'turn.log'}",
                "--simple-log", "--no-tls", "--no-dtls", "--no-cli", "--no-rfc5780", "--no-software-attribute",
                "--max-allocate-lifetime=3600"]
        self.proc = ns_popen(env.h.ns, env.pin(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             cwd=d)
        wait_udp(env.h.ex, hx.VIP4, self.PORT, proc=self.proc, what="turnserver")
        self.relayed = env.client.call(asyncio.run, asyncio.wait_for(self._allocate(), 15))

    async def _allocate(self) -> tuple[str, int]:
        """A real TURN allocation and channel bind (aioice's TURN client)."""
        loop = asyncio.get_running_loop()
        server = (hx.VIP4, self.PORT)
        transport, proto = await loop.create_datagram_endpoint(
            lambda: turn.TurnClientUdpProtocol(server, username=TURN_USER, password=TURN_PASS, lifetime=3600,
                                               channel_refresh_time=3000),
            local_addr=(hx.CLIENT4, self.CLIENT_PORT), remote_addr=server)
        try:
            relayed = await proto.connect()
            await proto.channel_bind(TURN_CHANNEL, OWNER)
        finally:
            if proto.refresh_task is not None:
                proto.refresh_task.cancel()  # the allocation lives 3600 s: longer than any run
            transport.close()
        return relayed

    def stop(self, env: Env) -> None:
        stop_process(self.proc)

    def counters(self, env: Env) -> dict[str, int]:
        return {"peer_queued_bytes": udp_queued(env.h.ex, hx.VIP4, self.PORT)}

    def frame(self) -> tuple[bytes, int]:
        data = struct.pack("!HH", TURN_CHANNEL, len(RTP)) + RTP
        return udp_frame(self.CLIENT_PORT, (hx.VIP4, self.PORT), data), PAYLOAD_OFF + 4 + RTP_STAMP

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def check(self, gen: int, delivered: int, moved: dict[str, int]) -> tuple[bool, str]:
        return _udp_accounting(gen, delivered, moved, f"allocation {self.relayed[0]}:{self.relayed[1]}"
                               if self.relayed else "")


# --- rtpengine's ng protocol: bencode over UDP ------------------------------------------------

def bencode(v) -> bytes:
    if isinstance(v, int):
        return b"i%de" % v
    if isinstance(v, str):
        v = v.encode()
    if isinstance(v, bytes):
        return b"%d:%s" % (len(v), v)
    if isinstance(v, list):
        return b"l" + b"".join(bencode(x) for x in v) + b"e"
    if isinstance(v, dict):
        return b"d" + b"".join(bencode(k) + bencode(v[k]) for k in sorted(v)) + b"e"
    raise TypeError(f"cannot bencode {type(v).__name__}")


def bdecode(data: bytes):
    def parse(i: int):
        c = data[i:i + 1]
        if c == b"i":
            j = data.index(b"e", i)
            return int(data[i + 1:j]), j + 1
        if c in (b"l", b"d"):
            i += 1
            items = []
            while data[i:i + 1] != b"e":
                x, i = parse(i)
                items.append(x)
            if c == b"l":
                return items, i + 1
            return {items[k].decode(): items[k + 1] for k in range(0, len(items), 2)}, i + 1
        j = data.index(b":", i)
        n = int(data[i:j])
        return data[j + 1:j + 1 + n], j + 1 + n

    value, end = parse(0)
    if end != len(data):
        raise ValueError(f"bencode: {len(data) - end} trailing bytes")
    return value


def _sdp(addr: str, port: int) -> str:
    return (f"v=0\r\no=- 1 1 IN IP4 {addr}\r\ns=bench\r\nc=IN IP4 {addr}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n")


def _sdp_media(sdp: bytes) -> tuple[str, int]:
    text = sdp.decode()
    addr = re.search(r"^c=IN IP4 (\S+)", text, re.M)
    port = re.search(r"^m=audio (\d+) ", text, re.M)
    if not addr or not port:
        raise RuntimeError(f"rtpengine: no audio address in its SDP: {text!r}")
    return addr.group(1), int(port.group(1))


class Rtpengine(Row):
    name, label = "rtpengine", "rtpengine 10.5 (userspace)"
    userspace = True
    needs = RTPENGINE
    CLIENT_PORT = 40030

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.call_id = ""
        self.caller_sends_to: tuple[str, int] | None = None
        self.callee_gets_from: tuple[str, int] | None = None

    def ng(self, env: Env, msg: dict) -> dict:
        def call() -> dict:
            cookie = secrets.token_hex(4).encode()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(5.0)
                s.sendto(cookie + b" " + bencode(msg), ("127.0.0.1", NG_PORT))
                while True:
                    data = s.recv(65535)
                    got, _, body = data.partition(b" ")
                    if got == cookie:
                        return bdecode(body)
        reply = env.h.ex.call(call)
        if reply.get("result") not in (b"ok", b"pong"):
            raise RuntimeError(f"rtpengine {msg.get('command')}: {reply}")
        return reply

    def start(self, env: Env) -> None:
        d = env.tmp / "rtpengine"
        d.mkdir()
        argv = [RTPENGINE, "--config-file=none", "--foreground", "--log-stderr", "--log-level=4", "--table=-1",
                f"--interface=pub/{hx.VIP4}", "--interface=int/10.10.2.1", f"--listen-ng=127.0.0.1:{NG_PORT}",
                "--port-min=30000", "--port-max=30099", f"--pidfile={d / 'rtpengine.pid'}",
                "--timeout=3600", "--silent-timeout=3600", "--delete-delay=0", "--no-redis-required"]
        self.log = open(d / "rtpengine.log", "wb")  # noqa: SIM115 - kept open while it runs
        self.proc = ns_popen(env.h.ns, env.pin(argv), stdout=self.log, stderr=subprocess.STDOUT, cwd=d)
        wait_udp(env.h.ex, "127.0.0.1", NG_PORT, proc=self.proc, what="rtpengine")
        self.ng(env, {"command": "ping"})
        self.enter(env)

    def enter(self, env: Env) -> None:
        """A new call for every measurement: after an overload, rtpengine stops
        reading the old call's socket for good (MAX_RECV_LOOP_STRIKES)."""
        if self.call_id:
            self.ng(env, {"command": "delete", "call-id": self.call_id})
        self.call_id = f"bench-{secrets.token_hex(4)}"
        offer = self.ng(env, {"command": "offer", "call-id": self.call_id, "from-tag": "caller",
                              "sdp": _sdp(hx.CLIENT4, self.CLIENT_PORT), "direction": ["pub", "int"],
                              "ICE": "remove"})
        self.callee_gets_from = _sdp_media(offer["sdp"])
        answer = self.ng(env, {"command": "answer", "call-id": self.call_id, "from-tag": "caller",
                               "to-tag": "callee", "sdp": _sdp(*OWNER), "ICE": "remove"})
        self.caller_sends_to = _sdp_media(answer["sdp"])

    def stop(self, env: Env) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.ng(env, {"command": "delete", "call-id": self.call_id})
            except (RuntimeError, OSError):
                pass
        stop_process(self.proc)
        if getattr(self, "log", None):
            self.log.close()

    def frame(self) -> tuple[bytes, int]:
        return udp_frame(self.CLIENT_PORT, self.caller_sends_to, RTP), PAYLOAD_OFF + RTP_STAMP

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def counters(self, env: Env) -> dict[str, int]:
        out = {"peer_queued_bytes": udp_queued(env.h.ex, *self.caller_sends_to)}
        q = self.ng(env, {"command": "query", "call-id": self.call_id})
        tag = q.get("tags", {}).get("caller", {})
        packets = 0
        for media in tag.get("medias", []):
            for stream in media.get("streams", []):
                packets += stream.get("stats", {}).get("packets", 0)
        out["rtpengine_caller_packets"] = packets
        log = (env.tmp / "rtpengine" / "rtpengine.log").read_text(errors="replace")
        out["rtpengine_overload_lines"] = log.count("UDP receive queue")
        return out

    def check(self, gen: int, delivered: int, moved: dict[str, int]) -> tuple[bool, str]:
        got = moved.get("rtpengine_caller_packets", 0)
        over = moved.get("rtpengine_overload_lines", 0)
        ok, text = _udp_accounting(gen, delivered, moved, f"rtpengine counted {got:,} from the caller" + (
            f"; its log reported an over-full receive queue {over} time(s) (after 5 it stops reading the call)"
            if over else ""))
        return ok and got == delivered, text


class PythonSlowPath(Row):
    name, label = "python", "Python: relayd's slow path"
    userspace = True
    PORT = 3480
    CLIENT_PORT = 40040

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.ufrag = ""

    def start(self, env: Env) -> None:
        argv = [sys.executable, "-m", "tests.bench.peers_slowpath", "--vip", f"{hx.VIP4}:{self.PORT}",
                "--owner", f"{OWNER[0]}:{OWNER[1]}", "--pool", hx.INT4, "--ports", "20000-20099"]
        env_vars = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = ns_popen(env.h.ns, env.pin(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             cwd=ROOT, env=env_vars)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the slow path process exited with {self.proc.wait()} before it was ready")
        self.ufrag = json.loads(line)["ufrag"]
        # The client's first check opens its leg (forwarded to the owner, unstamped).
        msg = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        msg.attributes["USERNAME"] = f"{self.ufrag}:cli1"
        msg.attributes["PRIORITY"] = 1853824767

        def check() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((hx.CLIENT4, self.CLIENT_PORT))
                s.sendto(bytes(msg), (hx.VIP4, self.PORT))

        def opened() -> bool:
            stats = self.stats()
            if stats.get("legs_opened", 0) >= 1:
                return True
            env.client.call(check)  # (again: a check may be lost on a loaded machine)
            raise AssertionError(f"the slow path opened no leg: {stats}")

        eventually(opened, 10, what="the slow path to open a leg", interval=0.2)

    def stats(self) -> dict[str, int]:
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self, env: Env) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        stop_process(self.proc)

    def frame(self) -> tuple[bytes, int]:
        return udp_frame(self.CLIENT_PORT, (hx.VIP4, self.PORT), RTP), PAYLOAD_OFF + RTP_STAMP

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def counters(self, env: Env) -> dict[str, int]:
        return {"slowpath_forward_in": self.stats().get("forward_in", 0),
                "peer_queued_bytes": udp_queued(env.h.ex, hx.VIP4, self.PORT)}

    def check(self, gen: int, delivered: int, moved: dict[str, int]) -> tuple[bool, str]:
        fwd = moved.get("slowpath_forward_in", 0)
        ok, text = _udp_accounting(gen, delivered, moved, f"slow path forward_in +{fwd:,}")
        return ok and fwd == delivered, text


ROWS: tuple[type[Row], ...] = (SplitRelay, RedirectCeiling, LookupFloor, Netfilter, Coturn, Rtpengine, PythonSlowPath)
ROW_NAMES = tuple(r.name for r in ROWS)


def common_counters(env: Env) -> dict[str, int]:
    """What every measurement reads: the relay's per-CPU counters and the
    relay namespace's UDP and `int` drop counters."""
    out = {f"relay_{k}": v[0] for k, v in read_counters(env.h.dp.maps).items()}
    out.update(env.udp_counters())
    return out
