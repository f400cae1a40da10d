"""The slow path's bounds, as an attacker replaying one valid ufrag from many
client tuples would meet them: legs per call, unauthenticated legs per
source, quick expiry of those, and no reflection of the owner's error
replies. Real UDP sockets on the loopback of a namespace of its own (the
flow sockets' sk_lookup program attaches to it); the owner is a stand-in
socket."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
import uuid

import pytest
from aioice import stun

from manager.lab.netns import run_in_netns
from manager.protocol.addresses import OwnerAddr
from manager.protocol.ufrag import encode_ufrag
from manager.relay.config import DatapathConfig
from manager.relay.kernel.flow_sockets import FlowSockets
from manager.relay.registry import Registry
from manager.relay.slowpath import SlowPath
from tests.support.waiting import eventually_async

KEY = bytes(range(32))
LO = "127.0.0.1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LO, 0))
        return s.getsockname()[1]


def _udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((LO, 0))
    s.setblocking(False)
    return s


def check(ufrag: str) -> bytes:
    msg = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    msg.attributes["USERNAME"] = f"{ufrag}:cli1"
    msg.attributes["PRIORITY"] = 1
    return bytes(msg)


def _one_active_call() -> tuple[Registry, int, str]:
    """A registry with one active call whose owner is a port on loopback: (registry, conn_id, server ufrag)."""
    registry = Registry(heartbeat_timeout=3600.0)
    registry.register_transceiver(1, "http://127.0.0.1:1", 10)
    conn = registry.allocate_conn_id()
    ufrag = encode_ufrag(KEY, 1, conn)
    registry.add_call(conn_id=conn, transceiver_id=1, client_ufrag="cli1", server_ufrag=ufrag)
    registry.activate(conn, OwnerAddr(addr4=LO, port4=5000))
    return registry, conn, ufrag


def drain(sock: socket.socket) -> list[tuple[bytes, tuple]]:
    out = []
    while True:
        try:
            out.append(sock.recvfrom(2048))
        except BlockingIOError:
            return out


async def scenario(*, clients: int, **bounds) -> tuple[SlowPath, list[socket.socket], socket.socket, str]:
    registry = Registry(heartbeat_timeout=3600.0)
    registry.register_transceiver(1, "http://127.0.0.1:1", 10)
    owner = _udp()
    conn = registry.allocate_conn_id()
    ufrag = encode_ufrag(KEY, 1, conn)
    registry.add_call(conn_id=conn, transceiver_id=1, client_ufrag="cli1", server_ufrag=ufrag)
    registry.activate(conn, OwnerAddr(addr4=LO, port4=owner.getsockname()[1]))
    # Below the ephemeral range, where the test's own sockets get their ports.
    fs = FlowSockets(DatapathConfig(internal_addr4=LO, flow_port_min=20000, flow_port_max=20400))
    fs.open()
    sp = SlowPath(registry, None, fs, hint_key=KEY, vips=[(LO, _free_port())], **bounds)
    await sp.start()
    socks = [_udp() for _ in range(clients)]
    for s in socks:
        s.sendto(check(ufrag), sp.vips[0])
    # Until every check is accounted for (a loaded machine may take a while).
    seen = ("legs_opened", "drop_leg_cap", "drop_source_pending_cap")
    await eventually_async(lambda: sum(sp.stats[k] for k in seen) >= clients, 5, what="every check accounted for")
    await eventually_async(lambda: sp.stats["forward_in"] >= sp.stats["legs_opened"], 5,
                           what="the admitted checks forwarded to the owner")
    return sp, socks, owner, ufrag


async def drained(sock: socket.socket, n: int) -> list[tuple[bytes, tuple]]:
    """What reaches `sock`, once at least n packets have."""
    got: list[tuple[bytes, tuple]] = []
    await eventually_async(lambda: got.extend(drain(sock)) or len(got) >= n, what=f"{n} packet(s) received")
    return got


def run(coro):
    """Run a scenario in a namespace of its own, so the flow sockets' program
    and the loopback ports are the test's alone."""
    ns = f"srsp-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        # A guard against a hang, not a timing: bcc compiling the flow sockets'
        # program takes more than 20 s on an emulated CPU (make vm-test).
        return run_in_netns(ns, asyncio.run, asyncio.wait_for(coro, 120))
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)


