"""100,000 mutated frames through the real XDP program (BPF_PROG_TEST_RUN)
against maps holding live flows: bit flips, truncations, length lies and
random payloads, on IPv4, IPv6 and 802.1Q. Nothing may be forwarded unless
its addresses and ports are exactly a known flow's; every run lands in
exactly one counter of its verdict; no verdict but PASS, DROP or REDIRECT.
Reproducible: the seed is fixed (SEED)."""

from __future__ import annotations

import random
import struct

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q
from scapy.packet import Raw

from manager.lab import xdp_harness as hx
from manager.relay.kernel import libbpf
from manager.relay.kernel.structs import stat_verdict
from tests.support.xdp_frames import (
    C4,
    C4_MIGRATED,
    C4_POOL,
    C6,
    C6_POOL,
    DTLS,
    FLOW4,
    FLOW6,
    FLOW_POOL,
    OWNER_PORT,
    POOL_IDX,
    RTP,
    STUN,
    c2r4,
    c2r6,
    eth,
    o2r4,
)

pytestmark = pytest.mark.netns

SEED = 20261124
RUNS = 100_000
ETH_HLEN = 14
VERDICT_OF = {"forward": hx.XDP_REDIRECT, "drop": hx.XDP_DROP, "pass": hx.XDP_PASS}

# What may be forwarded: (ingress, family, src, sport, dst, dport).
KNOWN = {
    ("pub", 4, C4[0], C4[1], hx.VIP4, hx.VIP_PORT),
    ("pub", 4, C4_MIGRATED[0], C4_MIGRATED[1], hx.VIP4, hx.VIP_PORT),
    ("pub", 6, C6[0], C6[1], hx.VIP6, hx.VIP_PORT),
    ("int", 4, hx.TX1_4, OWNER_PORT, hx.INT4, FLOW4),
    ("int", 6, hx.TX1_6, OWNER_PORT, hx.INT6, FLOW6),
    ("pub", 4, C4_POOL[0], C4_POOL[1], hx.VIP4, hx.VIP_PORT),
    ("pub", 6, C6_POOL[0], C6_POOL[1], hx.VIP6, hx.VIP_PORT),
    ("int", 4, hx.TX1_4, OWNER_PORT, hx.POOL4[POOL_IDX], FLOW_POOL),
    ("int", 6, hx.TX1_6, OWNER_PORT, hx.POOL6[POOL_IDX], FLOW_POOL),
}


def tuple_of(frame: bytes) -> tuple | None:
    """(family, src, sport, dst, dport) of an Ethernet/[802.1Q]/IP/UDP frame, or None."""
    if len(frame) < 14:
        return None
    off, ethertype = 14, struct.unpack_from("!H", frame, 12)[0]
    if ethertype == 0x8100:
        if len(frame) < 18:
            return None
        off, ethertype = 18, struct.unpack_from("!H", frame, 16)[0]
    if ethertype == 0x0800 and len(frame) >= off + 20 and frame[off + 9] == 17:
        ihl = (frame[off] & 0x0F) * 4
        if len(frame) < off + ihl + 8:
            return None
        src, dst = (".".join(str(b) for b in frame[off + 12:off + 16]), ".".join(str(b) for b in frame[off + 16:off + 20]))
        sport, dport = struct.unpack_from("!HH", frame, off + ihl)
        return 4, src, sport, dst, dport
    if ethertype == 0x86DD and len(frame) >= off + 48 and frame[off + 6] == 17:
        import ipaddress

        src = str(ipaddress.IPv6Address(frame[off + 8:off + 24]))
        dst = str(ipaddress.IPv6Address(frame[off + 24:off + 40]))
        sport, dport = struct.unpack_from("!HH", frame, off + 40)
        return 6, src, sport, dst, dport
    return None


