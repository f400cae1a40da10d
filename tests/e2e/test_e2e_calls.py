"""End-to-end WebRTC calls through the split relay, in network namespaces.

The client is an unmodified aiortc RTCPeerConnection; besides standard aiortc
calls it only does the signaling HTTP POST/DELETE. relayd and the transceivers
run as separate processes in their own namespaces, the relay with the real XDP
program attached natively to its veths.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
import socket

import pytest
from aioice import stun

from manager.lab.client import client_call
from manager.lab.netns import NetnsExecutor, _ipr
from manager.lab.services import Services, running_lab
from manager.protocol.ufrag import encode_ufrag
from manager.relay.config import DatapathConfig
from manager.relay.kernel.datapath import Datapath
from tests.support.waiting import eventually, eventually_async

# realtime: the checks count media against the wall clock.
pytestmark = [pytest.mark.netns, pytest.mark.realtime]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with running_lab(f"e2e{secrets.token_hex(3)}", tmp_path_factory.mktemp("services")) as (lab, svc):
        dp = Datapath(DatapathConfig(**svc.config["datapath"]))
        dp.open_maps()  # the pinned maps, read independently of relayd
        try:
            yield lab, svc, dp
        finally:
            dp.close()


def fast(dp: Datapath) -> dict[str, int]:
    return {k: v[0] for k, v in dp.counters().items()}


def slow(svc: Services) -> dict[str, float]:
    """Slow-path events, plus forwarded packets as 'forward_in'/'forward_out'."""
    out = {}
    for (name, labels), v in svc.metrics().items():
        if name == "splitrelay_slowpath_events_total":
            out[dict(labels)["event"]] = v
        elif name == "splitrelay_slowpath_packets_total":
            out["forward_" + dict(labels)["direction"]] = v
    return out


def call_in_client(lab, **kw):
    with NetnsExecutor(lab.client_ns) as ex:
        return ex.call(asyncio.run, client_call(lab.signaling_url, **kw))


def scraped_forwarded_rtp(svc: Services) -> float:
    return sum(v for (name, labels), v in svc.metrics().items()
               if name == "splitrelay_fastpath_packets_total" and dict(labels)["verdict"] == "forward"
               and dict(labels)["class"] == "rtp")


def test_call_media_on_the_fast_path(env):
    lab, svc, dp = env
    before = fast(dp)
    scraped_before = scraped_forwarded_rtp(svc)
    rep = call_in_client(lab, duration=4.0, messages=10)
    after = fast(dp)
    # The Prometheus endpoint tells the same story as the maps.
    assert scraped_forwarded_rtp(svc) - scraped_before >= rep.rtp_packets_sent + rep.rtp_packets_received
    assert rep.error is None, rep.error
    assert rep.connected and "failed" not in rep.connection_states
    # The echo agent spoke our tone back: 440 Hz dominates the received audio.
    assert rep.audio_frames_received > 100
    assert rep.tone_ratio > 50, rep.tone_ratio
    assert rep.dc_echoed == rep.dc_sent == 10
    in_rtp = after["fwd_in_rtp"] - before["fwd_in_rtp"]
    out_rtp = after["fwd_out_rtp"] - before["fwd_out_rtp"]
    share_in = in_rtp / rep.rtp_packets_sent
    share_out = out_rtp / rep.rtp_packets_received
    print(f"\ncall: connected in {rep.connected_after_s * 1000:.0f} ms; RTP sent {rep.rtp_packets_sent}, "
          f"received {rep.rtp_packets_received}, lost {rep.rtp_packets_lost}; XDP forwarded {in_rtp} in / "
          f"{out_rtp} out (SRTP+SRTCP); round trip: data channel p50 {rep.dc_rtt_ms_p50} ms, "
          f"RTCP {rep.rtcp_rtt_ms} ms")
    # At least 99% of the call's SRTP went through XDP (SRTCP is counted too,
    # so the ratio may exceed 1).
    assert share_in >= 0.99 and share_out >= 0.99, (in_rtp, out_rtp, rep)
    assert after["fwd_in_dtls"] > before["fwd_in_dtls"], "DTLS handshake not on the fast path"
    # The call was hung up: its kernel entries are gone.
    eventually(lambda: dp.flows() == [], 5, what="the call's kernel flows removed after the hang-up")


def test_two_concurrent_calls_share_the_port(env):
    lab, svc, dp = env
    placed: list[dict] = []

    async def note_call(pc, rep):
        # While both calls are up, record where the relay placed this one.
        placed.append(svc_calls())

    def svc_calls():
        return {c["call_id"]: c["transceiver_id"] for c in svc.calls()}

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futs = [pool.submit(call_in_client, lab, duration=3.0, messages=5, on_connected=note_call) for _ in range(2)]
        reps = [f.result() for f in futs]
    for rep in reps:
        assert rep.error is None, rep.error
        assert rep.connected and rep.dc_echoed == rep.dc_sent == 5
        assert rep.tone_ratio > 50
    ids = {rep.call_url.rsplit("/", 1)[1] for rep in reps}
    seen = {}
    for snapshot in placed:
        seen.update({k: v for k, v in snapshot.items() if k in ids})
    assert len(seen) == 2 and set(seen.values()) == {1, 2}, f"calls not spread over transceivers: {seen}"


def stun_request(username: str) -> bytes:
    msg = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    msg.attributes["USERNAME"] = username
    msg.attributes["PRIORITY"] = 1
    return bytes(msg)


@pytest.mark.parametrize("kind", ["forged", "unknown-call", "srtp"])
def test_bad_first_packets_install_nothing(env, kind):
    lab, svc, dp = env
    key = bytes.fromhex(svc.hint_key)
    payload = {
        # A ufrag of the right shape, random otherwise: no live call has it (its MAC cannot verify either).
        "forged": stun_request("AQ" + "".join(secrets.choice("ABCDEFGHabcdefgh0123456789+/") for _ in range(22))
                               + ":cli1"),
        # Authentic under the real key, but no such call exists.
        "unknown-call": stun_request(encode_ufrag(key, 1, 0x7FFFFFF0) + ":cli1"),
        # Media from a client tuple the relay has never authenticated.
        "srtp": bytes([0x80, 111]) + os.urandom(10) + b"x" * 100,
    }[kind]
    # XDP knows the live calls' ufrags: neither check reaches Python (the slow
    # path's own MAC and call checks: tests/netns/test_slowpath_bounds.py).
    expect_slow = None
    expect_fast = "drop_unknown_not_stun" if kind == "srtp" else "drop_stun_unknown_ufrag"
    f0, s0 = fast(dp), slow(svc)
    with lab.socket("client", socket.AF_INET, bind=(lab.client.addr4, 0)) as s:
        for _ in range(3):
            s.sendto(payload, lab.vip(socket.AF_INET))
    eventually(lambda: fast(dp)[expect_fast] - f0[expect_fast] >= 3, what=f"XDP to count 3 {expect_fast}")
    f1, s1 = fast(dp), slow(svc)
    assert f1[expect_fast] - f0[expect_fast] == 3
    if expect_slow:
        assert s1.get(expect_slow, 0) - s0.get(expect_slow, 0) == 3
    # Nothing was installed and nothing went on towards a transceiver.
    assert dp.flows() == []
    assert s1.get("legs_opened", 0) == s0.get("legs_opened", 0)
    assert s1.get("forward_in", 0) == s0.get("forward_in", 0)


def test_an_evicted_flow_is_reinstalled_on_the_clients_next_packet(env):
    """The flows map is an LRU: a flow pushed out (here: its entry deleted, as
    eviction does; the reverse entry stays) comes back with the client's next
    packet that reaches the slow path (its media, through the SSRC index, or
    its next consent check): the owner had authenticated that exact tuple, as
    the slow path's leg records."""
    from manager.relay.kernel.structs import flow_key

    lab, svc, dp = env
    seen: dict = {}

    def with_ssrc() -> list:
        return [f for f in dp.flows() if f.vip[0] == lab.vip4 and f.ssrc]

    async def evict(pc, rep) -> None:
        # Its SSRC indexed: the client's media brings it back.
        (flow,) = await eventually_async(with_ssrc, 10, what="the call's kernel flow with its SSRC")
        seen["flow"] = flow
        dp.maps.flows.delete(flow_key(flow.client, flow.vip))
        assert not dp.has_flow(flow.client, flow.vip)
        seen["back"] = await eventually_async(lambda: dp.has_flow(flow.client, flow.vip), 9.0,
                                              what="the evicted flow installed again")

    before = slow(svc)
    rep = call_in_client(lab, duration=11.0, messages=2, on_connected=evict)
    after = slow(svc)
    assert rep.error is None and rep.connected
    assert seen["back"], "the evicted flow was not installed again"
    assert after.get("flows_reinstalled", 0) - before.get("flows_reinstalled", 0) == 1
    assert after.get("flows_evicted_seen", 0) - before.get("flows_evicted_seen", 0) == 1