def test_one_call_holds_at_most_max_legs() -> None:
    async def go() -> None:
        sp, socks, owner, _ = await scenario(clients=7, max_legs_per_call=4, max_pending_per_source=100)
        try:
            assert sp.stats["legs_opened"] == 4 and sp.stats["drop_leg_cap"] == 3, sp.stats
            assert len(drain(owner)) == 4  # only the admitted checks reached the owner
            assert len(sp.legs) == 4
        finally:
            await sp.stop()
            sp.flow_sockets.close()
            for s in [*socks, owner]:
                s.close()

    run(go())


def test_unauthenticated_legs_per_source_are_capped() -> None:
    async def go() -> None:
        sp, socks, owner, _ = await scenario(clients=5, max_legs_per_call=100, max_pending_per_source=3)
        try:
            assert sp.stats["legs_opened"] == 3 and sp.stats["drop_source_pending_cap"] == 2
        finally:
            await sp.stop()
            sp.flow_sockets.close()
            for s in [*socks, owner]:
                s.close()

    run(go())


def test_pending_legs_expire_quickly_and_free_their_slots() -> None:
    async def go() -> None:
        sp, socks, owner, ufrag = await scenario(clients=2, max_legs_per_call=2)
        try:
            assert len(sp.legs) == 2
            sp.expire(time.monotonic() + 4.0)  # within the 5 s default
            assert len(sp.legs) == 2
            sp.expire(time.monotonic() + 5.5)
            assert sp.legs == {} and sp.stats["legs_expired_pending"] == 2
            # The call's slots are free again.
            late = _udp()
            late.sendto(check(ufrag), sp.vips[0])
            await eventually_async(lambda: sp.legs, what="a leg for the late check")
            assert len(sp.legs) == 1
            late.close()
        finally:
            await sp.stop()
            sp.flow_sockets.close()
            for s in [*socks, owner]:
                s.close()

    run(go())


def test_error_replies_to_unauthenticated_legs_are_not_reflected() -> None:
    async def go() -> None:
        sp, socks, owner, _ = await scenario(clients=1)
        client = socks[0]
        try:
            ((data, flow_addr),) = drain(owner)
            request = stun.parse_message(data)
            error = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.ERROR,
                                 transaction_id=request.transaction_id)
            error.attributes["ERROR-CODE"] = (401, "Unauthorized")
            owner.sendto(bytes(error), flow_addr)
            await eventually_async(lambda: sp.stats["drop_error_to_pending"] >= 1, what="the error reply dropped")
            assert drain(client) == [] and sp.stats["drop_error_to_pending"] == 1
            # The owner's success for the forwarded check goes through (and installs the leg).
            ok = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE,
                              transaction_id=request.transaction_id)
            owner.sendto(bytes(ok), flow_addr)
            assert len(await drained(client, 1)) == 1
            (leg,) = sp.legs.values()
            assert leg.installed_at is not None and sp.stats["flows_installed"] == 1
        finally:
            await sp.stop()
            sp.flow_sockets.close()
            for s in [*socks, owner]:
                s.close()

    run(go())


@pytest.mark.parametrize("cap", [1, 3])
def test_installed_legs_leave_the_pending_count(cap: int) -> None:
    async def go() -> None:
        sp, socks, owner, ufrag = await scenario(clients=cap, max_pending_per_source=cap)
        try:
            for data, flow_addr in drain(owner):
                ok = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE,
                                  transaction_id=stun.parse_message(data).transaction_id)
                owner.sendto(bytes(ok), flow_addr)
            await eventually_async(lambda: sp.stats["flows_installed"] >= cap, what=f"{cap} legs installed")
            assert all(leg.installed_at is not None for leg in sp.legs.values())
            # All confirmed: the same source may start another leg.
            extra = _udp()
            extra.sendto(check(ufrag), sp.vips[0])
            await eventually_async(lambda: sp.stats["legs_opened"] > cap, what="another leg from the same source")
            assert sp.stats["legs_opened"] == cap + 1
            extra.close()
        finally:
            await sp.stop()
            sp.flow_sockets.close()
            for s in [*socks, owner]:
                s.close()

    run(go())


@pytest.mark.parametrize("kind,refusal", [("forged", "drop_forged_hint"), ("unknown-call", "drop_unknown_call"),
                                          ("stale", "drop_stale_hint")])
