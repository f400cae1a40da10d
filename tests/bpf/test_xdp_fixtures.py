"""Table-driven BPF_PROG_TEST_RUN fixtures for the relay XDP program.

Each case: (description, ingress side, input frame, expected verdict,
expected output frame or None for "unchanged", counter that must rise).
Frames and their checksums are built by scapy, an implementation independent
of the program's incremental checksum code.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
from dataclasses import dataclass

import pytest
from aioice import stun
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from manager.lab import xdp_harness as hx
from manager.lab.xdp_harness import (
    CLIENT4,
    CLIENT6,
    INT4,
    INT6,
    MAC,
    POOL4,
    POOL6,
    TCP_PORT,
    TX1_4,
    TX1_6,
    TX2_4,
    VIP4,
    VIP6,
    VIP_PORT,
    XDP_DROP,
    XDP_PASS,
    XDP_REDIRECT,
)
from manager.protocol.keyring import KeyRing
from manager.protocol.ufrag import encode_ufrag
from manager.relay.kernel import libbpf
from manager.relay.kernel.datapath import OwnerAddr
from tests.support.xdp_fixture_harness import (
    C4_NONEIGH,
    C4_ORPHAN,
)
from tests.support.xdp_frames import (
    C4,
    C4_POOL,
    C6_POOL,
    DTLS,
    FLOW4,
    FLOW6,
    FLOW_MIGRATED,
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

JUNK = bytes([0x50]) + b"j" * 20









def r2o4(payload: bytes, ttl: int = 63, flow_port: int = FLOW4, chksum: int | None = None) -> Ether:
    udp = UDP(sport=flow_port, dport=OWNER_PORT) if chksum is None else UDP(sport=flow_port, dport=OWNER_PORT, chksum=chksum)
    return eth("int", "tx1") / IP(src=INT4, dst=TX1_4, ttl=ttl) / udp / Raw(payload)




def r2c4(payload: bytes) -> Ether:
    return eth("pub", "client") / IP(src=VIP4, dst=CLIENT4, ttl=63) / UDP(sport=VIP_PORT, dport=40000) / Raw(payload)


def _with(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value):]


UFRAG = hx.LIVE_UFRAG


def pool_cases() -> list[Case]:
    """Flow sources beyond the first internal address: out from the flow's
    pool address, back only to that address and port."""
    a4, a6 = POOL4[POOL_IDX], POOL6[POOL_IDX]
    in4 = eth("client", "pub") / IP(src=CLIENT4, dst=VIP4) / UDP(sport=C4_POOL[1], dport=VIP_PORT) / Raw(RTP)
    out4 = eth("int", "tx1") / IP(src=a4, dst=TX1_4, ttl=63) / UDP(sport=FLOW_POOL, dport=OWNER_PORT) / Raw(RTP)
    in6 = eth("client", "pub") / IPv6(src=CLIENT6, dst=VIP6) / UDP(sport=C6_POOL[1], dport=VIP_PORT) / Raw(RTP)
    out6 = eth("int", "tx1") / IPv6(src=a6, dst=TX1_6, hlim=63) / UDP(sport=FLOW_POOL, dport=OWNER_PORT) / Raw(RTP)

    def back4(dst: str):
        return eth("tx1", "int") / IP(src=TX1_4, dst=dst) / UDP(sport=OWNER_PORT, dport=FLOW_POOL) / Raw(RTP)

    back6 = eth("tx1", "int") / IPv6(src=TX1_6, dst=a6) / UDP(sport=OWNER_PORT, dport=FLOW_POOL) / Raw(RTP)
    to_client4 = eth("pub", "client") / IP(src=VIP4, dst=CLIENT4, ttl=63) / UDP(sport=VIP_PORT, dport=C4_POOL[1]) / Raw(RTP)
    to_client6 = (eth("pub", "client") / IPv6(src=VIP6, dst=CLIENT6, hlim=63) / UDP(sport=VIP_PORT, dport=C6_POOL[1])
                  / Raw(RTP))
    past = f"10.10.0.{len(POOL4) + 1}"
    return [
        Case("v4 client→owner from the third pool address", "pub", b(in4), XDP_REDIRECT, b(out4), "fwd_in_rtp"),
        Case("v4 owner→third pool address → client", "int", b(back4(a4)), XDP_REDIRECT, b(to_client4), "fwd_out_rtp"),
        Case("v6 client→owner from the third pool address", "pub", b(in6), XDP_REDIRECT, b(out6), "fwd_in_rtp"),
        Case("v6 owner→third pool address → client", "int", b(back6), XDP_REDIRECT, b(to_client6), "fwd_out_rtp"),
        Case("owner→same port on the first pool address (another flow source) → slow path", "int",
             b(back4(INT4)), XDP_PASS, None, "pass_return_unknown"),
        Case("owner→an address past the pool → kernel", "int", b(back4(past)), XDP_PASS, None, "pass_not_relay"),
    ]


def admission_cases() -> list[Case]:
    """A new client tuple's first packets: what reaches the slow path, and the
    reason for everything that does not."""
    unknown = dict(sport=41000)
    good = hx.STUN_CHECK
    with_priority = hx.binding_request(UFRAG + ":cli1", before={"PRIORITY": 1, "ICE-CONTROLLING": 7})
    no_username = bytes(stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST))
    version2 = "Ag" + UFRAG[2:]   # first byte 0x02: another hint version
    rows = [
        ("well-formed check with our ufrag → slow path", good, XDP_PASS, "pass_stun_unknown"),
        ("PRIORITY and ICE-CONTROLLING before USERNAME → slow path", with_priority, XDP_PASS, "pass_stun_unknown"),
        ("no magic cookie → drop", _with(good, 4, b"\x00\x00\x00\x00"), XDP_DROP, "drop_stun_malformed"),
        ("length longer than the datagram → drop", _with(good, 2, (len(good) - 16).to_bytes(2, "big")), XDP_DROP,
         "drop_stun_malformed"),
        ("length shorter than the datagram → drop", good + b"\x00" * 4, XDP_DROP, "drop_stun_malformed"),
        ("length not a multiple of 4 → drop", _with(good, 2, (len(good) - 21).to_bytes(2, "big"))[:-1], XDP_DROP,
         "drop_stun_malformed"),
        ("header cut short → drop", good[:12], XDP_DROP, "drop_stun_malformed"),
        ("attribute running past the message → drop", _with(good, 22, b"\x01\x00"), XDP_DROP,
         "drop_stun_malformed"),
        ("Binding success response → drop", hx.binding_request(UFRAG + ":cli1", cls=stun.Class.RESPONSE), XDP_DROP,
         "drop_stun_not_binding"),
        ("Binding indication → drop", hx.binding_request(UFRAG + ":cli1", cls=stun.Class.INDICATION), XDP_DROP,
         "drop_stun_not_binding"),
        ("Binding request without USERNAME → drop", no_username, XDP_DROP, "drop_stun_no_username"),
        ("USERNAME of a client ufrag shape → drop", hx.binding_request("abcd:efgh"), XDP_DROP,
         "drop_stun_bad_ufrag"),
        ("USERNAME with another hint version → drop", hx.binding_request(version2 + ":cli1"), XDP_DROP,
         "drop_stun_bad_ufrag"),
        ("USERNAME with a non-ice character → drop", hx.binding_request(UFRAG[:10] + "-" + UFRAG[11:] + ":cli1"),
         XDP_DROP, "drop_stun_bad_ufrag"),
        ("USERNAME without the colon → drop", hx.binding_request(UFRAG + "Xcli1"), XDP_DROP, "drop_stun_bad_ufrag"),
        ("our ufrag's shape and MAC, but no live call's → drop", hx.binding_request(encode_ufrag(hx.HINT_KEY, 1, 8)
                                                                                    + ":cli1"),
         XDP_DROP, "drop_stun_unknown_ufrag"),
    ]
    return [Case(f"unknown client: {desc}", "pub", b(c2r4(payload, **unknown)), verdict, None, stat)
            for desc, payload, verdict, stat in rows]


def refusal_cases() -> list[Case]:
    """IP options, fragments and IPv6 extension headers: dropped, each under
    its own reason, when they are for the relay (a VIP, a flow source),
    known tuple or not; the kernel's to handle otherwise."""
    nop = b"\x01\x01\x01\x00"

    def opts4(dport: int = VIP_PORT, sport: int = 40000):
        return eth("client", "pub") / IP(src=CLIENT4, dst=VIP4, options=nop) / UDP(sport=sport, dport=dport) / Raw(STUN)

    def v6(*ext, dport: int = VIP_PORT, chksum: int | None = None):
        udp = UDP(sport=40000, dport=dport) if chksum is None else UDP(sport=40000, dport=dport, chksum=chksum)
        pkt = eth("client", "pub") / IPv6(src=CLIENT6, dst=VIP6)
        for e in ext:
            pkt = pkt / e
        return pkt / udp / Raw(RTP)

    first_frag = eth("client", "pub") / IP(src=CLIENT4, dst=VIP4, flags="MF") / UDP(sport=41000, dport=VIP_PORT,
                                                                                      len=3000) / Raw(STUN)
    back_opts = eth("tx1", "int") / IP(src=TX1_4, dst=INT4, options=nop) / UDP(sport=OWNER_PORT, dport=FLOW4) / Raw(RTP)
    return [
        Case("IPv4 options, forged STUN from an unknown tuple → drop", "pub", b(opts4(sport=41000)), XDP_DROP, None,
             "drop_ip_options"),
        Case("IPv4 options on a known flow → drop", "pub", b(opts4()), XDP_DROP, None, "drop_ip_options"),
        Case("IPv4 options, owner → flow port → drop", "int", b(back_opts), XDP_DROP, None, "drop_ip_options"),
        Case("IPv4 options to another port → kernel", "pub", b(opts4(dport=9999)), XDP_PASS, None, "pass_not_relay"),
        Case("IPv4 first fragment to the VIP → drop", "pub", b(first_frag), XDP_DROP, None, "drop_fragment"),
        Case("IPv4 first fragment of a known flow → drop", "pub", b(c2r4(RTP, flags="MF")), XDP_DROP, None,
             "drop_fragment"),
        Case("IPv4 later fragment → kernel (its first one decides)", "pub",
             b(eth("client", "pub") / IP(src=CLIENT4, dst=VIP4, frag=10, proto=17) / Raw(RTP)), XDP_PASS, None,
             "pass_fragment"),
        Case("IPv6 hop-by-hop header to the VIP → drop", "pub", b(v6(IPv6ExtHdrHopByHop())), XDP_DROP, None,
             "drop_ipv6_ext"),
        Case("IPv6 fragment header (first) to the VIP → drop", "pub", b(v6(IPv6ExtHdrFragment(m=1))), XDP_DROP,
             None, "drop_ipv6_ext"),
        Case("IPv6 hop-by-hop, then destination options → drop", "pub",
             b(v6(IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt())), XDP_DROP, None, "drop_ipv6_ext"),
        Case("IPv6 later fragment → kernel", "pub",
             b(eth("client", "pub") / IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrFragment(offset=10, nh=17) / Raw(RTP)),
             XDP_PASS, None, "pass_ipv6_ext"),
        Case("IPv6 hop-by-hop to another port → kernel", "pub", b(v6(IPv6ExtHdrHopByHop(), dport=9999)), XDP_PASS,
             None, "pass_not_relay"),
        Case("IPv6 zero UDP checksum to another port (VXLAN) → kernel", "pub", b(v6(dport=4789, chksum=0)), XDP_PASS,
             None, "pass_not_relay"),
    ]


