"""Cost of the relay's XDP program in ns per packet, measured with BPF_PROG_TEST_RUN.

    .venv/bin/python -m tests.bench.bench_xdp [--json] [--quick]     (or: make bench)

Prints figures; asserts nothing about speed. Every relay figure is checked
against the program's own per-CPU counters: the counter of the expected
verdict must rise by exactly the number of runs measured, and no other
counter may move. docs/benchmarks.md explains the method and the limits.

Why the hit path needs care: with `repeat`, BPF_PROG_TEST_RUN runs the
program again and again on one buffer, so from the second run on the program
sees its own output. A client frame CLIENT:40000 → VIP:3478 leaves as
INT:flowport → OWNER:port. That output is turned into a hit of the same code
path by registering OWNER:port as a VIP and installing the flow
(client INT:flowport, VIP OWNER:port) → same call, same flow port, same
owner: the rewrite then maps the frame onto itself (a fixed point), and
every run walks vips → flows → owners → relay_cfg → fib → rewrite → redirect.
Each forward decrements the TTL, and nothing can raise it again, so one
buffer (TTL 255) gives at most 254 hits: hit figures use repeat=254 per
call, a fresh copy of the frame per call, many calls.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import random
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from manager.lab import xdp_harness as hx
from manager.lab.xdp_harness import (
    CLIENT4,
    CLIENT6,
    INT4,
    MAC,
    TX1_4,
    TX1_6,
    VERDICTS,
    VIP4,
    VIP6,
    VIP_PORT,
    XDP_DROP,
    XDP_PASS,
    XDP_REDIRECT,
)
from manager.relay.kernel import libbpf
from manager.relay.kernel.datapath import OwnerAddr, ensure_kernel_headers, read_counters
from manager.relay.kernel.structs import (
    BPF_TESTING_DIR,
    FlowInfo,
    FlowKey,
    FlowKey4,
    NextHop,
    OwnerInfo,
    ReverseInfo,
    ReverseKey,
    flow_key,
    htons,
    pack_addr4,
    vip_key,
)
from tests.bench.provenance import run_info

# --- what is measured ----------------------------------------------------------------

OWNER = (TX1_4, 5000)            # the call's owner transceiver
HIT_CLIENT = (CLIENT4, 40000)    # the measured client tuple
HIT_CONN = 1
HIT_FLOW_PORT = 20001            # in the harness's flow-port range 20000-29999
RET_CLIENT, RET_FLOW_PORT = (CLIENT4, 40100), 20100  # the return path's flow (owner → client)
HIT6_CLIENT = (CLIENT6, 40000)   # the IPv6 flow
FIXED_FLOWS = 4                  # the client flow, its fixed point, the return and IPv6 flows
TTL_RUNS = 254                   # forwards of one TTL-255 buffer down to TTL 1 (one more leaves with 0)
CAPACITY = 1 << 20               # the production default DatapathConfig.max_flows
OCCUPANCIES = (1_000, 100_000, 1_000_000)
CLOCK_MONOTONIC_COARSE = 6       # Linux's clock id (not in Python's time module): bpf_ktime_get_coarse_ns
FILLER_NET = 0x64400000          # fillers' client addresses: 100.64.0.0/10 (4M addresses)

# An Opus SRTP packet (RTP header, 160 bytes of payload, 10-byte auth tag): the
# program reads only the first payload byte, so the size hardly matters.
RTP = bytes([0x80, 111]) + b"\x00\x01" + b"\x00" * 8 + b"p" * 160 + b"t" * 10
# A STUN binding request with a USERNAME, as a new call's first packet.
STUN = hx.STUN_CHECK

PASS_ONLY_SRC = "int xdp_pass_only(struct xdp_md *ctx) { return XDP_PASS; }"

# Live-frames sink on the relay's internal veth peer: counts what arrives and
# restores the TTL the relay decremented, so a recycled page is again a hit.
# It does the same work on every frame (a TTL of 255 is written back as it
# is), so the instrument costs the relay's row no more than the ceiling's.
SINK_SRC = r"""
#include <linux/if_ether.h>
#include <linux/ip.h>
BPF_PERCPU_ARRAY(sink_count, u64, 1);
int xdp_sink(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    int zero = 0;
    u64 *n = sink_count.lookup(&zero);
    if (n)
        *n += 1;
    struct iphdr *ip = data + sizeof(struct ethhdr);
    if ((void *)(ip + 1) > end)
        return XDP_DROP;
    /* RFC 1624 incremental checksum update for the TTL/protocol word. */
    u16 old = *(u16 *)&ip->ttl;
    ip->ttl = 255;
    u32 sum = (u16)~bpf_ntohs(ip->check) + (u16)~bpf_ntohs(old) + bpf_ntohs(*(u16 *)&ip->ttl);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    ip->check = bpf_htons(~sum & 0xffff);
    return XDP_DROP;
}
"""

XDP_FLAGS_DRV_MODE = 1 << 2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- frames --------------------------------------------------------------------------

def owner_frame(flow_port: int, payload: bytes) -> bytes:
    """The owner's packet to a flow source (the return path)."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    return bytes(Ether(src=MAC["tx1"], dst=MAC["int"]) / IP(src=OWNER[0], dst=INT4, ttl=255)
                 / UDP(sport=OWNER[1], dport=flow_port) / Raw(payload))


def client_frame6(client: tuple[str, int], payload: bytes) -> bytes:
    from scapy.layers.inet import UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    return bytes(Ether(src=MAC["client"], dst=MAC["pub"]) / IPv6(src=client[0], dst=VIP6, hlim=255)
                 / UDP(sport=client[1], dport=VIP_PORT) / Raw(payload))


def client_frame(client: tuple[str, int], payload: bytes, ttl: int = 255) -> bytes:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    return bytes(Ether(src=MAC["client"], dst=MAC["pub"]) / IP(src=client[0], dst=VIP4, ttl=ttl)
                 / UDP(sport=client[1], dport=VIP_PORT) / Raw(payload))


def _csum_diff(old: bytes, new: bytes, order: str = "big") -> int:
    """The unfolded one's complement change of 16-bit words old → new (RFC
    1624), words read in `order`: "little" is how the kernel loads them on
    this machine (bpf/csum.h csum_diff32/16)."""
    s = 0
    for i in range(0, len(old), 2):
        s += (~int.from_bytes(old[i:i + 2], order) & 0xFFFF) + int.from_bytes(new[i:i + 2], order)
    return s