def test_the_slow_path_checks_the_hint_itself(kind: str, refusal: str) -> None:
    """Behind XDP's live-ufrag check, the slow path verifies the ufrag's MAC
    and its call on its own (a ufrag entry outliving its call, a datapath
    without XDP): each refusal opens nothing and sends nothing."""
    registry, conn, live = _one_active_call()
    sp = SlowPath(registry, None, FlowSockets(DatapathConfig(internal_addr4=LO)), hint_key=KEY, vips=[(LO, 3478)])
    ufrag = {"forged": live[:-4] + ("AAAA" if not live.endswith("AAAA") else "BBBB"),
             "unknown-call": encode_ufrag(KEY, 1, conn + 1 if conn < 0xFFFFFFFF else 1),
             "stale": encode_ufrag(KEY, 1, conn)}[kind]  # a valid MAC for the call's id, not its ufrag
    sp.on_client_packet((LO, 3478), check(ufrag), ("10.1.2.3", 40000))
    assert sp.stats[refusal] == 1 and sp.legs == {} and sp.stats["forward_in"] == 0


@pytest.mark.netns
def test_the_owner_entry_of_an_unknown_call_goes_with_its_last_flow() -> None:
    """A flow adopted after a restart whose call the registry never learns:
    when its last flow expires, its owner entry is removed from the kernel."""
    from manager.lab import xdp_harness as hx

    h = hx.build()
    try:
        registry = Registry()
        sp = SlowPath(registry, h.dp, FlowSockets(h.dp.cfg), hint_key=KEY, vips=[(hx.VIP4, hx.VIP_PORT)],
                      idle_timeout=0.05)
        owner = OwnerAddr(addr4=hx.TX1_4, port4=5000)
        h.dp.set_owner(99, owner)
        h.dp.add_flow((hx.CLIENT4, 40000), (hx.VIP4, hx.VIP_PORT), 99, 20001, owner)
        known = registry.allocate_conn_id()
        registry.register_transceiver(1, "http://10.10.2.2:8700", 5)
        registry.add_call(conn_id=known, transceiver_id=1, client_ufrag="cli1", server_ufrag="srv1srv1")
        registry.activate(known, owner)
        h.dp.set_owner(known, owner)
        h.dp.add_flow((hx.CLIENT4, 40001), (hx.VIP4, hx.VIP_PORT), known, 20002, owner)
        time.sleep(0.2)  # both flows older than the 0.05 s idle timeout
        sp.expire()
        assert h.dp.get_owner(99) is None and sp.stats["owners_removed_unknown"] == 1
        assert registry.get_call(known) is None  # a known call ends instead (its end removes the entry)
        assert h.dp.flows() == []
    finally:
        hx.teardown(h)


@pytest.mark.netns
def test_an_installed_leg_the_kernel_lost_expires_when_nothing_brings_it_back() -> None:
    """An evicted flow whose client is gone: the housekeeper finds the kernel
    without it, and after idle_timeout closes the leg and ends the call."""
    from manager.lab import xdp_harness as hx
    from manager.relay.slowpath import Leg

    h = hx.build()
    sock = _udp()
    try:
        registry = Registry()
        registry.register_transceiver(1, "http://10.10.2.2:8700", 5)
        conn = registry.allocate_conn_id()
        owner = OwnerAddr(addr4=hx.TX1_4, port4=5000)
        registry.add_call(conn_id=conn, transceiver_id=1, client_ufrag="cli1", server_ufrag="srv1srv1")
        registry.activate(conn, owner)
        sp = SlowPath(registry, h.dp, FlowSockets(h.dp.cfg), hint_key=KEY, vips=[(hx.VIP4, hx.VIP_PORT)],
                      idle_timeout=10.0)
        held, lost = ((hx.CLIENT4, 40000), (hx.VIP4, hx.VIP_PORT)), ((hx.CLIENT4, 40001), (hx.VIP4, hx.VIP_PORT))
        h.dp.add_flow(*held, conn, 20001, owner)
        for (client, vip), port in ((held, 20001), (lost, 20002)):
            leg = Leg(client=client, vip=vip, conn_id=conn, flow_port=port, installed_at=1.0)
            sp._add_leg(leg)
        def missing() -> set:
            kept: set = set()
            assert h.dp.expire_idle(3600.0, kept=kept) == []  # the housekeeper's walk, nothing idle
            return sp.evicted(kept)

        now = time.monotonic()
        assert missing() == {lost}
        sp.sweep_evicted(missing(), now)
        assert set(sp.legs) == {held, lost}  # first seen missing: wait for a STUN to bring it back
        sp.sweep_evicted(missing(), now + 11.0)
        assert set(sp.legs) == {held} and sp.stats["legs_expired_evicted"] == 1
        assert registry.get_call(conn) is not None  # it still has a leg
        h.dp.remove_flow(*held)
        sp.sweep_evicted(missing(), now + 12.0)
        sp.sweep_evicted(missing(), now + 23.0)
        assert sp.legs == {} and registry.get_call(conn) is None  # the last leg gone: the call ends
    finally:
        sock.close()
        hx.teardown(h)