def tcp_cases() -> list[Case]:
    """TCP: a connection's first SYN to an ICE-TCP listener spends its
    source's SYN bucket (unlimited here: test_tcp_syn_rate_per_source sets
    one), whatever IP options or IPv6 extension headers it carries; any
    other TCP segment is the kernel's."""
    def syn4(flags: str = "S", dport: int = TCP_PORT, **ip):
        return b(eth("client", "pub") / IP(src=CLIENT4, dst=VIP4, **ip) / TCP(sport=40000, dport=dport, flags=flags))

    def syn6(*ext, flags: str = "S"):
        pkt = eth("client", "pub") / IPv6(src=CLIENT6, dst=VIP6)
        for e in ext:
            pkt = pkt / e
        return b(pkt / TCP(sport=40000, dport=TCP_PORT, flags=flags))

    return [
        Case("TCP SYN to the ICE-TCP listener → kernel, counted", "pub", syn4(), XDP_PASS, None, "pass_tcp_syn"),
        Case("TCP SYN with IP options to the listener → counted as a SYN", "pub", syn4(options=b"\x01\x01\x01\x00"),
             XDP_PASS, None, "pass_tcp_syn"),
        Case("v6 TCP SYN to the listener → kernel, counted", "pub", syn6(), XDP_PASS, None, "pass_tcp_syn"),
        Case("v6 TCP SYN after a hop-by-hop header → counted as a SYN", "pub", syn6(IPv6ExtHdrHopByHop()), XDP_PASS,
             None, "pass_tcp_syn"),
        Case("TCP SYN-ACK to the listener → kernel", "pub", syn4("SA"), XDP_PASS, None, "pass_not_relay"),
        Case("TCP ACK to the listener → kernel", "pub", syn4("A"), XDP_PASS, None, "pass_not_relay"),
        Case("v6 TCP ACK to the listener → kernel", "pub", syn6(flags="A"), XDP_PASS, None, "pass_not_relay"),
        Case("TCP SYN to another port → kernel", "pub", syn4(dport=22), XDP_PASS, None, "pass_not_relay"),
        Case("TCP SYN cut short → kernel", "pub", syn4()[:14 + 20 + 12], XDP_PASS, None, "pass_not_relay"),
    ]


