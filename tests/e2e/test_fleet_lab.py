"""A fleet of two relays on a real redis-server, end to end: relayd processes
with XDP in their own namespaces behind an edge router that routes the VIP
to one of them, transceivers registered with both, unmodified aiortc clients.

Each test starts from the VIP routed to relay 1 and both relays up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import socket
import time
import urllib.error
import urllib.request

import pytest

from manager.lab.capture import WireClock, is_rtp, longest_gap
from manager.lab.client import client_call
from manager.lab.netns import NetnsExecutor, _ipr
from manager.lab.routing import route_vip, set_relay_links
from manager.lab.services import running_lab
from tests.support.lab_calls import assert_untouched, audio_flowing, ssrc_published, vip_at_relay_1
from tests.support.waiting import NotYet, eventually_async

# realtime: the checks count media against the wall clock.
pytestmark = [pytest.mark.netns, pytest.mark.realtime]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with running_lab(f"fl{secrets.token_hex(3)}", tmp_path_factory.mktemp("fleet"), relays=2) as (lab, svc):
        yield lab, svc


@pytest.fixture
def fleet(env):
    with vip_at_relay_1(env[0]):
        yield env


def call(lab, url=None, **kw):
    with NetnsExecutor(lab.client_ns) as ex:
        return ex.call(asyncio.run, client_call(url or lab.signaling_url, **kw))


def fast_forwarded(svc, relay: int) -> int:
    rows = svc.control_of(relay).stats()["fastpath"]["counters"]
    return sum(r["packets"] for r in rows if r["name"].startswith("fwd_"))


def events(svc, relay: int) -> dict:
    return svc.control_of(relay).stats()["slowpath"]["events"]


def session(svc, relay: int, call_id: str) -> dict | None:
    return next((s for s in svc.control_of(relay).sessions()["sessions"] if s["call_id"] == call_id), None)


def active_session(svc, relay: int) -> dict | None:
    return next((s for s in svc.control_of(relay).sessions()["sessions"] if s["state"] == "active"), None)


def test_first_stun_at_another_relay_than_the_offer(fleet):
    """The offer goes to relay 1's own address; the VIP routes to relay 2, so
    the client's checks and media reach relay 2, which verifies the hint,
    finds the call (placed by relay 1) in the shared registry and installs it."""
    lab, svc = fleet
    route_vip(lab, 2)
    before = {r: (events(svc, r).get("flows_installed", 0), fast_forwarded(svc, r)) for r in (1, 2)}
    rep = call(lab, lab.relay_signaling_url(1), duration=2.0, messages=4)
    assert_untouched(rep)
    assert rep.tone_ratio > 0.5 and rep.dc_echoed == rep.dc_sent == 4
    assert rep.hangup_status == 204  # relay 1 ends the call relay 2 served
    after = {r: (events(svc, r).get("flows_installed", 0), fast_forwarded(svc, r)) for r in (1, 2)}
    assert after[2][0] > before[2][0] and after[1][0] == before[1][0], (before, after)
    assert after[2][1] - before[2][1] > 100  # relay 2's XDP carried the media
    assert after[1][1] == before[1][1]


def test_a_migration_asked_of_one_relay_reaches_both_kernels(fleet):
    lab, svc = fleet
    seen: dict = {}

    async def migrate_on_relay2(pc, rep):
        await audio_flowing(pc)
        s = await eventually_async(lambda: asyncio.to_thread(active_session, svc, 2), 10,
                                   what="relay 2 to know the active call")
        target = 2 if s["transceiver"] == 1 else 1
        seen.update(call_id=s["call_id"], conn_id=s["conn_id"], target=target)
        rep.mark("switch")
        seen["res"] = await asyncio.to_thread(svc.control_of(2).request, "POST",
                                              f"/sessions/{s['call_id']}/migrate", {"to": target})
        t0 = time.monotonic()

        def both_moved() -> bool:
            o1, o2 = svc.kernel_owner(1, s["conn_id"]), svc.kernel_owner(2, s["conn_id"])
            assert o1 is not None and o1 == o2 and o1.addr4 == lab.transceiver(target).addr4, (o1, o2)
            return True

        await eventually_async(lambda: asyncio.to_thread(both_moved), 2.0,
                               what="both kernels to hold the new owner", interval=0.002)
        seen["both_at"] = time.monotonic() - t0

    rep = call(lab, duration=4.0, messages=4, on_connected=migrate_on_relay2)
    assert seen["res"]["outcome"] == "moved", seen["res"]
    assert_untouched(rep)
    assert rep.rtp_packets_lost <= 2 and rep.frames_after["switch"] > 100, rep
    # (The data channel does not survive a migration yet: issue 12.)
    print(f"\nmigration asked of relay 2, media on relay 1: both kernels hold the new owner "
          f"{seen['both_at'] * 1000:.1f} ms after the reply; client lost {rep.rtp_packets_lost} packets")


def test_a_restarted_relay_knows_the_calls_made_before(fleet):
    lab, svc = fleet
    seen: dict = {}

    async def restart(pc, rep):
        await audio_flowing(pc)
        seen["before"] = await asyncio.to_thread(lambda: svc.control_of(1).sessions()["sessions"])
        await asyncio.to_thread(svc.stop_one, "relayd", signal.SIGKILL)
        await asyncio.to_thread(svc.start_relayd)
        await asyncio.to_thread(svc.wait_signaling, 30.0)
        sessions = await asyncio.to_thread(lambda: svc.control_of(1).sessions()["sessions"])
        seen["after"] = sessions
        seen["load"] = await asyncio.to_thread(lambda: svc.control_of(1).transceivers()["transceivers"])
        s = sessions[0]
        target = 2 if s["transceiver"] == 1 else 1
        seen["moved"] = await asyncio.to_thread(svc.control_of(1).request, "POST",
                                                f"/sessions/{s['call_id']}/migrate", {"to": target})

        if seen["moved"].get("outcome") != "moved":
            raise AssertionError(f"migration asked of the restarted relay: {seen['moved']}")
        views: list = []

        def at_target() -> bool:
            moved = session(svc, 2, s["call_id"])
            views[:] = [moved]
            return moved is not None and moved["transceiver"] == target and moved["state"] == "active"

        try:
            await eventually_async(lambda: asyncio.to_thread(at_target), 10,
                                   what=f"relay 2 to see the call active at transceiver {target}")
        except NotYet as exc:
            raise AssertionError(f"{exc}; relay 2 sees {views}, relay 1 sees "
                                 f"{session(svc, 1, s['call_id'])}; migration: {seen['moved']}") from None
        # Drain, asked of relay 2: the call (placed before relay 1's restart) moves back.
        seen["drained"] = await asyncio.to_thread(svc.control_of(2).request, "POST",
                                                  f"/transceivers/{target}/drain")
        await asyncio.to_thread(svc.control_of(2).request, "POST", f"/transceivers/{target}/undrain")

    rep = call(lab, duration=6.0, messages=4, on_connected=restart)
    assert_untouched(rep)
    ids = {s["call_id"] for s in seen["before"]}
    assert ids and ids == {s["call_id"] for s in seen["after"]}  # recovered from Redis
    assert sum(t["calls"] for t in seen["load"]) == len(ids)  # load is not reset to 0
    assert seen["moved"]["outcome"] == "moved"  # migrate works for a call from before the restart
    assert [r["outcome"] for r in seen["drained"]["results"]] == ["moved"], seen["drained"]  # and drain
    assert rep.hangup_status == 204  # and so does DELETE
    assert rep.tone_ratio > 0.5


def test_redis_outage_keeps_calls_refuses_new_ones_then_recovers(fleet):
    lab, svc = fleet
    seen: dict = {}

    def registries() -> list[dict]:
        return [svc.control_of(r).status()["registry"] for r in (1, 2)]

    async def outage(pc, rep):
        await audio_flowing(pc)
        rep.mark("outage")
        seen["probes_before"] = await asyncio.to_thread(_probes, lab, svc)
        await asyncio.to_thread(svc.stop_redis)
        await eventually_async(lambda: asyncio.to_thread(lambda: not any(s["available"] for s in registries())),
                               10, what="both relays to find Redis gone")
        seen["refused"] = await asyncio.to_thread(_post_offer, lab)
        seen["status"] = await asyncio.to_thread(registries)
        seen["migrate"] = await asyncio.to_thread(_migrate_status, svc)
        seen["probes"] = await asyncio.to_thread(_probes, lab, svc)
        await asyncio.to_thread(svc.start_redis)
        t0 = time.monotonic()
        await eventually_async(lambda: asyncio.to_thread(lambda: all(s["available"] for s in registries())),
                               10, what="both relays to resync with Redis")
        seen["back_after"] = time.monotonic() - t0

    rep = call(lab, duration=4.0, messages=4, on_connected=outage)
    assert_untouched(rep)
    assert rep.rtp_packets_lost <= 1 and rep.frames_after["outage"] > 100  # established: nothing lost
    status, body = seen["refused"]
    assert status == 503 and "registry is unavailable" in body, seen["refused"]
    assert not any(s["available"] for s in seen["status"])
    assert seen["migrate"] == 503
    # Before: ready, every part named. During the outage the relay is alive
    # (a Redis blip must not restart it) but not ready, and says why.
    assert {p: st for p, (st, _) in seen["probes_before"].items()} == {"/livez": 200, "/readyz": 200}, seen["probes_before"]
    ready_body = seen["probes_before"]["/readyz"][1]
    for part in ("started: ok", "xdp: ok (attached on", "maps: ok", "registry: ok (redis reachable)",
                 "transceivers: ok (2 healthy)"):
        assert part in ready_body, ready_body
    assert {p: st for p, (st, _) in seen["probes"].items()} == {"/livez": 200, "/readyz": 503}, seen["probes"]
    assert "registry: NOT READY (redis unreachable)" in seen["probes"]["/readyz"][1]
    assert seen["back_after"] < 1.0, seen["back_after"]
    print(f"\nRedis outage: new calls refused with 503; both relays resynced {seen['back_after'] * 1000:.0f} ms "
          f"after Redis returned; the call lost {rep.rtp_packets_lost} packets")
    again = call(lab, duration=1.0, messages=2)  # new calls work again
    assert_untouched(again)
    assert again.dc_echoed == again.dc_sent


def _post_offer(lab) -> tuple[int, str]:
    """A real offer (aiortc) POSTed from the client namespace; (status, body)."""
    async def post() -> tuple[int, str]:
        from aiortc import RTCConfiguration, RTCPeerConnection

        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            pc.createDataChannel("x")
            await pc.setLocalDescription(await pc.createOffer())
            req = urllib.request.Request(f"{lab.signaling_url}/v1/calls", data=pc.localDescription.sdp.encode(),
                                         headers={"Content-Type": "application/sdp"}, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()
        finally:
            await pc.close()

    with NetnsExecutor(lab.client_ns) as ex:
        return ex.call(asyncio.run, post())


def _probes(lab, svc) -> dict[str, tuple[int, str]]:
    """relayd 1's liveness and readiness, as a kubelet would ask (from its namespace): (status, body)."""
    cfg = svc.config_of(1)
    base = f"http://{cfg['internal']['host']}:{cfg['metrics']['port']}"

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(base + path, timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    with NetnsExecutor(lab.relay_ns) as ex:
        return {p: ex.call(get, p) for p in ("/livez", "/readyz")}


def _migrate_status(svc) -> int:
    sessions = svc.control_of(1).sessions()["sessions"]
    from manager.relay.control_client import ControlError

    try:
        svc.control_of(1).request("POST", f"/sessions/{sessions[0]['call_id']}/migrate", {"to": 1})
    except ControlError as exc:
        return 503 if "unavailable" in str(exc) else 0
    return 200


def test_relay_failover_without_ice_restart(fleet, record_property):
    """Relay 1 dies mid-call (relayd SIGKILLed and its links down, so its
    XDP can forward nothing either) and the VIP route moves to relay 2. The
    call goes on with no ICE restart and no renegotiation; the gap is measured
    on the wire both ways."""
    lab, svc = fleet
    seen: dict = {}
    tx_ifs = [(tx.ns, ifname) for tx in lab.transceivers for ifname in ("eth0", "eth1")]
    to_owner = [WireClock(ns, ifname, is_rtp) for ns, ifname in tx_ifs]
    to_client = WireClock(lab.client_ns, lab.client.ifname, lambda d: d.src[1] == lab.port and is_rtp(d))

    async def fail(pc, rep):
        await ssrc_published(svc)
        seen["before"] = await asyncio.to_thread(events, svc, 2)
        seen["t"] = time.monotonic()
        rep.mark("failover")
        await asyncio.to_thread(svc.stop_one, "relayd", signal.SIGKILL)
        await asyncio.to_thread(set_relay_links, lab, 1, False)
        await asyncio.to_thread(route_vip, lab, 2)

        def taken_over() -> dict:
            ev = events(svc, 2)
            moved = sum(ev.get(k, 0) - seen["before"].get(k, 0) for k in ("failovers", "repointed"))
            return ev if moved >= 1 else {}

        seen["after"] = await eventually_async(lambda: asyncio.to_thread(taken_over), 10,
                                               what="relay 2 to take the call over (failovers or repointed)")

    try:
        with contextlib.ExitStack() as clocks:
            for clock in (to_client, *to_owner):
                clocks.enter_context(clock)
            rep = call(lab, duration=5.0, messages=10, on_connected=fail)
    finally:
        set_relay_links(lab, 1, True)
        route_vip(lab, 1)
        svc.start_relayd()
        svc.wait_signaling(30.0)
    assert_untouched(rep)
    before, after = seen["before"], seen["after"]
    took = after.get("failovers", 0) - before.get("failovers", 0)
    repointed = after.get("repointed", 0) - before.get("repointed", 0)
    assert took + repointed >= 1, after
    assert rep.frames_after["failover"] > 50 and rep.tone_ratio_after["failover"] > 0.5, rep
    assert rep.dc_echoed == rep.dc_sent == 10  # the data channel carried on
    t = seen["t"]
    wire_in = longest_gap(sorted(x for c in to_owner for x in c.times), t, t + 2.0)
    wire_out = longest_gap(to_client.times, t, t + 2.0)
    record_property("failover_gap_to_owner_ms", wire_in)
    record_property("failover_gap_to_client_ms", wire_out)
    print(f"\nrelay failover: longest RTP gap on the wire client→owner {wire_in} ms, owner→client {wire_out} ms "
          f"(media take-overs {took}, STUN re-points {repointed}); client played gap "
          f"{rep.gap_after_ms['failover']} ms")
    # Functional, not a speed goal (benchmarks.md has the figures): without the
    # take-over, media would resume only with the client's next consent check.
    assert max(wire_in, wire_out) < 1000, (wire_in, wire_out)


def test_lab_json_lists_both_relays(fleet):
    lab, svc = fleet
    from manager.lab.manage import lab_info

    info = lab_info(lab, svc.workdir, {"relayd": {"pid": 1}})
    assert [r["index"] for r in info["relays"]] == [1, 2]
    assert info["relays"][0]["control_socket"] == info["control_socket"]  # single-relay fields: relay 1
    assert info["relays"][1]["namespace"] == lab.relay_namespace(2)
    assert info["redis_url"].startswith("unix://")
    json.dumps(info)
    # And the VIP route really is where route_vip put it (ip's view of the edge).
    with _ipr(lab.edge_ns) as ipr:
        (route,) = ipr.route("get", dst=lab.vip4)
        assert route.get("RTA_GATEWAY") == lab.relay_public(1)
        (route6,) = ipr.route("get", dst=lab.vip6, family=socket.AF_INET6)
        assert route6.get("RTA_GATEWAY") == lab.relay_public(1, socket.AF_INET6)


def test_forged_media_at_another_relay_takes_nothing_over(fleet):
    """An attacker who learnt a call's SSRC sends media with it to a relay
    that does not serve the call (here relay 2, reached by policy routing
    from the edge, while the client stays on relay 1). Relay 2 asks the owner,
    which cannot authenticate it: nothing is installed, the call is untouched."""
    lab, svc = fleet
    seen: dict = {}
    attacker = "10.10.1.254"  # the edge's own address, routed to relay 2 by a rule

    async def forge(pc, rep):
        await ssrc_published(svc)
        (s,) = [x for x in (await asyncio.to_thread(svc.control_of(1).sessions))["sessions"]]
        ssrc = s["legs"][0]["kernel"]["ssrc"]
        seen["before"] = await asyncio.to_thread(events, svc, 2)
        await asyncio.to_thread(_send_forged, lab, attacker, ssrc)

        def refused() -> dict:
            ev = events(svc, 2)
            return ev if ev.get("failover_refused", 0) > seen["before"].get("failover_refused", 0) else {}

        seen["after"] = await eventually_async(lambda: asyncio.to_thread(refused), 10,
                                               what="relay 2 to refuse the forged take-over")
        seen["legs2"] = [leg for x in (await asyncio.to_thread(svc.control_of(2).sessions))["sessions"]
                         for leg in x["legs"]]

    with _route_from(lab, attacker, 2):
        rep = call(lab, duration=3.0, messages=4, on_connected=forge)
    assert_untouched(rep)
    before, after = seen["before"], seen["after"]
    assert after.get("failover_refused", 0) - before.get("failover_refused", 0) >= 1, after
    assert after.get("failovers", 0) == before.get("failovers", 0)
    assert seen["legs2"] == []  # relay 2 installed nothing
    assert rep.tone_ratio > 0.5 and rep.dc_echoed == rep.dc_sent


@contextlib.contextmanager
def _route_from(lab, source: str, relay: int):
    """Packets from `source` in the edge go to relay N (policy routing)."""
    with _ipr(lab.edge_ns) as ipr:
        ipr.route("add", dst=f"{lab.vip4}/32", gateway=lab.relay_public(relay), table=100)
        ipr.rule("add", src=source, src_len=32, table=100, priority=50)
    try:
        yield
    finally:
        with _ipr(lab.edge_ns) as ipr:
            ipr.rule("del", src=source, src_len=32, table=100, priority=50)
            ipr.route("del", dst=f"{lab.vip4}/32", gateway=lab.relay_public(relay), table=100)


def _send_forged(lab, source: str, ssrc: int) -> None:
    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((source, 0))
            for seq in range(3):
                head = bytes([0x80, 111]) + (50000 + seq).to_bytes(2, "big") + b"\x00" * 4
                s.sendto(head + ssrc.to_bytes(4, "big") + secrets.token_bytes(80), (lab.vip4, lab.port))
                time.sleep(0.05)  # pacing: three packets, as a stream would send them

    with NetnsExecutor(lab.edge_ns) as ex:
        ex.call(send)


def test_a_tcp_call_survives_a_relay_restart_with_redis(fleet):
    """ICE-TCP (UDP blocked at the client): relay 1 restarts mid-call and
    closes the connection; the client's new connection (check first) reaches
    the restarted relay, which finds the call in Redis: the call goes on."""
    from tests.support.tcp_calls import BLOCK_UDP, restart_during_tcp_call

    lab, svc = fleet
    table = BLOCK_UDP.format(vip4=lab.vip4, vip6=lab.vip6, port=lab.port)
    lab.run(lab.client_ns, ["nft", "-f", "-"], input=table, check=True)
    try:
        rep, lost = restart_during_tcp_call(lab, svc)
    finally:
        lab.run(lab.client_ns, ["nft", "delete", "table", "inet", "splitrelay_test_block"], check=True)
    assert lost >= 1
    assert rep.error is None and rep.connection_states == ["connecting", "connected", "closed"]
    assert rep.frames_after["restarted"] > 100 and rep.tone_ratio_after["restarted"] > 50
    assert rep.dc_echoed == rep.dc_sent
    ev = events(svc, 1)
    assert ev.get("tcp_legs_installed", 0) >= 1  # at the restarted relay
    assert ev.get("repointed", 0) >= 1  # the owner's replies moved to the new connection's flow source