def test_public_sockets_get_a_deep_receive_queue() -> None:
    """A burst of set-ups waits in the public socket's queue while the loop
    is busy: the queue is PUBLIC_RCVBUF (the kernel reports it doubled), not
    the system default of a few hundred datagrams."""
    from manager.relay import slowpath

    sock = slowpath._udp_socket((LO, 0))
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 2 * slowpath.PUBLIC_RCVBUF
    finally:
        sock.close()


@pytest.mark.netns
def test_the_return_path_repairs_itself() -> None:
    """An installed leg whose return entry the kernel lost (LRU), or whose
    call moved to an owner it has none for: the owner's next packet reaches
    the slow path (pass_return_unknown), which adds the entry back for the
    current owner; a non-owner's packet repairs nothing."""
    from manager.lab import xdp_harness as hx
    from manager.lab.xdp_harness import XDP_PASS, XDP_REDIRECT
    from manager.relay.slowpath import Leg
    from tests.support.xdp_frames import RTP, o2r4

    h = hx.build()
    try:
        registry = Registry()
        registry.register_transceiver(1, "http://10.10.2.2:8700", 5)
        conn = registry.allocate_conn_id()
        tx1, tx2 = OwnerAddr(addr4=hx.TX1_4, port4=5000), OwnerAddr(addr4=hx.TX2_4, port4=5000)
        registry.add_call(conn_id=conn, transceiver_id=1, client_ufrag="cli1", server_ufrag="srv1srv1")
        registry.activate(conn, tx1)
        sp = SlowPath(registry, h.dp, FlowSockets(h.dp.cfg), hint_key=KEY, vips=[(hx.VIP4, hx.VIP_PORT)])
        client, vip = (hx.CLIENT4, 40000), (hx.VIP4, hx.VIP_PORT)
        h.dp.set_owner(conn, tx1)
        h.dp.add_flow(client, vip, conn, 20001, tx1)
        leg = Leg(client=client, vip=vip, conn_id=conn, flow_port=20001, installed_at=1.0)
        sp._add_leg(leg)
        h.dp.remove_reverse((hx.TX1_4, 5000), 20001)  # evicted
        assert h.run(bytes(o2r4(RTP)), "int")[0] == XDP_PASS
        sp.on_owner_packet(leg, RTP, (hx.TX2_4, 5000))  # not the owner: nothing
        assert sp.stats["returns_repaired"] == 0
        sp.on_owner_packet(leg, RTP, (hx.TX1_4, 5000))
        assert sp.stats["returns_repaired"] == 1
        assert h.run(bytes(o2r4(RTP)), "int")[0] == XDP_REDIRECT
        # The call moves without its return entry: the new owner's packet repairs it.
        registry.set_owner(conn, 1, tx2)
        h.dp.set_owner(conn, tx2)
        assert h.run(bytes(o2r4(RTP, src=hx.TX2_4)), "int")[0] == XDP_PASS
        sp.on_owner_packet(leg, RTP, (hx.TX2_4, 5000))
        assert sp.stats["returns_repaired"] == 2
        assert h.run(bytes(o2r4(RTP, src=hx.TX2_4)), "int")[0] == XDP_REDIRECT
    finally:
        hx.teardown(h)


def _installed_call(h, hx, sp_kw: dict):
    """A call with one installed leg (kernel flow and slow-path leg) on the harness."""
    from manager.relay.slowpath import Leg

    registry = Registry(heartbeat_timeout=3600.0)
    registry.register_transceiver(1, "http://10.10.2.2:8700", 5)
    conn = registry.allocate_conn_id()
    owner = OwnerAddr(addr4=hx.TX1_4, port4=5000)
    registry.add_call(conn_id=conn, transceiver_id=1, client_ufrag="cli1", server_ufrag="srv1srv1")
    registry.activate(conn, owner)
    sp = SlowPath(registry, h.dp, FlowSockets(h.dp.cfg), hint_key=KEY, vips=[(hx.VIP4, hx.VIP_PORT)], **sp_kw)
    client, vip = (hx.CLIENT4, 40000), (hx.VIP4, hx.VIP_PORT)
    h.dp.set_owner(conn, owner)
    h.dp.add_flow(client, vip, conn, 20001, owner)
    leg = Leg(client=client, vip=vip, conn_id=conn, flow_port=20001, installed_at=time.monotonic())
    sp._add_leg(leg)
    return registry, sp, leg, conn