@dataclass
class Case:
    desc: str
    ingress: str
    frame: bytes
    verdict: int
    out: bytes | None
    stat: str


def b(pkt) -> bytes:
    return bytes(pkt)


def cases() -> list[Case]:
    full4 = b(c2r4(RTP))
    full6 = b(c2r6(RTP))
    vlan_in = eth("client", "pub") / Dot1Q(vlan=42) / IP(src=CLIENT4, dst=VIP4) / UDP(sport=40000, dport=VIP_PORT) / Raw(RTP)
    zero_in = c2r4(RTP)
    zero_in[UDP].chksum = 0
    return [
        # --- forwarding, both directions, both families, each class -----------------
        Case("v4 client→owner SRTP", "pub", full4, XDP_REDIRECT, b(r2o4(RTP)), "fwd_in_rtp"),
        Case("v4 client→owner DTLS", "pub", b(c2r4(DTLS)), XDP_REDIRECT, b(r2o4(DTLS)), "fwd_in_dtls"),
        Case("v4 client→owner STUN (consent)", "pub", b(c2r4(STUN)), XDP_REDIRECT, b(r2o4(STUN)), "fwd_in_stun"),
        Case("v4 owner→client SRTP", "int", b(o2r4(RTP)), XDP_REDIRECT, b(r2c4(RTP)), "fwd_out_rtp"),
        Case("v4 owner→client STUN", "int", b(o2r4(STUN)), XDP_REDIRECT, b(r2c4(STUN)), "fwd_out_stun"),
        Case("v4 owner→client DTLS", "int", b(o2r4(DTLS)), XDP_REDIRECT, b(r2c4(DTLS)), "fwd_out_dtls"),
        Case("v6 client→owner SRTP", "pub", full6, XDP_REDIRECT,
             b(eth("int", "tx1") / IPv6(src=INT6, dst=TX1_6, hlim=63) / UDP(sport=FLOW6, dport=OWNER_PORT) / Raw(RTP)),
             "fwd_in_rtp"),
        Case("v6 owner→client SRTP", "int",
             b(eth("tx1", "int") / IPv6(src=TX1_6, dst=INT6) / UDP(sport=OWNER_PORT, dport=FLOW6) / Raw(RTP)),
             XDP_REDIRECT,
             b(eth("pub", "client") / IPv6(src=VIP6, dst=CLIENT6, hlim=63) / UDP(sport=VIP_PORT, dport=40000) / Raw(RTP)),
             "fwd_out_rtp"),
        Case("v4 zero UDP checksum stays zero", "pub", b(zero_in), XDP_REDIRECT, b(r2o4(RTP, chksum=0)), "fwd_in_rtp"),
        Case("802.1Q-tagged client→owner → kernel, untouched (its VLAN device's)", "pub", b(vlan_in), XDP_PASS, None,
             "pass_vlan"),
        *pool_cases(),
    # --- unknown tuples ----------------------------------------------------------
        Case("unknown client STUN → slow path", "pub", b(c2r4(STUN, sport=41000)), XDP_PASS, None, "pass_stun_unknown"),
        Case("unknown client SRTP → drop", "pub", b(c2r4(RTP, sport=41000)), XDP_DROP, None, "drop_unknown_not_stun"),
        Case("unknown client DTLS → drop", "pub", b(c2r4(DTLS, sport=41000)), XDP_DROP, None, "drop_unknown_not_stun"),
        Case("unknown client empty UDP → drop", "pub", b(c2r4(b"", sport=41000)), XDP_DROP, None, "drop_unknown_not_stun"),
        # --- interface roles -------------------------------------------------------------------
        Case("client → VIP arriving on the internal side → drop", "int", b(c2r4(RTP)), XDP_DROP, None,
             "drop_wrong_side"),
        Case("owner → flow port arriving on the public side → drop", "pub", b(o2r4(RTP)), XDP_DROP, None,
             "drop_wrong_side"),
        # --- admission of an unknown tuple's STUN (bpf/stun.h) --------------------------------
        *admission_cases(),
        Case("v6 unknown client STUN → slow path", "pub",
             b(eth("client", "pub") / IPv6(src=CLIENT6, dst=VIP6) / UDP(sport=41000, dport=VIP_PORT) / Raw(STUN)),
             XDP_PASS, None, "pass_stun_unknown"),
        Case("return to flow port with no entry → slow path", "int", b(o2r4(STUN, flow_port=20999)), XDP_PASS, None,
             "pass_return_unknown"),
        Case("return from a non-owner → drop", "int", b(o2r4(RTP, flow_port=FLOW_MIGRATED)), XDP_DROP, None,
             "drop_not_owner"),
        Case("return from an unknown sender → slow path", "int", b(o2r4(RTP, src="10.10.2.77")), XDP_PASS, None,
             "pass_return_unknown"),
        Case("known flow, payload not STUN/DTLS/RTP → drop", "pub", b(c2r4(JUNK)), XDP_DROP, None, "drop_bad_class"),
        Case("known flow, call has no owner → drop", "pub", b(c2r4(RTP, sport=C4_ORPHAN[1])), XDP_DROP, None,
             "drop_no_owner"),
        Case("owner without neighbour entry → kernel", "pub", b(c2r4(RTP, sport=C4_NONEIGH[1])), XDP_PASS, None,
             "pass_no_neigh"),
        # --- TTL: the relay sends one less, and drops 0 (RFC 8656 14) ---------------
        Case("known flow, TTL 1 → owner with TTL 0", "pub", b(c2r4(RTP, ttl=1)), XDP_REDIRECT, b(r2o4(RTP, ttl=0)),
             "fwd_in_rtp"),
        Case("known flow, hop limit 1 → owner with hop limit 0", "pub", b(c2r6(RTP, hlim=1)), XDP_REDIRECT,
             b(eth("int", "tx1") / IPv6(src=INT6, dst=TX1_6, hlim=0) / UDP(sport=FLOW6, dport=OWNER_PORT) / Raw(RTP)),
             "fwd_in_rtp"),
        Case("known flow, TTL 0 → drop", "pub", b(c2r4(RTP, ttl=0)), XDP_DROP, None, "drop_ttl_zero"),
        Case("known flow, hop limit 0 → drop", "pub", b(c2r6(RTP, hlim=0)), XDP_DROP, None, "drop_ttl_zero"),
        Case("owner → client, TTL 1 → client with TTL 0", "int",
             b(eth("tx1", "int") / IP(src=TX1_4, dst=INT4, ttl=1) / UDP(sport=OWNER_PORT, dport=FLOW4) / Raw(RTP)),
             XDP_REDIRECT,
             b(eth("pub", "client") / IP(src=VIP4, dst=CLIENT4, ttl=0) / UDP(sport=VIP_PORT, dport=40000) / Raw(RTP)),
             "fwd_out_rtp"),
        # --- what the relay cannot take: dropped when it is the relay's ------------------
        *refusal_cases(),
        *tcp_cases(),
        Case("TCP to the VIP → kernel", "pub", b(eth("client", "pub") / IP(src=CLIENT4, dst=VIP4) / TCP(sport=40000, dport=VIP_PORT)),
             XDP_PASS, None, "pass_not_relay"),
        Case("ICMP → kernel", "pub", b(eth("client", "pub") / IP(src=CLIENT4, dst=VIP4) / ICMP()), XDP_PASS, None, "pass_not_relay"),
        Case("ARP → kernel", "pub", b(eth("client", "pub") / ARP(psrc=CLIENT4, pdst=VIP4)), XDP_PASS, None, "pass_not_relay"),
        Case("UDP to another port of the VIP → kernel", "pub",
             b(eth("client", "pub") / IP(src=CLIENT4, dst=VIP4) / UDP(sport=40000, dport=9999) / Raw(RTP)), XDP_PASS, None,
             "pass_not_relay"),
        Case("UDP to the internal address outside the flow range → kernel", "int",
             b(eth("tx1", "int") / IP(src=TX1_4, dst=INT4) / UDP(sport=OWNER_PORT, dport=8080) / Raw(RTP)), XDP_PASS, None,
             "pass_not_relay"),
        # --- malformed ---------------------------------------------------------------------
        Case("v6 zero UDP checksum to the VIP → drop", "pub",
             b(eth("client", "pub") / IPv6(src=CLIENT6, dst=VIP6) / UDP(sport=40000, dport=VIP_PORT, chksum=0) / Raw(RTP)),
             XDP_DROP, None, "drop_malformed"),
        Case("UDP length beyond IP payload → drop", "pub",
             b(eth("client", "pub") / IP(src=CLIENT4, dst=VIP4) / UDP(sport=40000, dport=VIP_PORT, len=200) / Raw(RTP)),
             XDP_DROP, None, "drop_malformed"),
        Case("IPv4 ihl < 5 → drop", "pub", b(c2r4(RTP, ihl=4)), XDP_DROP, None, "drop_malformed"),
        # Truncated at every header boundary (and one byte into each header).
        # BPF_PROG_TEST_RUN refuses frames under ETH_HLEN, as no driver hands
        # XDP one, so the Ethernet header is the first boundary.
        *[Case(f"v4 frame cut to {n} bytes → drop", "pub", full4[:n], XDP_DROP, None, "drop_malformed")
          for n in (14, 15, 33, 34, 35, 41, 42)],
        Case("802.1Q tag cut short → kernel", "pub", b(vlan_in)[:16], XDP_PASS, None, "pass_vlan"),
        *[Case(f"v6 frame cut to {n} bytes → drop", "pub", full6[:n], XDP_DROP, None, "drop_malformed")
          for n in (14, 15, 53, 54, 55, 61, 62)],
    ]




