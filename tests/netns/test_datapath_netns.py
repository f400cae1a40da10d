"""Real packets through the XDP fast path: client ns — relay ns — two
transceiver ns over veth, native XDP, real UDP sockets, IPv4 and IPv6.

A steady 1,000 packets/s stream flows each way while ownership of the call
moves from the first transceiver to the second: no packet may be lost, and
the return path must follow. The receiving kernels verify every UDP checksum
(a bad one is a loss, and shows in InCsumErrors).
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import uuid

import pytest

from manager.lab.lifecycle import lab as lab_ctx
from manager.lab.model import Lab
from manager.relay.config import DatapathConfig, Endpoint
from manager.relay.kernel.datapath import Datapath, OwnerAddr, xdp_attachment
from tests.support.udp_streams import (
    Receiver,
    paced_send,
    settle,
    snmp_udp,
)
from tests.support.waiting import eventually

pytestmark = pytest.mark.netns

RATE = 1000          # packets per second, each direction, each family
DURATION = 3.0       # seconds of stream; the switch happens half-way
CONN = 42
TX_PORT = {1: 5000, 2: 6000}
CLIENT_PORT = 40000
FLOW_PORT = {socket.AF_INET: 20001, socket.AF_INET6: 20002}


@pytest.fixture(scope="module")
def relay():
    with lab_ctx(prefix=f"dp{uuid.uuid4().hex[:6]}") as lab:
        cfg = DatapathConfig(
            pin_dir=f"/sys/fs/bpf/{lab.prefix}",
            interfaces=[lab.public_ifname, *lab.internal_ifnames],
            xdp_mode="native",
            vips=[Endpoint(addr=lab.vip4, port=lab.port), Endpoint(addr=lab.vip6, port=lab.port)],
            internal_addr4=lab.internal4, internal_addr6=lab.internal6,
            max_flows=4096, max_reverse=4096, max_owners=1024,
        )
        dp = Datapath(cfg)
        ex = lab.executor("relay")
        try:
            dp.load(upgrade=True)
            ex.call(dp.attach)
            warm_neighbours(lab)
            yield lab, dp, ex
        finally:
            try:
                ex.call(dp.detach, purge=True)
            finally:
                dp.close()
                ex.shutdown()


def warm_neighbours(lab: Lab) -> None:
    """Resolve the relay's neighbours first (the slow path does this for real
    calls): without an entry the fast path hands packets to the kernel."""
    peers = [lab.client, *lab.transceivers]
    for ep in peers:
        for addr, fam in ((ep.addr4, socket.AF_INET), (ep.addr6, socket.AF_INET6)):
            with lab.socket("relay", fam) as s:
                s.sendto(b"warm", (addr, 9))
    want = {ep.addr4 for ep in peers} | {ep.addr6 for ep in peers}

    def resolved() -> bool:
        out = subprocess.run(["ip", "-j", "-n", lab.relay_ns, "neigh"], capture_output=True, text=True).stdout
        ok = {n["dst"] for n in json.loads(out or "[]") if set(n.get("state", [])) & {"REACHABLE", "STALE", "DELAY"}}
        assert want <= ok, f"unresolved: {want - ok}"
        return True

    eventually(resolved, 5, what="the relay's neighbours resolved", interval=0.05)








@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_stream_survives_ownership_move(relay, family):
    lab, dp, _ = relay
    v6 = family == socket.AF_INET6
    tx1, tx2 = lab.transceivers[0], lab.transceivers[1]
    vip = lab.vip(family)
    client_addr = (lab.client.addr6 if v6 else lab.client.addr4, CLIENT_PORT)
    owner = {k: (ep.addr6 if v6 else ep.addr4, TX_PORT[k]) for k, ep in ((1, tx1), (2, tx2))}
    flow_port = FLOW_PORT[family]
    conn = CONN + (1 if v6 else 0)

    c_sock = lab.socket("client", family, bind=client_addr)
    t_sock = {k: lab.socket(ep.ns, family, bind=owner[k]) for k, ep in ((1, tx1), (2, tx2))}
    snmp_before = {ns: snmp_udp(lab, ns, family) for ns in (lab.client_ns, tx1.ns, tx2.ns)}
    counters_before = dp.counters()

    # The call as the slow path would install it, owned by tx1.
    dp.set_owner(conn, OwnerAddr(**({"addr6": owner[1][0], "port6": owner[1][1]} if v6
                                    else {"addr4": owner[1][0], "port4": owner[1][1]})))
    dp.add_flow(client_addr, vip, conn, flow_port)
    relay_side = (lab.internal6 if v6 else lab.internal4, flow_port)

    receivers = {"client": Receiver(c_sock), 1: Receiver(t_sock[1]), 2: Receiver(t_sock[2])}
    for r in receivers.values():
        r.start()
    n = int(RATE * DURATION)
    half = n // 2
    try:
        up = threading.Thread(target=paced_send, args=(c_sock, vip, range(n), RATE))
        up.start()
        # Down: tx1 streams to the client through its flow port until the
        # switch, then tx2 carries on from the next sequence number.
        sent_tx1 = paced_send(t_sock[1], relay_side, range(half), RATE)
        # Migration: stage tx2's return entry (inert), flip the owner in one
        # update, then retire tx1's entry.
        dp.add_reverse(owner[2], flow_port, client_addr, vip, conn)
        gen = dp.set_owner(conn, OwnerAddr(**({"addr6": owner[2][0], "port6": owner[2][1]} if v6
                                              else {"addr4": owner[2][0], "port4": owner[2][1]})))
        dp.remove_reverse(owner[1], flow_port)
        sent_tx2 = paced_send(t_sock[2], relay_side, range(half, n), RATE)
        up.join()
        settle({"up": [receivers[1], receivers[2]], "down": [receivers["client"]]}, n)
    finally:
        for r in receivers.values():
            r.stop.set()
        for r in receivers.values():
            r.join()
        for s in (c_sock, *t_sock.values()):
            s.close()

    assert gen == 2 and sent_tx1 + sent_tx2 == n
    up_seqs = receivers[1].seqs + receivers[2].seqs
    lost_up = set(range(n)) - set(up_seqs)
    lost_down = set(range(n)) - set(receivers["client"].seqs)
    print(f"\n{'IPv6' if v6 else 'IPv4'}: {n} packets each way at {RATE}/s; up: tx1 {len(receivers[1].seqs)}, "
          f"tx2 {len(receivers[2].seqs)}, lost {len(lost_up)}; down: {len(receivers['client'].seqs)}, lost {len(lost_down)}")
    assert not lost_up, f"client→transceiver lost {sorted(lost_up)[:10]}"
    assert not lost_down, f"transceiver→client lost {sorted(lost_down)[:10]}"
    assert len(up_seqs) == n and len(receivers["client"].seqs) == n, "duplicates"
    # The switch is clean: tx1 saw a prefix of the stream, tx2 the rest.
    assert receivers[1].seqs and receivers[2].seqs
    assert max(receivers[1].seqs) < min(receivers[2].seqs)
    # Transceivers saw only the relay-internal flow port; the client only the VIP.
    assert receivers[1].sources == {relay_side} and receivers[2].sources == {relay_side}
    assert receivers["client"].sources == {vip}
    # The fast path did the forwarding, and every checksum verified.
    after = dp.counters()
    assert after["fwd_in_rtp"][0] - counters_before["fwd_in_rtp"][0] >= n
    assert after["fwd_out_rtp"][0] - counters_before["fwd_out_rtp"][0] >= n
    for ns in (lab.client_ns, tx1.ns, tx2.ns):
        now = snmp_udp(lab, ns, family)
        assert now["InCsumErrors"] == snmp_before[ns]["InCsumErrors"], ns
        assert now["InErrors"] == snmp_before[ns]["InErrors"], ns
    flow = dp.get_flow(client_addr, vip)
    assert flow.packets_in >= n and flow.packets_out >= n - half  # tx2's entry; tx1's was retired


def test_attached_natively_and_adopted(relay):
    """The program sits on every relay interface in native mode; a second
    loader (a restarted manager) adopts it instead of replacing it."""
    lab, dp, ex = relay
    ids = {}
    for ifname in [lab.public_ifname, *lab.internal_ifnames]:
        prog_id, mode = ex.call(xdp_attachment, ifname)
        assert mode == "native", ifname
        ids[ifname] = prog_id
    out = subprocess.run(["ip", "-j", "-n", lab.relay_ns, "link", "show", "dev", "pub0"], capture_output=True, text=True).stdout
    assert json.loads(out)[0]["xdp"]["prog"]["id"] == ids["pub0"]
    again = Datapath(dp.cfg)
    try:
        assert again.load() is True
        results = ex.call(again.attach)
        assert all(r.adopted for r in results)
        assert {ifname: ex.call(xdp_attachment, ifname)[0] for ifname in ids} == ids
    finally:
        again.close()