@pytest.mark.netns
def test_a_flow_put_back_while_the_expiry_walk_ran_is_kept() -> None:
    """The housekeeper's walk (in a thread) found the flow idle and removed
    it; before the loop looked at what the walk returned, the client's packet
    reached the slow path and the flow was installed again. The leg is live:
    it must stay, and its call with it. The hook runs the loop's re-install
    between the walk and the loop's decisions, every time."""
    from manager.lab import xdp_harness as hx

    h = hx.build()
    try:
        async def go() -> None:
            registry, sp, leg, conn = _installed_call(h, hx, {"idle_timeout": 0.05})
            loop = asyncio.get_running_loop()
            await asyncio.sleep(0.2)  # pacing: the flow's last packet is older than idle_timeout
            real = h.dp.expire_idle

            def walk_then_client_returns(*args, **kw):
                expired = real(*args, **kw)
                assert [f.client for f in expired] == [leg.client]  # the walk removed it...
                done = threading.Event()
                # ...and the client's next packet, reaching the slow path, puts it back.
                loop.call_soon_threadsafe(lambda: (sp._install(leg, again=True), done.set()))
                assert done.wait(10)
                return expired

            h.dp.expire_idle = walk_then_client_returns
            removed, _ = await sp.expire_kernel()
            assert removed == [] and sp.stats["expiry_raced_live_flow"] == 1
            assert sp.legs == {(leg.client, leg.vip): leg} and h.dp.has_flow(leg.client, leg.vip)
            assert registry.get_call(conn) is not None and h.dp.get_owner(conn) is not None

        asyncio.run(go())
    finally:
        hx.teardown(h)


@pytest.mark.netns
def test_expiry_walks_never_overlap() -> None:
    """The control API's /expire and the housekeeper share one lock: a second
    walk starts only when the first is done."""
    from manager.lab import xdp_harness as hx

    h = hx.build()
    try:
        async def go() -> None:
            _, sp, _, _ = _installed_call(h, hx, {"idle_timeout": 3600.0})
            real, inside, most, release = h.dp.expire_idle, [0], [0], threading.Event()

            def held_walk(*args, **kw):
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                try:
                    assert release.wait(10)
                    return real(*args, **kw)
                finally:
                    inside[0] -= 1

            h.dp.expire_idle = held_walk
            first = asyncio.ensure_future(sp.expire_kernel())
            second = asyncio.ensure_future(sp.expire_kernel(0.0))
            await eventually_async(lambda: inside[0] >= 1, 10, what="the first walk under way")
            await asyncio.sleep(0.3)  # pacing: time for a second walk to start, were it allowed to
            assert most[0] == 1
            release.set()
            await asyncio.gather(first, second)
            assert most[0] == 1

        asyncio.run(go())
    finally:
        hx.teardown(h)


def _rtp(ssrc: int, seq: int, tag: bytes = b"") -> bytes:
    return bytes([0x80, 111]) + seq.to_bytes(2, "big") + bytes(4) + ssrc.to_bytes(4, "big") + tag + bytes(40)