CASES = cases()


@pytest.mark.parametrize("case", CASES, ids=[c.desc for c in CASES])
def test_fixture(harness, case: Case):
    before = harness.dp.counters()
    verdict, out, _ = harness.run(case.frame, case.ingress)
    after = harness.dp.counters()
    assert hx.VERDICTS[verdict] == hx.VERDICTS[case.verdict], case.desc
    expected = case.frame if case.out is None else case.out
    if out != expected:
        # Show both frames decoded: the difference is easier to read.
        pytest.fail(f"{case.desc}: output frame differs\n got: {Ether(out)!r}\nwant: {Ether(expected)!r}")
    changed = {k: after[k][0] - before[k][0] for k in after if after[k] != before[k]}
    assert changed == {case.stat: 1}, f"{case.desc}: counters changed {changed}"
    assert after[case.stat][1] - before[case.stat][1] == len(case.frame)


def test_flow_counters_and_last_seen(harness):
    """A forwarded packet updates its flow's packets, bytes and last-seen
    (the coarse clock: within a tick of now)."""
    import time

    from manager.relay.kernel.structs import flow_key

    dp = harness.dp
    key = flow_key(C4, (VIP4, VIP_PORT))
    info = dp.maps.flows.lookup(key)
    info.last_seen_ns = 1  # long ago
    dp.maps.flows.update(key, info)
    before = dp.maps.flows.lookup(key)
    frame = b(c2r4(RTP))
    verdict, _, _ = harness.run(frame)
    after = dp.maps.flows.lookup(key)
    assert verdict == XDP_REDIRECT
    assert after.packets == before.packets + 1
    assert after.bytes == before.bytes + len(frame)
    assert time.monotonic_ns() - after.last_seen_ns < 100_000_000


