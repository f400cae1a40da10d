"""ICE-TCP through the real relay: the lab's client has UDP to the VIP
blocked (nftables in its namespace), so its only way is the passive TCP
candidate of the relay's answer (LAB_TCP_PORT, RFC 4571 frames), bridged by
relayd to the transceiver over UDP. Calls connect, audio and data channel
echo, the bridge's counters show the path; a migration moves the call; and
the bridge's locks hold against what an attacker would send."""

from __future__ import annotations

import asyncio
import re
import secrets
import select
import socket
import struct
import time

import pytest
from aioice import stun

from manager.lab.client import client_call
from manager.lab.ice_tcp import TcpAdapter
from manager.lab.netns import NetnsExecutor
from manager.lab.services import LAB_TCP_PORT, LAB_TCP_PROXY, running_lab
from manager.protocol.proxy_protocol import v1_header, v2_header
from manager.relay.control_client import ControlClient
from tests.support.lab_calls import audio_flowing
from tests.support.tcp_calls import (
    BLOCK_UDP,
    restart_during_tcp_call,
)
from tests.support.tcp_flood import Flood, cpu_seconds, route_flood_prefix, unroute_flood_prefix

# realtime: the checks count media against the wall clock.
pytestmark = [pytest.mark.netns, pytest.mark.realtime]



@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with running_lab(f"tc{secrets.token_hex(3)}", tmp_path_factory.mktemp("services")) as (lab, svc):
        lab.run(lab.client_ns, ["nft", "-f", "-"], input=BLOCK_UDP.format(vip4=lab.vip4, vip6=lab.vip6,
                                                                          port=lab.port), check=True)
        yield lab, svc, ControlClient(svc.config["control_socket"])


def tcp_stats(ctl: ControlClient) -> tuple[dict, dict]:
    sp = ctl.request("GET", "/stats")["slowpath"]
    return sp["events"], sp["tcp"]["events"]


def run_tcp_call(lab, *, family: int = socket.AF_INET, **kw):
    vip = lab.vip4 if family == socket.AF_INET else lab.vip6
    url = lab.signaling_url if family == socket.AF_INET else lab.signaling_url6

    async def call():
        adapter = await TcpAdapter.start((vip, LAB_TCP_PORT), bind="127.0.0.1" if family == socket.AF_INET else "::1")
        try:
            rep = await client_call(url, rewrite_answer=adapter.rewrite_answer, **kw)
            return rep, {"frames_out": adapter.frames_out, "frames_in": adapter.frames_in}
        finally:
            adapter.close()

    with NetnsExecutor(lab.client_ns) as ex:
        return ex.call(asyncio.run, call())


def test_the_answer_offers_a_passive_tcp_candidate_below_udp(env):
    lab, svc, ctl = env
    rep, _ = run_tcp_call(lab, duration=0.5, messages=1)
    cands = re.findall(r"a=candidate:\S+ 1 (udp|tcp) (\d+) (\S+) (\d+) typ host(.*)", rep.answer)
    udp = [(int(p), a, int(port)) for t, p, a, port, _ in cands if t == "udp"]
    tcp = [(int(p), a, int(port), rest.strip()) for t, p, a, port, rest in cands if t == "tcp"]
    assert {(a, port) for _, a, port in udp} == {(lab.vip4, lab.port), (lab.vip6, lab.port)}
    assert {(a, port) for _, a, port, _ in tcp} == {(lab.vip4, LAB_TCP_PORT), (lab.vip6, LAB_TCP_PORT)}
    assert all(rest == "tcptype passive" for *_, rest in tcp)
    assert max(p for p, *_ in tcp) < min(p for p, *_ in udp)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_a_call_with_udp_blocked_goes_over_tcp(env, family):
    lab, svc, ctl = env
    ev0, tcp0 = tcp_stats(ctl)
    rep, adapter = run_tcp_call(lab, family=family, duration=3.0, messages=6)
    ev1, tcp1 = tcp_stats(ctl)
    assert rep.error is None, rep.error
    assert rep.connected and rep.tone_ratio > 50, rep.to_dict()
    assert rep.dc_echoed == rep.dc_sent == 6
    # The bridge carried it: one stream leg installed, ~50 frames/s each way.
    assert ev1.get("tcp_legs_installed", 0) - ev0.get("tcp_legs_installed", 0) == 1
    assert tcp1["frames_in"] - tcp0.get("frames_in", 0) > 100
    assert tcp1["frames_out"] - tcp0.get("frames_out", 0) > 100
    assert adapter["frames_in"] > 100 and adapter["frames_out"] > 100
    # ...and no UDP leg was opened for it.
    assert ev1.get("legs_opened", 0) == ev0.get("legs_opened", 0)