def _fold(acc: int) -> int:
    while acc >> 16:
        acc = (acc & 0xFFFF) + (acc >> 16)
    return acc


def _csum_update(csum: int, old: bytes, new: bytes) -> int:
    """RFC 1624 incremental update of a 16-bit Internet checksum."""
    return ~_fold((~csum & 0xFFFF) + _csum_diff(old, new)) & 0xFFFF


def retuple(frame: bytes, addr: int, port: int) -> bytes:
    """The IPv4/UDP client frame with another source address and port, both
    checksums kept right (cheaper than building thousands of frames in scapy)."""
    f = bytearray(frame)
    old_a, new_a = bytes(f[26:30]), addr.to_bytes(4, "big")
    old_p, new_p = bytes(f[34:36]), port.to_bytes(2, "big")
    f[26:30], f[34:36] = new_a, new_p
    f[24:26] = _csum_update(int.from_bytes(f[24:26], "big"), old_a, new_a).to_bytes(2, "big")
    udp = _csum_update(int.from_bytes(f[40:42], "big"), old_a + old_p, new_a + new_p)
    f[40:42] = (udp or 0xFFFF).to_bytes(2, "big")
    return bytes(f)


def filler(i: int) -> tuple[int, int, int, int]:
    """Filler flow i: (client address as int, client port, connection id, flow port)."""
    return FILLER_NET + i, 1024 + (i * 7919) % 64000, HIT_CONN + 1 + i, 20000 + i % 10000


def filler_slot(i: int) -> int:
    """Filler flow i's call's slot in the owners array: after the one the
    measured call took (slot 0; the Datapath's index is rebuilt after)."""
    return 1 + i


def filler_source(i: int) -> tuple[int, int]:
    """Filler flow i's flow source and owner port: (pool address index, owner
    port). With the harness's 10,000 flow ports and 3 pool addresses, each
    owner port takes 30,000 flows, so every return key is distinct."""
    return (i // 10_000) % hx.POOL_COUNT, OWNER[1] + 1 + i // 30_000


def filler_ssrc(i: int) -> bytes:
    """Filler flow i's SSRC as in its packets (learned: the flow is established)."""
    return (0x40000000 + i).to_bytes(4, "big")


# --- map filling (batched: one syscall per 64k entries) ---------------------------------

_FLOW_KEY = struct.Struct("!BxHH2x4s12x4s12x")  # struct flow_key, IPv4 (return entries, the SSRC index)
_FLOW_KEY4 = struct.Struct("!4s4sHH")            # struct flow_key4 (the flows4 map)
_FLOW_INFO = struct.Struct("<I2sHQQQQ4sI40s32x") # struct flow_info (rtp: 0)
_OWNER_INFO = struct.Struct("<4s2s2x16xII")     # struct owner_info, IPv4 only
_REV_KEY = struct.Struct("<Bx2s2sH4s12x")       # struct reverse_key, IPv4
_REV_INFO = struct.Struct("<40sIIQQQ40x32x")    # struct reverse_info (nh, rtp: 0)
assert _FLOW_KEY.size == ctypes.sizeof(FlowKey) and _FLOW_INFO.size == ctypes.sizeof(FlowInfo)
assert _FLOW_KEY4.size == ctypes.sizeof(FlowKey4)
assert _OWNER_INFO.size == ctypes.sizeof(OwnerInfo)
assert _REV_KEY.size == ctypes.sizeof(ReverseKey) and _REV_INFO.size == ctypes.sizeof(ReverseInfo)
CHUNK = 65536


def _lib() -> ctypes.CDLL:
    lib = libbpf.lib()
    vp, u32p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)
    lib.bpf_map_update_batch.argtypes = [ctypes.c_int, vp, vp, u32p, vp]
    return lib


def update_batch(fd: int, keys: bytearray, values: bytearray, ksize: int, vsize: int) -> None:
    lib = _lib()
    n = len(keys) // ksize
    kbuf = (ctypes.c_char * len(keys)).from_buffer(keys)
    vbuf = (ctypes.c_char * len(values)).from_buffer(values)
    opts = libbpf.BatchOpts(sz=ctypes.sizeof(libbpf.BatchOpts))
    done = 0
    while done < n:
        count = ctypes.c_uint32(min(CHUNK, n - done))
        rc = lib.bpf_map_update_batch(fd, ctypes.addressof(kbuf) + done * ksize,
                                      ctypes.addressof(vbuf) + done * vsize, ctypes.byref(count), ctypes.byref(opts))
        libbpf._check(rc, "bpf_map_update_batch")
        done += count.value


def fillers_forwarded(m: libbpf.PinnedMap) -> int:
    """Filler flows (client address in FILLER_NET) whose packet counter moved,
    read from the flows4 map."""
    ksize, vsize = ctypes.sizeof(FlowKey4), ctypes.sizeof(FlowInfo)
    pkts_at = FlowInfo.packets.offset
    addr_at = FlowKey4.client_addr.offset
    n = 0
    for keys, vals, count in m.raw_batches():
        for j in range(count):
            addr = int.from_bytes(keys[j * ksize + addr_at:j * ksize + addr_at + 4], "big")
            if addr & 0xFFC00000 == FILLER_NET and int.from_bytes(vals[j * vsize + pkts_at:j * vsize + pkts_at + 8],
                                                                  "little"):
                n += 1
    return n


# A TTL above 1 losing one changes the TTL/protocol word by the same amount
# whatever it is (bpf/relay.bpf.c csum_deltas): 64 stands for any.
_TTL_STEP = _csum_diff(bytes([64, 17]), bytes([63, 17]), "little")


def filler_nh(template: bytes, i: int) -> bytes:
    """Filler flow i's route cache as XDP would make it under epoch 1: the
    template's route (egress, MACs, lifetime), the filler's owner endpoint,
    and the checksum changes of its own rewrite (client:port → VIP:port
    becomes flow source → owner:port)."""
    addr, port, _, fport = filler(i)
    faddr, oport = filler_source(i)
    src = (_POOL0 + faddr).to_bytes(4, "big")
    l3 = _csum_diff(addr.to_bytes(4, "big") + _VIP4_RAW, src + _OWNER_RAW, "little")
    l4 = l3 + _csum_diff(struct.pack("!HH", port, VIP_PORT), struct.pack("!HH", fport, oport), "little")
    nh = NextHop.from_buffer_copy(template)
    nh.epoch, nh.csum_l3, nh.csum_l4 = 1, _fold(l3 + _TTL_STEP), _fold(l4)
    nh.dst4, nh.dport = pack_addr4(OWNER[0]), htons(oport)
    return bytes(nh)