def base_frames() -> list[tuple[str, bytes]]:
    vlan = eth("client", "pub") / Dot1Q(vlan=42) / IP(src=C4[0], dst=hx.VIP4) / UDP(sport=C4[1], dport=hx.VIP_PORT)
    o2r6 = eth("tx1", "int") / IPv6(src=hx.TX1_6, dst=hx.INT6) / UDP(sport=OWNER_PORT, dport=FLOW6)
    frames = [("pub", c2r4(p)) for p in (RTP, STUN, DTLS)] + [("pub", c2r6(p)) for p in (RTP, STUN)]
    frames += [("pub", c2r4(STUN, sport=41000)), ("pub", vlan / Raw(RTP)), ("int", o2r4(RTP)), ("int", o2r4(STUN)),
               ("int", o2r6 / Raw(RTP))]
    return [(ingress, bytes(f)) for ingress, f in frames]


def mutate(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    kind = rng.randrange(6)
    if kind == 0:  # bit flips
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncation (BPF_PROG_TEST_RUN takes no frame shorter than an Ethernet header)
        del data[rng.randrange(ETH_HLEN, len(data)):]
    elif kind == 2:  # a length lie: IPv4 total length, IPv6 payload length or UDP length
        at = rng.choice([16, 18, 20, 38, 42, 58, 60])
        if at + 2 <= len(data):
            struct.pack_into("!H", data, at, rng.randrange(0x10000))
    elif kind == 3:  # random payload behind the headers
        cut = rng.choice([42, 46, 62])
        data[cut:] = rng.randbytes(rng.randrange(0, 300))
        data = data if len(data) >= ETH_HLEN else data + bytes(ETH_HLEN - len(data))
    elif kind == 4:  # random bytes anywhere in the headers
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(min(len(data), 66))] = rng.randrange(256)
    else:  # nothing but noise
        data = bytearray(rng.randbytes(rng.randrange(ETH_HLEN, 200)))
    return bytes(data)


def test_mutated_frames_are_never_forwarded_unless_they_are_a_known_flow(harness):
    rng = random.Random(SEED)
    bases = base_frames()
    frames = []
    for _ in range(RUNS):
        ingress, base = rng.choice(bases)
        if rng.random() < 0.1:
            ingress = "int" if ingress == "pub" else "pub"
        frames.append((ingress, mutate(rng, base)))

    def run_all() -> list[int]:
        fd, ifindex = harness.dp.prog_fd, harness.ifindex
        return [libbpf.prog_test_run_xdp(fd, f, ingress_ifindex=ifindex[i])[0] for i, f in frames]

    before = harness.dp.counters()
    verdicts = harness.ex.call(run_all)
    after = harness.dp.counters()

    unexpected = {v for v in verdicts if v not in VERDICT_OF.values()}
    assert not unexpected, f"unexpected verdicts {[hx.VERDICTS[v] for v in unexpected]}"
    forwarded_wrongly = []
    for (ingress, frame), verdict in zip(frames, verdicts, strict=True):
        if verdict == hx.XDP_REDIRECT:
            t = tuple_of(frame)
            if t is None or (ingress, *t) not in KNOWN:
                forwarded_wrongly.append((ingress, frame.hex()))
    assert not forwarded_wrongly, f"{len(forwarded_wrongly)} frames forwarded that are no known flow: " \
                                  f"{forwarded_wrongly[:3]}"
    # Every run in exactly one counter, and that counter's verdict is the run's.
    delta = {k: after[k][0] - before[k][0] for k in after}
    assert sum(delta.values()) == RUNS
    for verdict_name, verdict in VERDICT_OF.items():
        counted = sum(n for k, n in delta.items() if stat_verdict(k) == verdict_name)
        assert counted == verdicts.count(verdict), (verdict_name, counted, verdicts.count(verdict))
    # The mutations reached the interesting places, not only the early outs.
    assert verdicts.count(hx.XDP_REDIRECT) > 1000 and delta["pass_stun_unknown"] > 0
    assert sum(1 for k, n in delta.items() if n) >= 10
