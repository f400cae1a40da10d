"""Flow sources: (pool address, port) pairs instead of one socket per flow
port, so concurrent flows are bounded by the address and port plan.

The scale test runs the real path for more than 40,000 legs of IPv4 alone
(the old cap, one flow port and socket each, for all families together):
checks enter the slow path, leave through the raw sender from their flow
source, a real owner socket answers each, the answers come back through the
sk_lookup program to the shared socket, and the slow path installs the flows
in the kernel maps; the real XDP program then forwards sampled flows from
their own pool address."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket

import pytest
from aioice import stun
from pydantic import ValidationError
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from manager.lab import xdp_harness as hx
from manager.protocol.addresses import OwnerAddr
from manager.protocol.ufrag import encode_ufrag
from manager.relay.config import DatapathConfig, RelaydConfig
from manager.relay.kernel.flow_sockets import FlowSockets
from manager.relay.registry import Registry
from manager.relay.slowpath import FlowSources, SlowPath
from tests.support.waiting import NotYet, eventually_async

LEGS = 50_000
RTP = bytes([0x80, 111]) + b"\x00\x01" + b"\x00" * 8 + b"r" * 40


def test_flow_sources_cover_every_address_and_port_once():
    src = FlowSources(3, 100, 104)
    taken = [src.take() for _ in range(15)]
    assert len(set(taken)) == 15 == src.size == src.in_use
    assert {a for _, a in taken} == {0, 1, 2} and {p for p, _ in taken} == set(range(100, 105))
    assert taken[:3] == [(100, 0), (100, 1), (100, 2)]  # spread over the addresses first
    with pytest.raises(OSError, match="all 15 flow sources are in use"):
        src.take()
    src.give_back(taken[4])
    src.give_back(taken[1])
    assert [src.take(), src.take()] == [taken[4], taken[1]]  # freed ones, oldest first


def test_reserved_sources_are_never_handed_out():
    src = FlowSources(2, 100, 101)
    assert src.reserve((100, 1)) and src.reserve((101, 0))
    assert not src.reserve((102, 0)) and not src.reserve((100, 2))  # outside the plan
    assert sorted([src.take(), src.take()]) == [(100, 0), (101, 1)]
    with pytest.raises(OSError):
        src.take()
    src.give_back((100, 1))  # an adopted flow's source, freed: it goes round again
    assert src.take() == (100, 1)


def _relayd(**dp) -> dict:
    # 40,000 flow ports a pool address (a range the host reserves), so the plans below are round.
    return {"hint_key": "ab" * 32, "datapath": {"vips": [{"addr": "10.10.1.1", "port": 3478}],
                                                 "internal_addr4": "10.10.0.1", "flow_port_min": 20000,
                                                 "flow_port_max": 59999, **dp}}


def test_config_refuses_maps_smaller_than_the_plan():
    with pytest.raises(ValidationError, match=r"datapath.max_flows: 65536 entries cannot hold the 80000 IPv4 flows"):
        RelaydConfig.model_validate(_relayd(internal_addr_count=2, max_flows=65536))
    with pytest.raises(ValidationError, match=r"datapath.max_reverse"):
        RelaydConfig.model_validate(_relayd(internal_addr_count=2, max_flows=1 << 17, max_reverse=65536))
    ok = RelaydConfig.model_validate(_relayd(internal_addr_count=26))  # 26 x 40,000 = 1,040,000 ≤ 1M entries
    assert ok.datapath.flow_plan() == 1_040_000
    with pytest.raises(ValidationError, match="max_flows"):
        RelaydConfig.model_validate(_relayd(internal_addr_count=27))
    # IPv6 flows have a map of their own (flows6), sized by max_flows6.
    six = {"vips": [{"addr": "10.10.1.1", "port": 3478}, {"addr": "fd10::1", "port": 3478}],
           "internal_addr6": "fd10::100", "internal_addr_count": 7}  # 7 x 40,000 = 280,000 per family
    with pytest.raises(ValidationError, match=r"datapath.max_flows6: 262144 entries cannot hold the 280000 IPv6 flows"):
        RelaydConfig.model_validate(_relayd(**six))
    both = RelaydConfig.model_validate(_relayd(**six, max_flows6=280_000))
    assert both.datapath.flow_plan() == 560_000 and both.datapath.flow_plan_per_family() == 280_000


def test_config_refuses_a_pool_that_runs_off_its_last_word():
    with pytest.raises(ValidationError, match="internal_addr4: 3 addresses from 255.255.255.254 run past"):
        DatapathConfig(internal_addr4="255.255.255.254", internal_addr_count=3)
    with pytest.raises(ValidationError, match="internal_addr6"):
        DatapathConfig(internal_addr6="fd00::ffff:fffe", internal_addr_count=3)
    assert DatapathConfig(internal_addr6="fd00::fffe", internal_addr_count=3).pool("fd00::fffe")[-1] == "fd00::1:0"


def _check(ufrag: str, n: int) -> bytes:
    msg = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST,
                       transaction_id=n.to_bytes(12, "big"))
    msg.attributes["USERNAME"] = f"{ufrag}:cli1"
    return bytes(msg)


async def _answer(owner: socket.socket, stop: asyncio.Event) -> int:
    """The owner: a Binding success for every check, to the flow source it came from."""
    answered = 0
    while not stop.is_set():
        try:
            data, addr = owner.recvfrom(2048)
        except BlockingIOError:
            await asyncio.sleep(0.002)  # nothing queued: poll the socket again shortly
            continue
        req = stun.parse_message(data)
        ok = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE,
                          transaction_id=req.transaction_id)
        owner.sendto(bytes(ok), addr)
        answered += 1
        if answered % 256 == 0:
            await asyncio.sleep(0)  # let the filler run
    return answered


async def _fill(h: hx.Harness, fs: FlowSockets) -> tuple[list, dict]:
    """Open LEGS legs through the slow path; (the installed legs, its counters)."""
    owner = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    owner.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: hold a burst of checks
    owner.bind(("10.10.2.1", 5000))  # the relay's own internal-side address: local, and in no pool
    owner.setblocking(False)
    registry = Registry(heartbeat_timeout=3600.0)
    registry.register_transceiver(1, "http://10.10.2.1:8700", 100)
    conn = registry.allocate_conn_id()
    ufrag = encode_ufrag(hx.HINT_KEY, 1, conn)
    registry.add_call(conn_id=conn, transceiver_id=1, client_ufrag="cli1", server_ufrag=ufrag)
    registry.activate(conn, OwnerAddr(addr4="10.10.2.1", port4=5000))
    sp = SlowPath(registry, h.dp, fs, hint_key=hx.HINT_KEY, vips=[(hx.VIP4, hx.VIP_PORT)],
                  max_legs_per_call=LEGS, max_pending_per_source=LEGS, idle_timeout=3600.0, pending_timeout=600.0,
                  source_rate=0, budget_rate=0)  # one client address, 50,000 tuples: no admission here
    await sp.start()
    stop = asyncio.Event()
    answering = asyncio.create_task(_answer(owner, stop))
    try:
        vip = (hx.VIP4, hx.VIP_PORT)
        for n in range(LEGS):
            # One client address (the harness has its neighbour entry), many ports.
            client = (hx.CLIENT4, 1024 + n)
            sp.on_client_packet(vip, _check(ufrag, n), client)
            if n % 250 == 249:
                await asyncio.sleep(0.005)  # pacing: bursts the local delivery backlog can hold
        # As ICE does: checks whose answer was lost on a loaded machine (the
        # local delivery backlog holds 1,000 packets) are sent again.
        for _ in range(10):
            with contextlib.suppress(NotYet):  # then send the unanswered ones again
                await eventually_async(lambda: sp.stats["flows_installed"] >= LEGS, 3,
                                       what="every leg installed", interval=0.05)
            pending = [leg for leg in sp.legs.values() if leg.installed_at is None]
            if not pending:
                break
            for i, leg in enumerate(pending):
                sp.on_client_packet(vip, _check(ufrag, LEGS + i), leg.client)
                if i % 250 == 249:
                    await asyncio.sleep(0.005)  # pacing, as above
        return [leg for leg in sp.legs.values() if leg.installed_at is not None], dict(sp.stats)
    finally:
        stop.set()
        await answering
        await sp.stop()  # kernel flows stay
        owner.close()


@pytest.mark.netns
def test_more_than_40k_flows_of_one_family_through_the_real_path():
    h = hx.build(max_flows=1 << 17, flow_ports=(20000, 39999))  # 3 addresses x 20,000 ports per family
    fs = FlowSockets(h.dp.cfg)
    try:
        h.ex.call(fs.open)  # in the harness's namespace: its program and sockets are there
        installed, stats = h.ex.call(asyncio.run, _fill(h, fs))
        assert stats["legs_opened"] == LEGS and len(installed) == LEGS, sorted(stats.items())
        sources = {leg.source for leg in installed}
        assert len(sources) == LEGS and {a for _, a in sources} == {0, 1, 2}
        assert max(p for p, _ in sources) - min(p for p, _ in sources) + 1 < LEGS  # ports alone would not do
        assert h.dp.reverse_index_size() == LEGS
        # The kernel forwards sampled flows from their own flow source, both
        # ways. The owner above is local (so it could answer for real), which
        # XDP hands to the stack; the call moves to tx1 first, as a migration
        # would: return entries for tx1, then the owner entry.
        sample = random.Random(7).sample(installed, 300)
        tx1 = OwnerAddr(addr4=hx.TX1_4, port4=5000)
        for leg in sample:
            h.dp.add_reverse((hx.TX1_4, 5000), leg.flow_port, leg.client, leg.vip, leg.conn_id, leg.flow_addr)
        h.dp.set_owner(sample[0].conn_id, tx1)
        for leg in sample:
            frame = (Ether(src=hx.MAC["client"], dst=hx.MAC["pub"]) / IP(src=leg.client[0], dst=hx.VIP4)
                     / UDP(sport=leg.client[1], dport=hx.VIP_PORT) / Raw(RTP))
            verdict, out, _ = h.run(bytes(frame), "pub")
            assert verdict == hx.XDP_REDIRECT
            pkt = Ether(out)
            assert (pkt[IP].src, pkt[UDP].sport) == (hx.POOL4[leg.flow_addr], leg.flow_port)
            back = (Ether(src=hx.MAC["tx1"], dst=hx.MAC["int"]) / IP(src=hx.TX1_4, dst=hx.POOL4[leg.flow_addr])
                    / UDP(sport=5000, dport=leg.flow_port) / Raw(RTP))
            h.run(bytes(back), "int")
        counters = {k: v[0] for k, v in h.dp.counters().items()}
        assert counters["fwd_out_rtp"] == 300  # every return found its flow
        assert counters["pass_return_unknown"] == 0 and counters["drop_not_owner"] == 0
    finally:
        fs.close()
        hx.teardown(h)