_VIP4_RAW = bytes(map(int, VIP4.split(".")))
_OWNER_RAW = bytes(map(int, OWNER[0].split(".")))
_POOL0 = int.from_bytes(bytes(map(int, INT4.split("."))), "big")  # the harness pool's first address


def add_fillers(dp, start: int, end: int, nh: bytes = bytes(ctypes.sizeof(NextHop))) -> None:
    """Install filler flows [start, end) as a full relay holds established
    flows: distinct client tuples, each its own call (connection id) with its
    owners entry (its slot at epoch 1), its return entry, its learned SSRC in
    the ssrcs index and a route cache towards its owner (filler_nh of the
    template `nh`; a zero template: none)."""
    n = end - start
    if n <= 0:
        return
    vip, owner_addr = _VIP4_RAW, _OWNER_RAW
    now = time.monotonic_ns()
    cached = any(nh)
    fkeys, fvals = bytearray(n * _FLOW_KEY.size), bytearray(n * _FLOW_INFO.size)
    f4keys = bytearray(n * _FLOW_KEY4.size)
    okeys, ovals = bytearray(n * 4), bytearray(n * _OWNER_INFO.size)
    evals = bytearray(struct.pack("<I", 1) * n)
    rkeys, rvals = bytearray(n * _REV_KEY.size), bytearray(n * _REV_INFO.size)
    skeys = bytearray(n * 4)
    for j in range(n):
        i = start + j
        addr, port, conn, fport = filler(i)
        faddr, oport = filler_source(i)
        ssrc, fp, op = filler_ssrc(i), fport.to_bytes(2, "big"), oport.to_bytes(2, "big")
        _FLOW_KEY.pack_into(fkeys, j * _FLOW_KEY.size, 2, port, VIP_PORT, addr.to_bytes(4, "big"), vip)
        _FLOW_KEY4.pack_into(f4keys, j * _FLOW_KEY4.size, addr.to_bytes(4, "big"), vip, port, VIP_PORT)
        slot = filler_slot(i)
        _FLOW_INFO.pack_into(fvals, j * _FLOW_INFO.size, conn, fp, faddr, 0, 0, now, now, ssrc, slot,
                             filler_nh(nh, i) if cached else nh)
        struct.pack_into("<I", okeys, j * 4, slot)
        _OWNER_INFO.pack_into(ovals, j * _OWNER_INFO.size, owner_addr, op, 1, conn)
        _REV_KEY.pack_into(rkeys, j * _REV_KEY.size, 2, op, fp, faddr, owner_addr)
        _REV_INFO.pack_into(rvals, j * _REV_INFO.size,
                            fkeys[j * _FLOW_KEY.size:(j + 1) * _FLOW_KEY.size], conn, slot, 0, 0, now)
        skeys[j * 4:(j + 1) * 4] = ssrc
    update_batch(dp.maps.owners.fd, okeys, ovals, 4, _OWNER_INFO.size)
    update_batch(dp.maps.epochs.fd, okeys, evals, 4, 4)
    update_batch(dp.maps.reverse.fd, rkeys, rvals, _REV_KEY.size, _REV_INFO.size)
    update_batch(dp.maps.ssrcs.fd, skeys, fkeys, 4, _FLOW_KEY.size)
    update_batch(dp.maps.flows4.fd, f4keys, fvals, _FLOW_KEY4.size, _FLOW_INFO.size)


# --- the bench environment -------------------------------------------------------------

@dataclass
class Bench:
    h: hx.Harness
    progs: dict[str, int]           # name → prog fd: relay and the ceilings
    fillers: int = 0                # filler flows installed so far
    nh: bytes = bytes(ctypes.sizeof(NextHop))  # the measured flow's route cache: the fillers' template
    sink: object | None = None      # bcc object of the live-frames sink, once loaded
    bcc: list = field(default_factory=list)

    @property
    def dp(self):
        return self.h.dp

    @property
    def occupancy(self) -> int:
        return self.fillers + FIXED_FLOWS


def _attach(b: Bench, ifname: str, fd: int) -> None:
    from bcc.libbcc import lib as bcclib

    rc = b.h.ex.call(bcclib.bpf_attach_xdp, ifname.encode(), fd, XDP_FLAGS_DRV_MODE)
    if rc < 0:
        raise RuntimeError(f"cannot attach XDP to {ifname} in {b.h.ns}: {rc}")


def setup(capacity: int = CAPACITY) -> Bench:
    """Harness namespace + the relay program (maps sized `capacity`), the
    ceiling programs, and the measured flow with its fixed point."""
    log(f"bench: building namespace and loading the relay program (map capacity {capacity})")
    h = hx.build(max_flows=capacity)
    b = Bench(h=h, progs={"relay": h.dp.prog_fd})
    try:
        ensure_kernel_headers()
        from bcc import BPF

        redir = BPF(src_file=str(BPF_TESTING_DIR / "redirect_only.bpf.c").encode(),
                    cflags=[f"-DIFINDEX={h.ifindex['int']}", f"-DFIB_SRC={pack_addr4(INT4)}U",
                            f"-DFIB_DST={pack_addr4(OWNER[0])}U"])
        passo = BPF(text=PASS_ONLY_SRC.encode())
        lookup = BPF(src_file=str(BPF_TESTING_DIR / "lookup_only.bpf.c").encode(), cflags=h.dp.cflags())
        b.bcc += [redir, passo, lookup]
        b.progs["lookup_only"] = lookup.load_func(b"xdp_lookup_only", BPF.XDP).fd
        b.progs["lookup_redirect"] = lookup.load_func(b"xdp_lookup_redirect", BPF.XDP).fd
        b.progs["redirect_only"] = redir.load_func(b"xdp_redirect_only", BPF.XDP).fd
        b.progs["fib_redirect"] = redir.load_func(b"xdp_fib_redirect", BPF.XDP).fd
        b.progs["pass_only"] = passo.load_func(b"xdp_pass_only", BPF.XDP).fd
        # BPF_PROG_TEST_RUN with repeat > 1 swaps the program into the kernel's
        # XDP dispatcher for the call and out again, which costs one RCU grace
        # period (~17 ms here) per call. A program attached in native mode stays
        # in the dispatcher, so calls are cheap (and repeat=1 runs get the same
        # direct call a driver makes). The veths stay down: no traffic reaches them.
        for i, name in enumerate(b.progs):
            dev = f"disp{i}"
            subprocess.run(["ip", "-n", h.ns, "link", "add", dev, "type", "veth", "peer", f"{dev}p"],
                           check=True, capture_output=True)
            _attach(b, dev, b.progs[name])
        dp = h.dp
        dp.set_owner(HIT_CONN, OwnerAddr(addr4=OWNER[0], port4=OWNER[1], addr6=TX1_6, port6=OWNER[1]))
        dp.add_flow(HIT_CLIENT, (VIP4, VIP_PORT), HIT_CONN, HIT_FLOW_PORT)
        dp.add_flow(RET_CLIENT, (VIP4, VIP_PORT), HIT_CONN, RET_FLOW_PORT)
        dp.add_flow(HIT6_CLIENT, (VIP6, VIP_PORT), HIT_CONN, HIT_FLOW_PORT)
        # The fixed point: the rewritten frame (INT:flowport → OWNER) is a client frame again.
        dp.maps.vips.update(vip_key(OWNER), ctypes.c_uint32(1))
        dp.add_flow((INT4, HIT_FLOW_PORT), OWNER, HIT_CONN, HIT_FLOW_PORT)
        if dp.slot_of(HIT_CONN) != 0:  # fillers take the slots after it (filler_slot)
            raise RuntimeError(f"the measured call took owner slot {dp.slot_of(HIT_CONN)}, not 0")
        b.nh = cached_route(b)
        return b
    except BaseException:
        teardown(b)
        raise