@pytest.mark.netns
def test_a_real_rebinding_gets_through_a_spoof_flood_of_its_ssrc() -> None:
    """The live-SSRC spoof: RTP with the call's SSRC from a new source each
    packet, 280 for each packet of the real client that moved (14,000/s
    against its 50/s). No spoof reaches the owner (a check waits for a
    tuple's second packet), and the real client moves at its second packet."""
    from manager.lab import xdp_harness as hx

    h = hx.build()
    try:
        async def go() -> None:
            checks: list[tuple[str, int]] = []
            ssrc, moved = 0x1234ABCD, (hx.CLIENT4, 40999)

            async def owner_check(conn_id: int, packet: bytes, path=None) -> bool:
                checks.append(packet[12:16])
                return packet[12:16] == b"REAL"  # the owner authenticates only the real client's media

            _, sp, leg, _ = _installed_call(h, hx, {"check_media": owner_check})
            h.dp.index_ssrc(ssrc, leg.client, leg.vip)  # the kernel learnt the leg's SSRC
            for i in range(2 * 280):
                spoof = (f"10.77.{i // 250}.{i % 250}", 1024 + i)
                sp.on_client_packet(leg.vip, _rtp(ssrc, i, b"EVIL"), spoof)
                if i % 280 == 279:
                    sp.on_client_packet(leg.vip, _rtp(ssrc, i, b"REAL"), moved)
                await asyncio.sleep(0)  # a yield: the checks the spoof asks for run between packets
            await eventually_async(lambda: leg.client == moved, 5, what="the real client's rebinding")
            assert checks == [b"REAL"], checks
            assert sp.stats["rebind_first_packet"] == 2 * 280 + 1 and sp.stats["legs_rebound"] == 1
            assert h.dp.has_flow(moved, leg.vip)

        asyncio.run(go())
    finally:
        hx.teardown(h)


@pytest.mark.netns
def test_media_checks_of_one_call_have_a_budget() -> None:
    """Spoofers that repeat their tuples pass the second-packet rule: the
    call's own bucket bounds the checks its owner is asked for, and every
    refusal is counted."""
    from manager.lab import xdp_harness as hx

    h = hx.build()
    try:
        async def go() -> None:
            checks: list[bytes] = []

            async def owner_check(conn_id: int, packet: bytes, path=None) -> bool:
                checks.append(packet)
                return False

            _, sp, leg, _ = _installed_call(h, hx, {"check_media": owner_check, "rebind_call_rate": 0.001,
                                                    "rebind_call_burst": 8})
            h.dp.index_ssrc(0x55, leg.client, leg.vip)
            for i in range(50):
                for seq in range(2):
                    sp.on_client_packet(leg.vip, _rtp(0x55, seq), (f"10.78.0.{i + 1}", 2000 + i))
                    await asyncio.sleep(0)  # each check answered before the next packet
            await eventually_async(lambda: sp.stats["rebind_refused"] == 8, 5, what="the refusals")
            assert len(checks) == 8 and sp.stats["drop_rebind_call_budget"] == 42
            assert leg.client == (hx.CLIENT4, 40000)

        asyncio.run(go())
    finally:
        hx.teardown(h)


def test_the_public_socket_has_a_backstop_per_source() -> None:
    """Whatever the kernel still delivers from tuples with no leg is bounded
    per source (then in all) in Python too, and counted. A source of its own
    is unaffected by another's flood."""
    async def go() -> None:
        registry = Registry(heartbeat_timeout=3600.0)
        sp = SlowPath(registry, None, FlowSockets(DatapathConfig(internal_addr4=LO)), hint_key=KEY,
                      vips=[(LO, 3478)], source_rate=0.001, source_burst=5)
        forged = check("A" * 24)
        for port in range(1000, 1020):  # one source, many tuples
            sp.on_client_packet((LO, 3478), forged, ("10.1.2.3", port))
        assert sp.stats["drop_forged_hint"] == 5 and sp.stats["drop_source_backstop"] == 15
        sp.on_client_packet((LO, 3478), forged, ("10.1.2.4", 1000))
        assert sp.stats["drop_forged_hint"] == 6

    asyncio.run(go())


def test_unauthenticated_legs_are_capped_per_source_prefix() -> None:
    """The pending cap counts a source as SourceKey says (here IPv4 /24): two
    addresses of one /24 share it."""
    from manager.protocol.sources import SourceKey

    async def go() -> None:
        registry, _, ufrag = _one_active_call()
        sp = SlowPath(registry, None, FlowSockets(DatapathConfig(internal_addr4=LO)), hint_key=KEY,
                      vips=[(LO, 3478)], max_pending_per_source=2, source_key=SourceKey(prefix_v4=24))
        assert sp._admit(check(ufrag), ("10.1.2.3", 1000)) is not None
        sp._pending_per_source.add(sp.source_key("10.1.2.3"))
        sp._pending_per_source.add(sp.source_key("10.1.2.3"))
        assert sp._admit(check(ufrag), ("10.1.2.200", 1000)) is None  # same /24: full
        assert sp.stats["drop_source_pending_cap"] == 1
        assert sp._admit(check(ufrag), ("10.1.3.1", 1000)) is not None

    asyncio.run(go())