def test_a_tcp_call_migrates(env):
    lab, svc, ctl = env
    result = {}

    async def migrate(pc, rep):
        await audio_flowing(pc)
        call_id = rep.call_url.rsplit("/", 1)[1]
        call = await asyncio.to_thread(svc.call, call_id)
        target = 2 if call["transceiver_id"] == 1 else 1
        rep.mark("switch")
        result["res"] = await asyncio.to_thread(ctl.request, "POST", f"/sessions/{call_id}/migrate", {"to": target})

    rep, _ = run_tcp_call(lab, duration=3.0, messages=6, on_connected=migrate)
    assert result["res"]["outcome"] == "moved", result
    assert rep.error is None and rep.connection_states == ["connecting", "connected", "closed"]
    assert rep.rtp_packets_lost <= 1
    assert rep.tone_ratio_after["switch"] > 50 and rep.dc_echoed == rep.dc_sent




def test_a_relayd_restart_ends_a_tcp_call_of_the_in_memory_registry(env):
    """The bridge lives in relayd: a restart closes every ICE-TCP connection.
    With the in-memory registry the restarted relayd no longer knows the call
    (UDP calls go on in the kernel; a TCP one has nothing there), so the
    client's new connection is refused, and the call ends at its consent
    timeout. tests/e2e/test_fleet_lab.py shows the same restart with Redis, where
    the new connection carries the call on."""
    lab, svc, ctl = env
    rep, lost = restart_during_tcp_call(lab, svc)
    events, tcp = tcp_stats(ctl)
    assert lost >= 1
    assert rep.frames_after["restarted"] < 50  # (a frame or two in flight at the restart)
    assert events.get("drop_unknown_call", 0) >= 1 and events.get("tcp_legs_installed", 0) == 0
    svc.wait_transceivers(2, 15)


def test_nothing_but_checks_reaches_the_owner_before_its_success(env):
    """A client holding a call's genuine ufrag but not its password: its check
    opens a leg (the hint is valid) that the owner never confirms; the media-like
    frames that follow are dropped, and the connection ends at the handshake timeout."""
    lab, svc, ctl = env
    seen = {}

    async def attack(pc, rep):
        ufrag = re.search(r"a=ice-ufrag:(\S+)", rep.answer).group(1)
        check = _binding(f"{ufrag}:evil")  # no MESSAGE-INTEGRITY: the owner cannot authenticate it
        frames = [struct.pack("!H", len(check)) + check] + [struct.pack("!H", 60) + b"\x80" + bytes(59)] * 5
        before, _ = await asyncio.to_thread(tcp_stats, ctl)
        seen["states"] = await asyncio.to_thread(_probe, lab, frames, hold=2.3)
        seen["before"], seen["after"] = before, (await asyncio.to_thread(tcp_stats, ctl))[0]

    rep, _ = run_tcp_call(lab, duration=3.0, messages=2, on_connected=attack)
    assert rep.error is None
    assert seen["states"] == ["closed"]
    b, a = seen["before"], seen["after"]
    assert a.get("tcp_legs_opened", 0) - b.get("tcp_legs_opened", 0) == 1
    assert a.get("tcp_drop_before_success", 0) - b.get("tcp_drop_before_success", 0) == 5
    assert a.get("tcp_legs_installed", 0) == b.get("tcp_legs_installed", 0)