def teardown(b: Bench) -> None:
    for obj in b.bcc:
        with contextlib.suppress(Exception):  # best effort: the namespace goes anyway
            obj.cleanup()
    hx.teardown(b.h)


def cached_route(b: Bench) -> bytes:
    """The route cache XDP wrote for the measured flow (egress ifindex and
    MACs towards OWNER), valid for an hour: the fillers' template (filler_nh
    gives each its owner port and checksum changes). Fillers are established
    flows with traffic, whose cache XDP keeps fresh with one fib lookup a
    second. That refresh is the "fib lookup + redirect" row, paid once a
    second per flow; the random-flow rows measure the packets between."""
    verdict, _, _ = b.h.run(client_frame(HIT_CLIENT, RTP))
    if verdict != XDP_REDIRECT:
        raise RuntimeError(f"the measured flow did not forward (verdict {VERDICTS.get(verdict, verdict)})")
    info = b.dp.maps.flows.lookup(flow_key(HIT_CLIENT, (VIP4, VIP_PORT)))
    nh = NextHop.from_buffer_copy(bytes(info.nh))
    if not nh.ifindex or nh.epoch != b.dp.epoch_of(HIT_CONN) or not nh.dport:
        raise RuntimeError("XDP left no route cache (made under the call's epoch) on the measured flow")
    nh.until_ns = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE) + 3600 * 10**9
    return bytes(nh)


def grow(b: Bench, occupancy: int) -> int:
    """Add fillers until the flows map holds `occupancy` entries; returns the
    count read back from the map."""
    target = occupancy - FIXED_FLOWS
    step = 250_000
    t0 = time.monotonic()
    while b.fillers < target:
        end = min(target, b.fillers + step)
        add_fillers(b.dp, b.fillers, end, b.nh)
        b.fillers = end
        log(f"bench: {b.occupancy:>9,} flows installed ({time.monotonic() - t0:.1f} s)")
    b.dp.rebuild_slots()  # the fillers' calls hold their slots in the Datapath's index too
    return len(b.dp.maps.flows)


# --- running the program ------------------------------------------------------------------

def _runner(prog_fd: int, frames: list[bytes], ifindex: int, repeat: int, calls: int,
            start: int = 0) -> tuple[list[int], set[int]]:
    """BPF_PROG_TEST_RUN `calls` times (cycling through `frames` from index
    `start`, all the same length), `repeat` runs each; returns the kernel's ns per run of each call
    and the verdicts seen. Runs on the namespace thread: the ingress ifindex and
    the program's fib lookups resolve in the calling thread's namespace."""
    lib = libbpf.lib()
    flen = len(frames[0])
    data = ctypes.create_string_buffer(b"".join(frames), flen * len(frames))
    base = ctypes.addressof(data)
    cap = flen + 512
    out = ctypes.create_string_buffer(cap)
    ctx = libbpf.XdpMd(data=0, data_end=flen, ingress_ifindex=ifindex)
    opts = libbpf.TestRunOpts(sz=ctypes.sizeof(libbpf.TestRunOpts), data_out=ctypes.addressof(out),
                              data_size_in=flen, ctx_in=ctypes.addressof(ctx), ctx_size_in=ctypes.sizeof(ctx),
                              repeat=repeat)
    ref, run = ctypes.byref(opts), lib.bpf_prog_test_run_opts
    durations, verdicts = [], set()
    for i in range(calls):
        opts.data_in = base + ((start + i) % len(frames)) * flen
        opts.data_size_out = cap
        libbpf._check(run(prog_fd, ref), "BPF_PROG_TEST_RUN")
        durations.append(opts.duration)
        verdicts.add(opts.retval)
    return durations, verdicts


@dataclass
class Measurement:
    case: str
    program: str
    flows: int | None           # entries in the flows map (relay only)
    repeat: int                 # runs per BPF_PROG_TEST_RUN call
    calls: int                  # calls per sample
    ns: float                   # median over samples of the mean ns/run
    samples: list[float]
    packets: int                # runs measured, all samples
    verdict: str
    expected: str
    stat: str | None = None     # relay counter that must rise by `packets`
    counted: int | None = None  # how much it rose
    others: dict[str, int] = field(default_factory=dict)  # counters that moved but should not have

    @property
    def ok(self) -> bool:
        counted_ok = self.stat is None or (self.counted == self.packets and not self.others)
        return self.verdict == self.expected and counted_ok


@dataclass
class Case:
    """One figure to measure: a program on some frames, run `repeat` times per call."""

    case: str
    program: str
    frames: list[bytes]
    repeat: int
    calls: int                  # calls per sample
    expected: int               # XDP verdict every run must return
    stat: str | None = None     # relay counter that must rise by one per run
    ingress: str = "pub"        # the harness interface the frames arrive on
    rotate: bool = False        # each round goes on where the last stopped (all frames get used)