def test_ownership_flip_is_one_update(harness):
    """Changing the owner entry moves both directions at once."""
    dp = harness.dp
    tx2 = OwnerAddr(addr4=TX2_4, port4=6000)
    dp.set_owner(11, OwnerAddr(addr4=TX1_4, port4=OWNER_PORT))
    dp.add_flow((CLIENT4, 40011), (VIP4, VIP_PORT), 11, 20011)
    dp.add_reverse((TX2_4, 6000), 20011, (CLIENT4, 40011), (VIP4, VIP_PORT), 11)  # staged, inert
    from_tx2 = b(eth("tx2", "int") / IP(src=TX2_4, dst=INT4) / UDP(sport=6000, dport=20011) / Raw(RTP))
    from_tx1 = b(eth("tx1", "int") / IP(src=TX1_4, dst=INT4) / UDP(sport=OWNER_PORT, dport=20011) / Raw(RTP))
    assert harness.run(from_tx2, "int")[0] == XDP_DROP
    assert harness.run(from_tx1, "int")[0] == XDP_REDIRECT
    gen = dp.set_owner(11, tx2)
    assert gen == 2
    verdict, out, _ = harness.run(b(c2r4(RTP, sport=40011)))
    assert verdict == XDP_REDIRECT and Ether(out)[IP].dst == TX2_4 and Ether(out)[UDP].dport == 6000
    assert harness.run(from_tx2, "int")[0] == XDP_REDIRECT
    assert harness.run(from_tx1, "int")[0] == XDP_DROP


def _set_admission(harness, **rates) -> None:
    from manager.relay.kernel import libbpf as lb
    from manager.relay.kernel.datapath import admit_config

    cfg = harness.dp.cfg.model_copy(update=rates)
    harness.dp.maps.admit_cfg.update(ctypes.c_uint32(0), admit_config(cfg, lb.possible_cpus()))


def _stun_from(harness, src: str, sport: int) -> int:
    frame = bytes(eth("client", "pub") / IP(src=src, dst=VIP4) / UDP(sport=sport, dport=VIP_PORT) / Raw(STUN))
    return harness.run(frame, "pub")[0]


def test_admission_rate_per_source_and_global_budget(harness):
    """A source gets its burst and then its rate; every source together gets
    the global budget. Established flows are never counted against either."""
    try:
        _set_admission(harness, admit_source_rate=0.001, admit_source_burst=5, admit_budget=0)
        before = harness.dp.counters()
        verdicts = [_stun_from(harness, "10.10.1.50", 30000 + i) for i in range(12)]
        assert verdicts == [XDP_PASS] * 5 + [XDP_DROP] * 7
        verdicts = [_stun_from(harness, "10.10.1.51", 31000 + i) for i in range(3)]  # another source: its own
        assert verdicts == [XDP_PASS] * 3
        after = harness.dp.counters()
        assert after["drop_stun_rate"][0] - before["drop_stun_rate"][0] == 7
        # A known flow from a limited source still goes through.
        assert harness.run(b(c2r4(RTP)), "pub")[0] == XDP_REDIRECT

        cpus = libbpf.possible_cpus()
        _set_admission(harness, admit_source_rate=0, admit_budget=0.001 * cpus, admit_budget_burst=4 * cpus)
        frames = [bytes(eth("client", "pub") / IP(src=f"10.10.1.{60 + i}", dst=VIP4) / UDP(sport=32000, dport=VIP_PORT)
                        / Raw(STUN)) for i in range(10)]

        def on_one_cpu() -> list[int]:
            # Each CPU holds its own part of the budget: run them all on one.
            import os

            saved = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {min(saved)})
            try:
                return [libbpf.prog_test_run_xdp(harness.dp.prog_fd, f, ingress_ifindex=harness.ifindex["pub"])[0]
                        for f in frames]
            finally:
                os.sched_setaffinity(0, saved)

        before = harness.dp.counters()
        verdicts = harness.ex.call(on_one_cpu)
        after = harness.dp.counters()
        # One CPU's part of the budget: its burst, then nothing.
        assert verdicts.count(XDP_PASS) == 4 and verdicts[:4] == [XDP_PASS] * 4
        assert after["drop_stun_budget"][0] - before["drop_stun_budget"][0] == 6

        # One live call's checks, from any number of sources: its own bucket.
        _set_admission(harness, admit_source_rate=0, admit_budget=0, admit_call_rate=0.001, admit_call_burst=3)
        harness.dp.admit_ufrag(hx.LIVE_UFRAG)  # a fresh bucket
        other = encode_ufrag(hx.HINT_KEY, 1, 9)
        harness.dp.admit_ufrag(other)
        before = harness.dp.counters()
        verdicts = [_stun_from(harness, f"10.10.1.{80 + i}", 33000 + i) for i in range(8)]
        assert verdicts == [XDP_PASS] * 3 + [XDP_DROP] * 5
        other_check = bytes(eth("client", "pub") / IP(src="10.10.1.99", dst=VIP4) / UDP(sport=33100, dport=VIP_PORT)
                            / Raw(hx.binding_request(other + ":cli2")))
        assert harness.run(other_check, "pub")[0] == XDP_PASS  # another call is not held back
        after = harness.dp.counters()
        assert after["drop_stun_call_rate"][0] - before["drop_stun_call_rate"][0] == 5
        harness.dp.forget_ufrag(other)
        assert harness.run(other_check, "pub")[0] == XDP_DROP  # an ended call's ufrag no longer passes
    finally:
        _set_admission(harness, admit_source_rate=0, admit_budget=0, admit_call_rate=0)
        harness.dp.admit_ufrag(hx.LIVE_UFRAG)