# -- the bridge's locks --------------------------------------------------------------------


def _binding(username: str) -> bytes:
    msg = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    msg.attributes["USERNAME"] = username
    return bytes(msg)


def _probe(lab, payloads: list[bytes], *, hold: float = 0.0, connections: int = 1) -> list[str]:
    """Open connections from the client namespace to the IPv4 VIP, send the
    payloads on the first, and report how each connection ended: "closed"
    (EOF/reset) or "open"."""
    return _open_with(lab, [b"".join(payloads)] + [b""] * (connections - 1), hold=hold, family=socket.AF_INET)


# (description, frames sent, counter that rises in slowpath or bridge events)
REFUSED = [
    ("a frame over tcp.max_frame", [struct.pack("!H", 5000) + bytes(100)], ("tcp", "closed_bad_frame")),
    ("an empty frame", [struct.pack("!H", 0)], ("tcp", "closed_bad_frame")),
    ("a first frame that is not STUN", [struct.pack("!H", 20) + b"\x17\xfe\xfd" + bytes(17)],
     ("slowpath", "tcp_drop_not_stun")),
    ("a check with a forged routing hint",
     [(lambda p: struct.pack("!H", len(p)) + p)(_binding("AAAAAAAAAAAAAAAAAAAAAAAA:x1y2"))],
     ("slowpath", "drop_forged_hint")),
]