def measure(b: Bench, cases: list[Case], samples: int, flows: int) -> list[Measurement]:
    """Sample every case once per round, `samples` rounds: whatever else the
    machine does then spreads over all cases alike, and ratios can be taken
    within a round. Each sample is the mean ns/run of its calls; the figure is
    the median sample. Counters are read around every sample, so each case
    accounts for exactly its own runs."""
    for c in cases:  # warm up (caches, page tables), not measured or checked
        b.h.ex.call(_runner, b.progs[c.program], c.frames[:1], b.h.ifindex[c.ingress], min(c.repeat, TTL_RUNS), 1)
    means: list[list[float]] = [[] for _ in cases]
    verdicts: list[set[int]] = [set() for _ in cases]
    moved: list[dict[str, int]] = [{} for _ in cases]
    for rnd in range(samples):
        for i, c in enumerate(cases):
            before = read_counters(b.dp.maps)
            durs, v = b.h.ex.call(_runner, b.progs[c.program], c.frames, b.h.ifindex[c.ingress], c.repeat, c.calls,
                                  rnd * c.calls if c.rotate else 0)
            after = read_counters(b.dp.maps)
            means[i].append(statistics.fmean(durs))
            verdicts[i] |= v
            for k in after:
                if after[k][0] != before[k][0]:
                    moved[i][k] = moved[i].get(k, 0) + after[k][0] - before[k][0]
    res = []
    for c, mean, v, mv in zip(cases, means, verdicts, moved, strict=False):
        m = Measurement(case=c.case, program=c.program, flows=flows if c.program == "relay" else None,
                        repeat=c.repeat, calls=c.calls, ns=round(statistics.median(mean), 2),
                        samples=[round(x, 2) for x in mean], packets=c.repeat * c.calls * samples,
                        verdict="/".join(VERDICTS.get(x, str(x)) for x in sorted(v)), expected=VERDICTS[c.expected])
        if c.program == "relay":
            m.stat, m.counted = c.stat, mv.pop(c.stat, 0)
        m.others = mv  # for a ceiling program: the relay's counters must not move at all
        res.append(m)
        log(f"bench: {flows:>9,} flows  {m.case:<30} {m.program:<13} repeat={m.repeat:<8} {m.ns:8.1f} ns/pkt  "
            f"{m.verdict}{'' if m.ok else '  CHECK FAILED'}")
    return res