def test_a_ufrag_of_a_rotated_key_passes_like_any_other(harness):
    """XDP checks a hint's shape (length, ice-chars, version) and that its call
    is live, never its key: a ufrag minted by a rotated key (its id in byte 7)
    passes, and once its call ends it is dropped like any other."""
    rotated = encode_ufrag(KeyRing({0: hx.HINT_KEY, 200: bytes(range(7, 39))}, signing=200), 1, 11)
    check = bytes(eth("client", "pub") / IP(src="10.10.1.98", dst=VIP4) / UDP(sport=33200, dport=VIP_PORT)
                  / Raw(hx.binding_request(rotated + ":cli3")))
    harness.dp.admit_ufrag(rotated)
    try:
        assert harness.run(check, "pub")[0] == XDP_PASS
    finally:
        harness.dp.forget_ufrag(rotated)
    assert harness.run(check, "pub")[0] == XDP_DROP


def test_tcp_syn_rate_per_source(harness):
    """SYNs to the ICE-TCP listener: a source (an IPv4 address, an IPv6 /64)
    gets its burst, then its rate; beyond, dropped and counted in XDP, never
    answered by the kernel nor accepted by relayd. Another source has its
    own bucket; the relay's other ports and established segments are not
    counted."""
    from manager.relay.config import TcpConfig
    from manager.relay.kernel.admission import syn_trusted, tcp_listeners

    def set_limit(rate: float, burst: int) -> None:
        for key, limit in tcp_listeners(harness.dp.cfg, TcpConfig(port=TCP_PORT, syn_rate_per_source=rate,
                                                                   syn_burst_per_source=burst)).values():
            harness.dp.maps.tcp_listeners.update(key, limit)

    def syn(src: str, sport: int, flags: str = "S", dport: int = TCP_PORT) -> int:
        ip = IPv6(src=src, dst=VIP6) if ":" in src else IP(src=src, dst=VIP4)
        return harness.run(b(eth("client", "pub") / ip / TCP(sport=sport, dport=dport, flags=flags)), "pub")[0]

    set_limit(0.001, 3)
    try:
        before = harness.dp.counters()
        # 2,600 addresses of one /64 are one source.
        v6 = [syn(f"fd00:64:64:64::{i + 1:x}", 50000 + i) for i in range(8)]
        assert v6 == [XDP_PASS] * 3 + [XDP_DROP] * 5, v6
        assert syn("fd00:64:64:65::1", 50100) == XDP_PASS  # the next /64: its own bucket
        v4 = [syn("10.10.1.70", 51000 + i) for i in range(5)]
        assert v4 == [XDP_PASS] * 3 + [XDP_DROP] * 2, v4
        assert syn("10.10.1.71", 51100) == XDP_PASS  # another IPv4 address: its own bucket
        # The spent source's established segments and SYNs elsewhere still pass.
        assert syn("10.10.1.70", 51000, flags="A") == XDP_PASS
        assert syn("10.10.1.70", 51200, dport=22) == XDP_PASS
        after = harness.dp.counters()
        assert after["drop_tcp_syn_rate"][0] - before["drop_tcp_syn_rate"][0] == 7
        assert after["pass_tcp_syn"][0] - before["pass_tcp_syn"][0] == 3 + 1 + 3 + 1
        # A trusted proxy (tcp.trusted_proxies) is spared once over its bucket;
        # its neighbours are not.
        trusted = syn_trusted(TcpConfig(trusted_proxies=["10.10.1.70/32", "fd00:64:64:64::/64"]))
        for key in trusted.values():
            harness.dp.maps.syn_trusted.update(key, ctypes.c_uint32(1))
        assert syn("10.10.1.70", 51300) == XDP_PASS
        assert syn("fd00:64:64:64::99", 51301) == XDP_PASS
        assert [syn("10.10.1.71", 51400 + i) for i in range(3)][-1] == XDP_DROP
    finally:
        set_limit(0, 1)
        for key in syn_trusted(TcpConfig(trusted_proxies=["10.10.1.70/32", "fd00:64:64:64::/64"])).values():
            harness.dp.maps.syn_trusted.delete(key)