@pytest.mark.parametrize(("description", "frames", "counter"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_first_frames_close_the_connection(env, description, frames, counter):
    lab, svc, ctl = env
    before = dict(zip(("slowpath", "tcp"), tcp_stats(ctl), strict=True))
    assert _probe(lab, frames, hold=0.3) == ["closed"]
    after = dict(zip(("slowpath", "tcp"), tcp_stats(ctl), strict=True))
    where, name = counter
    assert after[where].get(name, 0) == before[where].get(name, 0) + 1


def test_a_silent_connection_is_closed_at_the_handshake_timeout(env):
    lab, svc, ctl = env
    _, before = tcp_stats(ctl)
    assert _probe(lab, [], hold=2.6) == ["closed"]  # the lab's tcp.handshake_timeout is 2 s
    _, after = tcp_stats(ctl)
    assert after.get("closed_handshake_timeout", 0) == before.get("closed_handshake_timeout", 0) + 1


def test_a_full_source_gives_up_its_oldest_unauthenticated_connection(env):
    lab, svc, ctl = env
    _, before = tcp_stats(ctl)
    states = _probe(lab, [], hold=0.3, connections=5)  # the lab allows 4 per source
    assert states == ["closed", "open", "open", "open", "open"], states
    _, after = tcp_stats(ctl)
    assert after.get("evicted_per_source", 0) == before.get("evicted_per_source", 0) + 1
    assert after.get("refused_per_source", 0) == before.get("refused_per_source", 0)


def xdp_counts(ctl: ControlClient) -> dict[str, int]:
    return {r["name"]: r["packets"] for r in ctl.request("GET", "/stats")["fastpath"]["counters"]}


def test_one_ipv6_64_holds_at_most_max_per_source_connections(env, record_property):
    """2,600 addresses of one /64 open ICE-TCP connections and leave them
    silent, round after round: XDP drops the /64's SYNs beyond its SYN rate
    (tcp.syn_rate_per_source: 8/s, bursts of 32) before the kernel answers,
    so relayd sees only those; the whole /64 holds at most the lab's
    max_per_source (4), and a new call over ICE-TCP still connects. (relayd's
    CPU is printed; docs/benchmarks.md has the figures.)"""
    lab, svc, ctl = env
    pid = svc.procs["relayd"].pid
    route_flood_prefix(lab)
    xdp0, (_, bridge0), start = xdp_counts(ctl), tcp_stats(ctl), time.monotonic()
    flood = Flood(lab, addresses=2600).start()
    try:
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        flood.wait_first_round()
        held = ctl.request("GET", "/stats")["slowpath"]["tcp"]
        rep, _ = run_tcp_call(lab, family=socket.AF_INET6, duration=1.0, messages=2)
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
        during = ctl.request("GET", "/stats")["slowpath"]["tcp"]
    finally:
        flood.stop()
        unroute_flood_prefix(lab)
    elapsed = time.monotonic() - start
    xdp1, (_, bridge1) = xdp_counts(ctl), tcp_stats(ctl)
    assert held["largest_source"] <= 4 and during["largest_source"] <= 4, (held, during)
    # What reached relayd's listener from the /64 (accepted, or reset over
    # its accept rate): the SYN bucket's burst and rate, not the flood.
    seen = sum(bridge1.get(k, 0) - bridge0.get(k, 0) for k in ("accepted", "refused_accept_rate", "accept_error"))
    assert seen <= 32 + 8 * elapsed + 8, (seen, elapsed, flood.opened)  # + 8: the call's own connections
    dropped = xdp1["drop_tcp_syn_rate"] - xdp0["drop_tcp_syn_rate"]
    assert dropped >= 2600 - seen, (dropped, seen)
    assert flood.unanswered >= 2600 - seen, flood
    assert rep.error is None and rep.connected and rep.dc_echoed == rep.dc_sent, rep.to_dict()
    cpu = (cpu1 - cpu0) / (t1 - t0)
    for name, value in (("flood_connections", flood.opened), ("first_round_s", flood.first_round_s),
                        ("relayd_cpu", cpu), ("call_connected_after_s", rep.connected_after_s),
                        ("syns_dropped_in_xdp", dropped), ("connections_relayd_saw", seen)):
        record_property(name, value)
    print(f"\n/64 ICE-TCP flood: {flood.opened} connections ({2600 / flood.first_round_s:.0f}/s in the first "
          f"round), {dropped} SYNs dropped in XDP, {seen} reached relayd, largest source held "
          f"{during['largest_source']}; relayd {cpu * 100:.1f}% of a core; a new call connected after "
          f"{rep.connected_after_s:.2f} s")


def _open_with(lab, firsts: list[bytes], *, bind: str | None = None, hold: float = 0.3,
               family: int = socket.AF_INET6) -> list[str]:
    """One connection to the VIP of `family` per entry of `firsts` (from
    `bind`, an address the client namespace holds), opened one after the
    other, each entry sent once all are open; how each ended: "closed"
    (EOF/reset) or "open"."""

    def go() -> list[str]:
        socks = []
        for _ in firsts:
            s = socket.socket(family, socket.SOCK_STREAM)
            s.settimeout(5)
            if bind is not None:
                s.bind((bind, 0))
            s.connect((lab.vip6 if family == socket.AF_INET6 else lab.vip4, LAB_TCP_PORT))
            socks.append(s)
        for s, first in zip(socks, firsts, strict=True):
            s.sendall(first)
        time.sleep(hold)  # the window the relay has to close them (its timeouts are checked against it)
        readable, _, _ = select.select(socks, [], [], 0.3)  # all at once: a later one must not age meanwhile
        out = []
        for s in socks:
            state = "open"
            if s in readable:
                try:
                    state = "closed" if s.recv(1) == b"" else "open"
                except ConnectionResetError:
                    state = "closed"
            out.append(state)
            s.close()
        return out

    with NetnsExecutor(lab.client_ns) as ex:
        return ex.call(go)


@pytest.fixture
def proxy_routed(env):
    """The lab's trusted proxy address, held by the client namespace."""
    lab = env[0]
    lab.run(lab.client_ns, ["ip", "-6", "addr", "add", f"{LAB_TCP_PROXY}/128", "dev", "lo"], check=True)
    lab.run(lab.relay_ns, ["ip", "-6", "route", "replace", f"{LAB_TCP_PROXY}/128", "via", lab.client.addr6],
            check=True)
    yield LAB_TCP_PROXY
    lab.run(lab.relay_ns, ["ip", "-6", "route", "del", f"{LAB_TCP_PROXY}/128"])
    lab.run(lab.client_ns, ["ip", "-6", "addr", "del", f"{LAB_TCP_PROXY}/128", "dev", "lo"])


def test_a_trusted_proxys_header_names_the_client_the_limits_count(env, proxy_routed):
    """From the lab's trusted proxy, each connection's PROXY header (v2, v1)
    names the client: five connections for five clients all stay (the proxy
    is not one source), five for one /64 give up its oldest (the client's
    /64 is)."""
    lab, svc, ctl = env
    server = (lab.vip6, LAB_TCP_PORT)
    _, before = tcp_stats(ctl)
    many = [v2_header((f"2001:db8:{i}::7", 50000 + i), server) for i in range(4)]
    many.append(v1_header(("2001:db8:9::7", 50009), server))
    assert _open_with(lab, many, bind=proxy_routed) == ["open"] * 5
    one = [v2_header((f"2001:db8:77::{i + 1}", 50000 + i), server) for i in range(5)]
    assert _open_with(lab, one, bind=proxy_routed) == ["closed", "open", "open", "open", "open"]
    _, after = tcp_stats(ctl)
    assert after.get("proxied", 0) - before.get("proxied", 0) == 10
    assert after.get("evicted_per_source", 0) - before.get("evicted_per_source", 0) == 1


def test_a_proxy_header_from_anyone_else_is_not_believed(env):
    """The lab's client is no trusted proxy: its PROXY header is read as the
    RFC 4571 frame it is not (the connection is closed), and names no one."""
    lab, svc, ctl = env
    _, before = tcp_stats(ctl)
    header = v1_header(("2001:db8:5::7", 50000), (lab.vip6, LAB_TCP_PORT))
    assert _open_with(lab, [header, v2_header(("2001:db8:6::7", 50000), (lab.vip6, LAB_TCP_PORT))]) == [
        "closed", "open"]  # v2's signature reads as the length of a frame still to come
    _, after = tcp_stats(ctl)
    assert after.get("proxied", 0) == before.get("proxied", 0)
    assert after.get("closed_bad_frame", 0) == before.get("closed_bad_frame", 0) + 1


@pytest.mark.parametrize("header", [b"PROXY TCP4 bogus\r\n", b"PROXY TCP4 2001:db8::1 ::1 1 2\r\n",
                                    b"\r\n\r\n\x00\r\nQUIT\n\x21\x12\x00\x0c" + bytes(12), b"\x00\x14hello"],
                         ids=["v1 garbage", "v1 wrong family", "v2 UDP", "no header"])
def test_a_malformed_proxy_header_closes_the_connection_and_is_counted(env, proxy_routed, header):
    lab, svc, ctl = env
    _, before = tcp_stats(ctl)
    assert _open_with(lab, [header], bind=proxy_routed) == ["closed"]
    _, after = tcp_stats(ctl)
    assert after.get("closed_bad_proxy_header", 0) == before.get("closed_bad_proxy_header", 0) + 1
    assert "Traceback" not in svc.log_path("relayd").read_text(errors="replace")


def test_frames_round_trip_and_refusals_name_the_reason():
    from manager.protocol.rfc4571 import FrameError, FrameParser, frame

    packet = b"\x00\x01" + bytes(98)
    assert frame(packet) == b"\x00\x64" + packet
    parser = FrameParser(4096)
    stream = frame(packet) + frame(b"x" * 7) + frame(packet)[:50]
    assert parser.feed(stream[:1]) == [] and parser.pending == 1  # a header split across reads
    assert parser.feed(stream[1:]) == [packet, b"x" * 7] and parser.pending == 50
    assert parser.feed(frame(packet)[50:]) == [packet] and parser.pending == 0
    with pytest.raises(FrameError, match="^frame of 5000 bytes exceeds tcp.max_frame \\(4096\\)$"):
        FrameParser(4096).feed(struct.pack("!H", 5000))
    with pytest.raises(FrameError, match="^empty frame$"):
        FrameParser(4096).feed(b"\x00\x00")
    with pytest.raises(ValueError, match="does not fit an RFC 4571 frame"):
        frame(bytes(70000))