@dataclass
class Plan:
    repeat: int = 1_000_000     # runs per call where the buffer does not change
    samples: int = 7
    fresh_calls: int = 20_000   # repeat=1 calls per sample (fresh frame per run)
    spread_frames: int = 262_144  # distinct random flows cycled through in the spread case

    @property
    def hit_calls(self) -> int:
        return max(1, self.repeat // TTL_RUNS)


def bench_occupancy(b: Bench, plan: Plan, flows: int) -> list[Measurement]:
    """Every case at the current map occupancy (`flows` entries)."""
    hit = client_frame(HIT_CLIENT, RTP)
    stun_miss = client_frame((CLIENT4, 41000), STUN)
    other_miss = client_frame((CLIENT4, 41000), RTP)
    rng = random.Random(flows)
    # Distinct fillers in random order; rounds go on through them, so at a
    # large occupancy no flow comes back before the others were visited.
    picks = rng.sample(range(b.fillers), min(plan.spread_frames, b.fillers))
    spread = [retuple(hit, *filler(i)[:2]) for i in picks] or [hit]
    # The floor's own random order: not the flows the relay's row has just warmed.
    others = rng.sample(range(b.fillers), min(plan.spread_frames, b.fillers))
    spread_floor = [retuple(hit, *filler(i)[:2]) for i in others] or [hit]
    n, long, fresh = plan.hit_calls, plan.repeat, plan.fresh_calls
    cases = [
        # Same method for all: a fresh copy of the frame per call, TTL_RUNS runs on it.
        Case("hit → REDIRECT", "relay", [hit], TTL_RUNS, n, XDP_REDIRECT, "fwd_in_rtp"),
        Case("miss STUN → PASS", "relay", [stun_miss], TTL_RUNS, n, XDP_PASS, "pass_stun_unknown"),
        Case("miss other → DROP", "relay", [other_miss], TTL_RUNS, n, XDP_DROP, "drop_unknown_not_stun"),
        Case("redirect only", "redirect_only", [hit], TTL_RUNS, n, XDP_REDIRECT),
        Case("fib lookup + redirect", "fib_redirect", [hit], TTL_RUNS, n, XDP_REDIRECT),
        Case("pass only", "pass_only", [hit], TTL_RUNS, n, XDP_PASS),
        # Long runs on one buffer, valid where the program leaves the frame alone.
        Case("miss STUN → PASS", "relay", [stun_miss], long, 1, XDP_PASS, "pass_stun_unknown"),
        Case("miss other → DROP", "relay", [other_miss], long, 1, XDP_DROP, "drop_unknown_not_stun"),
        Case("redirect only", "redirect_only", [hit], long, 1, XDP_REDIRECT),
        Case("fib lookup + redirect", "fib_redirect", [hit], long, 1, XDP_REDIRECT),
        Case("pass only", "pass_only", [hit], long, 1, XDP_PASS),
        # One run per call on a fresh frame: the real client frame every time,
        # and a different random flow every time (its map entries not in cache).
        Case("hit → REDIRECT, one flow", "relay", [hit], 1, fresh, XDP_REDIRECT, "fwd_in_rtp"),
        Case("hit → REDIRECT, random flows", "relay", spread, 1, fresh, XDP_REDIRECT, "fwd_in_rtp", rotate=True),
        Case("flows4 lookup only, one flow", "lookup_only", [hit], 1, fresh, XDP_PASS),
        Case("flows4 lookup only, random flows", "lookup_only", spread_floor, 1, fresh, XDP_PASS, rotate=True),
        Case("return hit → REDIRECT, one flow", "relay", [owner_frame(RET_FLOW_PORT, RTP)], 1, fresh, XDP_REDIRECT,
             "fwd_out_rtp", ingress="int"),
        Case("IPv6 hit → REDIRECT, one flow", "relay", [client_frame6(HIT6_CLIENT, RTP)], 1, fresh, XDP_REDIRECT,
             "fwd_in_rtp"),
        Case("pass only", "pass_only", [hit], 1, fresh, XDP_PASS),
    ]
    return measure(b, cases, plan.samples, flows)


# --- live frames (optional) ----------------------------------------------------------------

@dataclass
class LiveResult:
    program: str
    packets: int                # frames injected
    delivered: int              # counted by the sink on the far end
    forwarded: int | None       # relay's fwd_in_rtp counter rise
    wall_s: float
    mpps: float                 # delivered / wall time
    kernel_ns: int              # BPF_PROG_TEST_RUN's own ns per frame
    others: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        fwd_ok = self.forwarded is None or (self.forwarded == self.packets and not self.others)
        return self.delivered == self.packets and fwd_ok


def bench_live(b: Bench, packets: int) -> list[LiveResult]:
    """Inject `packets` frames with BPF_F_TEST_XDP_LIVE_FRAMES (the redirect is
    really carried out) and count them with an XDP program on the far veth."""
    from bcc import BPF

    if b.sink is None:
        b.sink = BPF(text=SINK_SRC.encode())
        b.bcc.append(b.sink)
        _attach(b, "intp", b.sink.load_func(b"xdp_sink", BPF.XDP).fd)
    table = b.sink[b"sink_count"]
    frame = client_frame(HIT_CLIENT, RTP)
    res = []
    for program in ("relay", "lookup_redirect", "redirect_only"):
        before_sink, before = table.sum(0).value, read_counters(b.dp.maps)
        t0 = time.perf_counter()
        _, _, ns = b.h.ex.call(libbpf.prog_test_run_xdp, b.progs[program], frame, ingress_ifindex=b.h.ifindex["pub"],
                               repeat=packets, flags=libbpf.BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=64)
        wall = time.perf_counter() - t0
        time.sleep(0.05)  # let the veth's NAPI drain what is still queued (a count, whatever it reaches)
        delivered = table.sum(0).value - before_sink
        after = read_counters(b.dp.maps)
        moved = {k: after[k][0] - before[k][0] for k in after if after[k][0] != before[k][0]}
        fwd = moved.pop("fwd_in_rtp", 0) if program == "relay" else None
        r = LiveResult(program=program, packets=packets, delivered=delivered, forwarded=fwd, wall_s=round(wall, 4),
                       mpps=round(delivered / wall / 1e6, 3), kernel_ns=ns, others=moved)
        res.append(r)
        log(f"bench: live frames {program:<13} {r.mpps:.2f} Mpps delivered {delivered}/{packets}"
            f"{'' if r.ok else '  CHECK FAILED'}")
    return res


# --- report -------------------------------------------------------------------------------------

def machine() -> dict:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/sys/net/core/bpf_jit_enable") as f:
        jit = f.read().strip()
    return {"kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(), "bpf_jit_enable": jit}


ROWS = [  # (label, case, program, repeat selector)
    ("relay hit → REDIRECT", "hit → REDIRECT", "relay", "ttl"),
    ("relay miss STUN → PASS", "miss STUN → PASS", "relay", "ttl"),
    ("relay miss other → DROP", "miss other → DROP", "relay", "ttl"),
    ("redirect-only program", "redirect only", "redirect_only", "ttl"),
    ("fib lookup + redirect program", "fib lookup + redirect", "fib_redirect", "ttl"),
    ("XDP_PASS-only program", "pass only", "pass_only", "ttl"),
    ("relay miss STUN → PASS", "miss STUN → PASS", "relay", "long"),
    ("relay miss other → DROP", "miss other → DROP", "relay", "long"),
    ("redirect-only program", "redirect only", "redirect_only", "long"),
    ("fib lookup + redirect program", "fib lookup + redirect", "fib_redirect", "long"),
    ("XDP_PASS-only program", "pass only", "pass_only", "long"),
    ("relay hit, one flow", "hit → REDIRECT, one flow", "relay", "one"),
    ("relay hit, random flows", "hit → REDIRECT, random flows", "relay", "one"),
    ("flows4 lookup alone, one flow", "flows4 lookup only, one flow", "lookup_only", "one"),
    ("flows4 lookup alone, random flows", "flows4 lookup only, random flows", "lookup_only", "one"),
    ("relay return hit (owner → client), one flow", "return hit → REDIRECT, one flow", "relay", "one"),
    ("relay IPv6 hit, one flow", "IPv6 hit → REDIRECT, one flow", "relay", "one"),
    ("XDP_PASS-only program", "pass only", "pass_only", "one"),
]


def _find(results: list[Measurement], case: str, program: str, sel: str, plan: Plan) -> Measurement:
    repeat = {"ttl": TTL_RUNS, "long": plan.repeat, "one": 1}[sel]
    for m in results:
        if m.case == case and m.program == program and m.repeat == repeat:
            return m
    raise KeyError((case, program, sel))


def summarize(by_flows: dict[int, list[Measurement]], plan: Plan) -> dict:
    """Ratios and differences taken within each round (cases were sampled
    back to back), then the median over rounds. repeat=1 figures are corrected
    by the XDP_PASS-only program's own repeat=1 excess over its long run (the
    timer read and the cold call that every repeat=1 run pays)."""
    out = {}
    for flows, ms in by_flows.items():
        def per_round(case: str, prog: str, sel: str) -> list[float]:
            return _find(ms, case, prog, sel, plan).samples  # noqa: B023 - used right away

        hit = per_round("hit → REDIRECT", "relay", "ttl")
        redir = per_round("redirect only", "redirect_only", "ttl")
        fib = per_round("fib lookup + redirect", "fib_redirect", "ttl")
        excess = [a - b for a, b in zip(per_round("pass only", "pass_only", "one"),
                                        per_round("pass only", "pass_only", "long"), strict=False)]
        one = per_round("hit → REDIRECT, one flow", "relay", "one")
        spread = per_round("hit → REDIRECT, random flows", "relay", "one")
        floor_one = per_round("flows4 lookup only, one flow", "lookup_only", "one")
        floor = per_round("flows4 lookup only, random flows", "lookup_only", "one")
        ret = per_round("return hit → REDIRECT, one flow", "relay", "one")
        six = per_round("IPv6 hit → REDIRECT, one flow", "relay", "one")

        def med(xs) -> float:
            return round(statistics.median(xs), 2)

        out[flows] = {
            "hit_over_redirect_only": med([h / r for h, r in zip(hit, redir, strict=False)]),
            "hit_minus_redirect_only_ns": med([h - r for h, r in zip(hit, redir, strict=False)]),
            "hit_minus_fib_redirect_ns": med([h - f for h, f in zip(hit, fib, strict=False)]),
            "repeat1_excess_ns": med(excess),
            "hit_one_flow_corrected_ns": med([h - e for h, e in zip(one, excess, strict=False)]),
            "hit_random_flows_corrected_ns": med([h - e for h, e in zip(spread, excess, strict=False)]),
            "lookup_one_flow_corrected_ns": med([h - e for h, e in zip(floor_one, excess, strict=False)]),
            "lookup_random_flows_corrected_ns": med([h - e for h, e in zip(floor, excess, strict=False)]),
            "return_one_flow_corrected_ns": med([h - e for h, e in zip(ret, excess, strict=False)]),
            "ipv6_one_flow_corrected_ns": med([h - e for h, e in zip(six, excess, strict=False)]),
        }
    return out


def table(by_flows: dict[int, list[Measurement]], summary: dict, plan: Plan, live: list[LiveResult],
          capacity: int) -> str:
    cols = list(by_flows)
    w = 10
    head = f"{'ns/packet (median of ' + str(plan.samples) + ' samples)':<46}{'runs/call':>10}" + "".join(
        f"{f'{c:,}':>{w}}" for c in cols)
    lines = [f"flows in the map (capacity {capacity:,}) →", head, "-" * len(head)]
    sels = {"ttl": f"{TTL_RUNS}", "long": f"{plan.repeat:,}", "one": "1"}
    last = None
    for label, case, prog, sel in ROWS:
        if last and sel != last:
            lines.append("")
        last = sel
        vals = "".join(f"{_find(by_flows[c], case, prog, sel, plan).ns:>{w}.1f}" for c in cols)
        lines.append(f"{label:<46}{sels[sel]:>10}{vals}")
    lines.append("")
    lines.append("per round, then median over rounds:")
    for key, label in (("hit_over_redirect_only", "hit / redirect-only (254/call)"),
                       ("hit_minus_redirect_only_ns", "hit − redirect-only, ns"),
                       ("hit_minus_fib_redirect_ns", "hit − (fib lookup + redirect), ns"),
                       ("hit_one_flow_corrected_ns", "hit, one flow, repeat=1 corrected, ns"),
                       ("hit_random_flows_corrected_ns", "hit, random flows, repeat=1 corrected, ns"),
                       ("lookup_one_flow_corrected_ns", "flows4 lookup alone, one flow, corrected, ns"),
                       ("lookup_random_flows_corrected_ns", "flows4 lookup alone, random flows, corrected, ns"),
                       ("return_one_flow_corrected_ns", "return hit, one flow, repeat=1 corrected, ns"),
                       ("ipv6_one_flow_corrected_ns", "IPv6 hit, one flow, repeat=1 corrected, ns")):
        fmt = ".2f" if key.endswith("redirect_only") and "minus" not in key else ".1f"
        lines.append(f"{label:<56}" + "".join(f"{summary[c][key]:>{w}{fmt}}" for c in cols))
    if len(cols) > 1:
        hi, lo = summary[cols[-1]], summary[cols[0]]
        key = "hit_random_flows_corrected_ns"
        lines.append(f"random-flow cost, {cols[-1]:,} flows / {cols[0]:,} flows: {hi[key] / lo[key]:.2f}x")
        floor = "lookup_random_flows_corrected_ns"
        lines.append(f"  the flows4 lookup alone (the floor of any per-flow hash entry): {hi[floor] / lo[floor]:.2f}x; "
                     f"the relay's cost over it: {hi[key] - hi[floor]:.1f} ns at {cols[-1]:,}, "
                     f"{lo[key] - lo[floor]:.1f} ns at {cols[0]:,}")
    checks = [m for ms in by_flows.values() for m in ms]
    bad = [m for m in checks if not m.ok]
    relay = [m for m in checks if m.program == "relay"]
    lines.append("")
    lines.append(f"counters: {len(relay)} relay measurements, "
                 f"{sum(m.packets for m in relay):,} runs; expected counter rose by exactly the runs measured "
                 f"and nothing else moved in {sum(m.ok for m in relay)}/{len(relay)}")
    for m in bad:
        lines.append(f"  CHECK FAILED: {m.case} ({m.program}, {m.flows} flows): verdict {m.verdict}, "
                     f"{m.stat} +{m.counted} of {m.packets}, others {m.others}")
    for r in live:
        fwd = f", relay fwd_in_rtp +{r.forwarded:,}" if r.forwarded is not None else ""
        lines.append(f"live frames, {r.program:<13}: {r.mpps:.2f} Mpps ({r.delivered:,}/{r.packets:,} counted at the "
                     f"far end{fwd}; {r.kernel_ns} ns/frame by the kernel's timer){'' if r.ok else '  CHECK FAILED'}")
    return "\n".join(lines)


@dataclass
class EveryFlow:
    """Every filler flow forwarded once: the map holds `flows` established
    flows and XDP forwards each of them."""

    flows: int
    runs: int = 0
    verdicts: str = ""
    moved: dict = field(default_factory=dict)   # relay counters that rose, by name
    forwarded: int = 0                          # fillers whose packet counter moved
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.verdicts == "REDIRECT" and self.moved == {"fwd_in_rtp": self.runs}
                and self.runs == self.flows == self.forwarded)


def forward_every_filler(b: Bench) -> EveryFlow:
    """One frame from each filler's tuple through the relay program
    (BPF_PROG_TEST_RUN, 64k frames per batch); then the counters and every
    filler's own packet counter tell that each one was forwarded."""
    res = EveryFlow(flows=b.fillers)
    hit = client_frame(HIT_CLIENT, RTP)
    before, t0, seen = read_counters(b.dp.maps), time.monotonic(), set()
    for start in range(0, b.fillers, CHUNK):
        frames = [retuple(hit, *filler(i)[:2]) for i in range(start, min(b.fillers, start + CHUNK))]
        _, v = b.h.ex.call(_runner, b.progs["relay"], frames, b.h.ifindex["pub"], 1, len(frames))
        seen |= v
        res.runs += len(frames)
        log(f"bench: forwarded a frame of {res.runs:,}/{b.fillers:,} filler flows")
    after = read_counters(b.dp.maps)
    res.seconds = round(time.monotonic() - t0, 1)
    res.verdicts = "/".join(VERDICTS.get(x, str(x)) for x in sorted(seen))
    res.moved = {k: after[k][0] - before[k][0] for k in after if after[k][0] != before[k][0]}
    res.forwarded = fillers_forwarded(b.dp.maps.flows4)
    return res


# Maps a client flow occupies: its flow, its return entry, its SSRC index
# entry; and, per call, the owner entry and the live ufrag. The bench's worst
# case is one flow per call.
FLOW_MAPS = ("flows4", "reverse", "ssrcs")  # an IPv4 flow (an IPv6 one: flows6)
CALL_MAPS = ("owners", "epochs", "live_ufrags")


def map_memory(b: Bench) -> dict:
    """Kernel memory of the per-flow and per-call maps, as the kernel reports
    it (bpftool's bytes_memlock: the map's own accounting, which for these
    preallocated maps is their full capacity), and the bytes per entry."""
    out = {}
    for name in FLOW_MAPS + CALL_MAPS:
        info = json.loads(subprocess.run(["bpftool", "-j", "map", "show", "pinned", f"{b.dp.cfg.pin_dir}/{name}"],
                                         check=True, capture_output=True, text=True).stdout)
        out[name] = {"type": info["type"], "max_entries": info["max_entries"], "bytes": info["bytes_memlock"],
                     "bytes_per_entry": round(info["bytes_memlock"] / info["max_entries"], 1)}
    per_flow = sum(out[n]["bytes_per_entry"] for n in FLOW_MAPS)
    per_call = sum(out[n]["bytes_per_entry"] for n in CALL_MAPS)
    return {"maps": out, "bytes_per_flow": per_flow, "bytes_per_call": per_call,
            "bytes_per_flow_one_flow_calls": per_flow + per_call}


def every_line(e: EveryFlow) -> str:
    return (f"every flow: {e.forwarded:,} of {e.flows:,} filler flows forwarded a frame ({e.runs:,} runs, "
            f"verdicts {e.verdicts}, counters {e.moved}; {e.seconds} s){'' if e.ok else '  CHECK FAILED'}")


def memory_lines(mem: dict) -> list[str]:
    maps = ", ".join(f"{n} {m['bytes_per_entry']:.0f}" for n, m in mem["maps"].items())
    return [f"memory (kernel's accounting, bytes per entry): {maps}",
            f"memory per flow: {mem['bytes_per_flow']:.0f} B, per call {mem['bytes_per_call']:.0f} B; "
            f"one flow per call: {mem['bytes_per_flow_one_flow_calls']:.0f} B "
            f"({mem['bytes_per_flow_one_flow_calls'] * 1e6 / 2**20:.0f} MiB per million)"]


def run(plan: Plan, occupancies: tuple[int, ...] = OCCUPANCIES, capacity: int = CAPACITY,
        live_packets: int = 0, progress: Callable[[str], None] = log, every_flow: bool = True) -> dict:
    """The whole benchmark; returns everything as one dict (the --json output)."""
    b = setup(capacity)
    try:
        by_flows: dict[int, list[Measurement]] = {}
        for occ in sorted(occupancies):
            counted = grow(b, occ)
            progress(f"bench: flows map holds {counted:,} entries")
            by_flows[counted] = bench_occupancy(b, plan, counted)
        memory = map_memory(b)
        every = forward_every_filler(b) if every_flow else None
        live = bench_live(b, live_packets) if live_packets else []
    finally:
        teardown(b)
    summary = summarize(by_flows, plan)
    return {
        "machine": machine(),
        "plan": asdict(plan) | {"ttl_runs": TTL_RUNS, "capacity": capacity, "frame_bytes": len(client_frame(HIT_CLIENT, RTP))},
        "results": [asdict(m) | {"ok": m.ok} for ms in by_flows.values() for m in ms],
        "summary": {str(k): v for k, v in summary.items()},
        "live": [asdict(r) | {"ok": r.ok} for r in live],
        "memory": memory,
        "every_flow": asdict(every) | {"ok": every.ok} if every else None,
        "table": "\n".join([table(by_flows, summary, plan, live, capacity), *memory_lines(memory),
                            *([every_line(every)] if every else [])]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.bench_xdp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    ap.add_argument("--quick", action="store_true", help="1k and 100k flows, fewer runs (~10 s; noisier)")
    ap.add_argument("--repeat", type=int, default=None, help="runs per call for the long runs (default 1,000,000)")
    ap.add_argument("--samples", type=int, default=None, help="rounds, one sample of every figure each; the median is shown (default 7)")
    ap.add_argument("--flows", type=int, nargs="+", default=None, help="map occupancies (default 1000 100000 1000000)")
    ap.add_argument("--capacity", type=int, default=CAPACITY, help="flows map capacity (default 2^20, production)")
    ap.add_argument("--save", type=Path, help="also write the JSON here (docs/bench-xdp.json: make bench-report)")
    ap.add_argument("--live", type=int, default=None, help="live-frames packets per program (0: skip; default 2,000,000)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_xdp: needs root (namespaces, XDP); run it as root or via `make bench`", file=sys.stderr)
        return 2
    plan = Plan(repeat=200_000, samples=3, fresh_calls=5_000, spread_frames=65_536) if args.quick else Plan()
    if args.repeat:
        plan.repeat = args.repeat
    if args.samples:
        plan.samples = args.samples
    occ = tuple(args.flows) if args.flows else ((1_000, 100_000) if args.quick else OCCUPANCIES)
    if max(occ) + 2 > args.capacity:
        ap.error(f"--capacity {args.capacity} cannot hold {max(occ)} flows")
    live = args.live if args.live is not None else (200_000 if args.quick else 2_000_000)
    t0 = time.monotonic()
    res = run(plan, occ, args.capacity, live)
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    m = res["machine"]
    text = (f"splitrelay XDP benchmark: kernel {m['kernel']}, {m['cpu']}, {m['cpus']} CPUs, "
            f"BPF JIT {m['bpf_jit_enable']}; {res['plan']['frame_bytes']}-byte IPv4 SRTP frame; {res['elapsed_s']} s\n"
            + res["table"])
    if args.save:  # the figures, and the table as printed (what docs/benchmarks.md shows)
        saved = {**{k: v for k, v in res.items() if k != "table"}, "text": text,
                 "run": run_info("tests.bench.bench_xdp", sys.argv[1:] if argv is None else argv)}
        args.save.write_text(json.dumps(saved, indent=1) + "\n")
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "table"}, indent=2))
    else:
        print(text)
    bad = [r for r in res["results"] + res["live"] + ([res["every_flow"]] if res["every_flow"] else []) if not r["ok"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
