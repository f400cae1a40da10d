"""The two floods that used to reach relayd through XDP, injected at full
speed (BPF_PROG_TEST_RUN live frames, bpf/testing/flood.bpf.c: a random
source address and port per packet) into a veth whose peer runs the relay's
program: forged STUN with an IP option (dropped, every one, as
drop_ip_options), and RTP spoofing one live call's SSRC (at most that SSRC's
bucket reaches the slow path as pass_rebind; the rest is
drop_rebind_call_rate). Counters only: how fast this machine injects does
not matter. The lab version with relayd's CPU is tests/bench/bench_flood.py."""

from __future__ import annotations

import ctypes
import socket
import time

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from manager.lab import xdp_harness as hx
from manager.relay.kernel import libbpf
from manager.relay.kernel.datapath import admit_config, ensure_kernel_headers
from manager.relay.kernel.structs import BPF_TESTING_DIR

pytestmark = pytest.mark.netns

RUNS = 200_000
SSRC = 0x0BADCAFE


@pytest.fixture(scope="module")
def harness():
    h = hx.build()
    try:
        h.ex.call(h.dp.attach, ["pub"])
        yield h
    finally:
        hx.teardown(h)


def flood(h: hx.Harness, frame: bytes, ip_hlen: int) -> int:
    """RUNS copies of frame, each from a random source, out of pubp into pub."""
    from bcc import BPF

    ensure_kernel_headers()
    bpf = BPF(src_file=str(BPF_TESTING_DIR / "flood.bpf.c").encode(),
              cflags=["-DUFRAG_OFF=0", "-DRANDOM_UFRAG=0", f"-DIP_HLEN={ip_hlen}"])
    try:
        fd = bpf.load_func(b"xdp_flood", BPF.XDP).fd
        ifindex = h.ex.call(socket.if_nametoindex, "pubp")
        h.ex.call(libbpf.prog_test_run_xdp, fd, frame, ingress_ifindex=ifindex, repeat=RUNS,
                  flags=libbpf.BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=64)
    finally:
        bpf.cleanup()
    return RUNS


# The veths' own traffic (IPv6 neighbour discovery, MLD reports with a hop-by-hop header).
BACKGROUND = {"pass_not_relay", "pass_ipv6_ext"}


def moved(before: dict, after: dict) -> dict:
    """Counters that moved, but those of the veths' own traffic."""
    return {k: after[k][0] - before[k][0] for k in after if after[k][0] != before[k][0] and k not in BACKGROUND}


def settled(h: hx.Harness) -> dict:
    """The counters once the veth has delivered what it queued."""
    last = None
    while (now := h.dp.counters()) != last:
        last = now
        time.sleep(0.2)  # pacing: the next look at the counters
    return now


def test_an_ip_options_flood_never_reaches_the_slow_path(harness):
    h = harness
    frame = bytes(Ether(dst=hx.MAC["pub"]) / IP(src=hx.CLIENT4, dst=hx.VIP4, options=b"\x01\x01\x01\x00")
                  / UDP(sport=40000, dport=hx.VIP_PORT) / Raw(hx.STUN_CHECK))
    before = settled(h)
    flood(h, frame, 24)
    got = moved(before, settled(h))
    print(f"\nIP options flood: {got}")
    assert set(got) == {"drop_ip_options"} and 0 < got["drop_ip_options"] <= RUNS


def test_a_live_ssrc_spoof_passes_only_its_bucket(harness):
    h = harness
    dp = h.dp
    rate, burst = 10.0, 10
    cfg = dp.cfg.model_copy(update={"admit_rebind_rate": rate, "admit_rebind_burst": burst})
    dp.maps.admit_cfg.update(ctypes.c_uint32(0), admit_config(cfg, libbpf.possible_cpus()))
    dp.index_ssrc(SSRC, (hx.CLIENT4, 40000), (hx.VIP4, hx.VIP_PORT))
    rtp = bytes([0x80, 111]) + b"\x00\x01" + b"\x00" * 4 + SSRC.to_bytes(4, "big") + b"r" * 160
    frame = bytes(Ether(dst=hx.MAC["pub"]) / IP(src=hx.CLIENT4, dst=hx.VIP4) / UDP(sport=40000, dport=hx.VIP_PORT)
                  / Raw(rtp))
    before = settled(h)
    t0 = time.monotonic()
    flood(h, frame, 20)
    got = moved(before, settled(h))
    elapsed = time.monotonic() - t0
    print(f"\nlive-SSRC spoof: {got} in {elapsed:.1f} s")
    assert set(got) <= {"pass_rebind", "drop_rebind_call_rate"} and got["drop_rebind_call_rate"] > 0
    assert got.get("pass_rebind", 0) <= burst + rate * elapsed + 1