def test_a_flows_route_is_cached_and_follows_its_owner(harness):
    """XDP looks a flow's route up once and reuses it (struct nexthop); an
    ownership change (a new generation) makes it look again, so a moved call
    never goes to the old owner's next hop."""
    from manager.relay.kernel.structs import flow_key

    dp = harness.dp
    client = (CLIENT4, 40021)
    dp.set_owner(21, OwnerAddr(addr4=TX1_4, port4=OWNER_PORT))
    dp.add_flow(client, (VIP4, VIP_PORT), 21, 20021)
    key = flow_key(client, (VIP4, VIP_PORT))
    assert dp.maps.flows.lookup(key).nh.until_ns == 0
    verdict, out, _ = harness.run(b(c2r4(RTP, sport=client[1])))
    nh = dp.maps.flows.lookup(key).nh
    assert verdict == XDP_REDIRECT and nh.until_ns > 0 and bytes(nh.dmac) == bytes.fromhex(MAC["tx1"].replace(":", ""))
    # A cached route is used as it is: poison it and the packet follows it.
    info = dp.maps.flows.lookup(key)
    info.nh.dmac[:] = list(bytes.fromhex("02aabbccddee"))
    dp.maps.flows.update(key, info)
    verdict, out, _ = harness.run(b(c2r4(RTP, sport=client[1])))
    assert Ether(out).dst == "02:aa:bb:cc:dd:ee"
    # The call moves: the next packet looks its route up again, to tx2.
    dp.set_owner(21, OwnerAddr(addr4=TX2_4, port4=OWNER_PORT))
    verdict, out, _ = harness.run(b(c2r4(RTP, sport=client[1])))
    assert verdict == XDP_REDIRECT and Ether(out).dst == MAC["tx2"] and Ether(out)[IP].dst == TX2_4
    dp.remove_flow(client, (VIP4, VIP_PORT))
    dp.remove_owner(21)


def test_a_cached_rewrite_gives_the_frame_a_fresh_one_would(harness):
    """The route cache carries the rewrite's checksum changes (worked out at
    the fib lookup, not per packet): packets after the first, with other
    TTLs, payloads, lengths and checksums, must leave exactly as scapy
    builds them, in both directions and both families, and a zero IPv4 UDP
    checksum stays zero."""
    from manager.relay.kernel.structs import flow_key

    dp = harness.dp
    tx1 = OwnerAddr(addr4=TX1_4, port4=OWNER_PORT, addr6=TX1_6, port6=OWNER_PORT)
    dp.set_owner(31, tx1)
    c4, c6 = (CLIENT4, 40031), (CLIENT6, 40031)
    dp.add_flow(c4, (VIP4, VIP_PORT), 31, 20031)
    dp.add_flow(c6, (VIP6, VIP_PORT), 31, 20032)
    try:
        payloads = [(RTP, 64), (DTLS, 200), (RTP + b"x" * 101, 2), (STUN, 255)]
        for i, (payload, ttl) in enumerate(payloads):
            frame = eth("client", "pub") / IP(src=CLIENT4, dst=VIP4, ttl=ttl) / UDP(sport=c4[1], dport=VIP_PORT) / Raw(payload)
            want = eth("int", "tx1") / IP(src=INT4, dst=TX1_4, ttl=ttl - 1) / UDP(sport=20031, dport=OWNER_PORT) / Raw(payload)
            verdict, out, _ = harness.run(b(frame))
            assert verdict == XDP_REDIRECT and out == b(want), f"IPv4 client → owner, packet {i}"
            if i == 0:
                assert dp.maps.flows.lookup(flow_key(c4, (VIP4, VIP_PORT))).nh.until_ns > 0  # the rest: cached
            frame6 = (eth("client", "pub") / IPv6(src=CLIENT6, dst=VIP6, hlim=ttl)
                      / UDP(sport=c6[1], dport=VIP_PORT) / Raw(payload))
            want6 = (eth("int", "tx1") / IPv6(src=INT6, dst=TX1_6, hlim=ttl - 1)
                     / UDP(sport=20032, dport=OWNER_PORT) / Raw(payload))
            verdict, out, _ = harness.run(b(frame6))
            assert verdict == XDP_REDIRECT and out == b(want6), f"IPv6 client → owner, packet {i}"
            back = eth("tx1", "int") / IP(src=TX1_4, dst=INT4, ttl=ttl) / UDP(sport=OWNER_PORT, dport=20031) / Raw(payload)
            want_back = (eth("pub", "client") / IP(src=VIP4, dst=CLIENT4, ttl=ttl - 1)
                         / UDP(sport=VIP_PORT, dport=c4[1]) / Raw(payload))
            verdict, out, _ = harness.run(b(back), "int")
            assert verdict == XDP_REDIRECT and out == b(want_back), f"IPv4 owner → client, packet {i}"
        none = eth("client", "pub") / IP(src=CLIENT4, dst=VIP4) / UDP(sport=c4[1], dport=VIP_PORT, chksum=0) / Raw(RTP)
        verdict, out, _ = harness.run(b(none))
        assert verdict == XDP_REDIRECT and Ether(out)[UDP].chksum == 0 and out == b(r2o4(RTP, flow_port=20031, chksum=0))
    finally:
        dp.remove_flow(c4, (VIP4, VIP_PORT))
        dp.remove_flow(c6, (VIP6, VIP_PORT))
        dp.remove_owner(31)


def test_every_map_lookup_is_inlined_or_direct(harness):
    """The verifier inlines a lookup (or calls the map's own function) only
    where its call instruction always sees one map. A call site shared by two
    maps (the compiler sinks flows4's and flows6's lookups into one unless
    kept apart) falls back to the generic helper and an indirect call per
    packet. The loaded program, as the kernel rewrote it, must have none."""
    prog_id = libbpf.prog_info(harness.dp.prog_fd).id
    out = subprocess.run(["bpftool", "-j", "prog", "dump", "xlated", "id", str(prog_id)],
                         check=True, capture_output=True, text=True).stdout
    calls = [i["disasm"] for i in json.loads(out) if "call" in i.get("disasm", "")]
    assert any("__htab_map_lookup_elem" in c for c in calls)  # the inlined form is there to see
    assert [c for c in calls if "bpf_map_lookup_elem" in c] == []


def _rtp_with_ssrc(ssrc: int) -> bytes:
    return bytes([0x80, 111]) + b"\x00\x01" + b"\x00" * 4 + ssrc.to_bytes(4, "big") + b"r" * 40


def _rtp_from(harness, src: str, sport: int, ssrc: int) -> int:
    frame = bytes(eth("client", "pub") / IP(src=src, dst=VIP4) / UDP(sport=sport, dport=VIP_PORT)
                  / Raw(_rtp_with_ssrc(ssrc)))
    return harness.run(frame, "pub")[0]