def test_a_client_with_no_ipv4_calls_over_the_ipv6_vip(env):
    """The client namespace loses its IPv4 address and route: signaling goes
    to the IPv6 VIP, the answer offers both families, ICE picks IPv6, and XDP
    forwards the call's media over IPv6 both ways."""
    lab, svc, dp = env
    legs = {}

    def both_ways() -> list:
        flows = [(f.client, f.packets_in, f.packets_out) for f in dp.flows()]
        return flows if flows and all(i > 20 and o > 20 for _, i, o in flows) else []

    async def look(pc, rep):
        legs["during"] = await eventually_async(lambda: asyncio.to_thread(both_ways), 10,
                                                what="XDP forwarding > 20 packets each way")

    with _ipr(lab.client_ns) as ipr:
        idx = ipr.link_lookup(ifname=lab.client.ifname)[0]
        ipr.addr("del", index=idx, address=lab.client.addr4, prefixlen=lab.client.prefixlen4)
        routes4 = ipr.route("dump", family=socket.AF_INET)
        assert not [r for r in routes4 if r.get("RTA_GATEWAY")]  # no IPv4 route left
    try:
        with NetnsExecutor(lab.client_ns) as ex:
            rep = ex.call(asyncio.run, client_call(lab.signaling_url6, duration=2.5, messages=5, on_connected=look))
    finally:
        with _ipr(lab.client_ns) as ipr:
            idx = ipr.link_lookup(ifname=lab.client.ifname)[0]
            ipr.addr("add", index=idx, address=lab.client.addr4, prefixlen=lab.client.prefixlen4)
            ipr.route("replace", dst="0.0.0.0/0", gateway=lab.client.relay_addr4, oif=idx)
    assert rep.error is None, rep.error
    assert rep.connection_states == ["connecting", "connected", "closed"]
    assert rep.tone_ratio > 50 and rep.dc_echoed == rep.dc_sent == 5
    assert legs["during"], "no kernel flow during the call"
    for client, packets_in, packets_out in legs["during"]:
        assert ":" in client[0], client  # the flow is the client's IPv6 tuple
        assert packets_in > 20 and packets_out > 20  # XDP forwards both ways
    print(f"\nIPv6-only client: connected in {rep.connected_after_s * 1000:.0f} ms, flows {legs['during']}")