def _moved(before: dict, after: dict) -> dict:
    return {k: after[k][0] - before[k][0] for k in after if after[k] != before[k]}


def test_rebind_candidates_have_a_bucket_per_ssrc(harness):
    """Media from unknown tuples carrying one live SSRC, from any number of
    sources: that SSRC's burst reaches the slow path, the rest is dropped
    under its own counter (not STUN's); another SSRC has its own bucket."""
    dp = harness.dp
    live, other = 0x11223344, 0x55667788
    dp.index_ssrc(live, (CLIENT4, 40000), (VIP4, VIP_PORT))
    dp.index_ssrc(other, (CLIENT4, 40004), (VIP4, VIP_PORT))
    try:
        _set_admission(harness, admit_source_rate=0, admit_budget=0, admit_call_rate=0,
                       admit_rebind_rate=0.001, admit_rebind_burst=4)
        before = dp.counters()
        verdicts = [_rtp_from(harness, f"10.10.1.{100 + i}", 34000 + i, live) for i in range(20)]
        assert verdicts == [XDP_PASS] * 4 + [XDP_DROP] * 16
        assert _rtp_from(harness, "10.10.1.130", 34100, other) == XDP_PASS  # another call is not held back
        assert _moved(before, dp.counters()) == {"pass_rebind": 5, "drop_rebind_call_rate": 16}
        # The source and global buckets count a candidate's drops apart from STUN's too.
        _set_admission(harness, admit_source_rate=0.001, admit_source_burst=1, admit_budget=0, admit_call_rate=0,
                       admit_rebind_rate=0)
        before = dp.counters()
        assert [_rtp_from(harness, "10.10.1.140", 34200 + i, live) for i in range(3)] == [XDP_PASS] + [XDP_DROP] * 2
        assert _moved(before, dp.counters()) == {"pass_rebind": 1, "drop_rebind_rate": 2}
    finally:
        _set_admission(harness, admit_source_rate=0, admit_budget=0, admit_call_rate=0, admit_rebind_rate=0)
        dp.maps.ssrcs.delete(ctypes.c_uint32(int.from_bytes(live.to_bytes(4, "big"), "little")))
        dp.maps.ssrcs.delete(ctypes.c_uint32(int.from_bytes(other.to_bytes(4, "big"), "little")))


def test_a_rate_limited_source_cannot_spend_a_calls_checks(harness):
    """The source's bucket is charged before the call's: one source past its
    rate, hammering a live call's ufrag, leaves the call's burst to others."""
    try:
        _set_admission(harness, admit_source_rate=0.001, admit_source_burst=1, admit_budget=0,
                       admit_call_rate=0.001, admit_call_burst=3)
        harness.dp.admit_ufrag(hx.LIVE_UFRAG)  # a fresh call bucket
        before = harness.dp.counters()
        assert [_stun_from(harness, "10.10.1.150", 35000 + i) for i in range(10)] == [XDP_PASS] + [XDP_DROP] * 9
        # Two more sources still get the call's other two checks.
        assert [_stun_from(harness, f"10.10.1.{151 + i}", 35100) for i in range(2)] == [XDP_PASS] * 2
        assert _moved(before, harness.dp.counters()) == {"pass_stun_unknown": 3, "drop_stun_rate": 9}
    finally:
        _set_admission(harness, admit_source_rate=0, admit_budget=0, admit_call_rate=0)
        harness.dp.admit_ufrag(hx.LIVE_UFRAG)


def test_a_source_is_its_configured_prefix(harness):
    """With limits.source_prefix_v4 = 24, every address of a /24 shares one
    bucket; the next /24 has its own. IPv6 by /48 alike."""
    from manager.relay.kernel import libbpf as lb
    from manager.relay.kernel.datapath import admit_config

    dp = harness.dp
    cfg = dp.cfg.model_copy(update={"admit_source_rate": 0.001, "admit_source_burst": 2, "admit_budget": 0,
                                    "admit_call_rate": 0})
    try:
        dp.maps.admit_cfg.update(ctypes.c_uint32(0), admit_config(cfg, lb.possible_cpus(), (24, 48)))
        assert [_stun_from(harness, f"10.20.1.{i}", 36000) for i in range(1, 5)] == [XDP_PASS] * 2 + [XDP_DROP] * 2
        assert _stun_from(harness, "10.20.2.1", 36000) == XDP_PASS
        six = [bytes(eth("client", "pub") / IPv6(src=f"fd00:77:1:{i}::1", dst=VIP6)
                     / UDP(sport=36001, dport=VIP_PORT) / Raw(STUN)) for i in range(4)]
        assert [harness.run(f, "pub")[0] for f in six] == [XDP_PASS] * 2 + [XDP_DROP] * 2
        # The default: /32 and /64, each address of the /24 its own source.
        dp.maps.admit_cfg.update(ctypes.c_uint32(0), admit_config(cfg, lb.possible_cpus()))
        assert [_stun_from(harness, f"10.20.3.{i}", 36000) for i in range(1, 5)] == [XDP_PASS] * 4
    finally:
        _set_admission(harness, admit_source_rate=0, admit_budget=0, admit_call_rate=0)


def test_the_owner_is_read_as_a_seqlock(harness):
    """The owner entry is read between two reads of its slot's epoch, each
    behind a full barrier (an atomic add, as BPF has no fence): the loaded
    program, as the kernel rewrote it, holds those atomic operations, and a
    flow's route is cached under the epoch it was read at."""
    prog_id = libbpf.prog_info(harness.dp.prog_fd).id
    out = subprocess.run(["bpftool", "-j", "prog", "dump", "xlated", "id", str(prog_id)],
                         check=True, capture_output=True, text=True).stdout
    atomics = [i["disasm"] for i in json.loads(out) if "atomic" in i.get("disasm", "") or "lock" in i.get("disasm", "")]
    # Two per owner read (two tries), two per route cache write.
    assert len(atomics) >= 4, atomics
