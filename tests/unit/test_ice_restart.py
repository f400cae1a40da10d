"""ICE restart by PATCH (RFC 9725): a new server ufrag with the call's
routing hint, the owner's new password, 200 with the answer fragment and a
new ETag; the storm limit; a call that cannot restart. Every refusal is
counted and leaves the call as it was."""

from __future__ import annotations

from manager.protocol.sdpfrag import parse_fragment
from manager.protocol.ufrag import decode_ufrag
from manager.relay.call_desk import SignalingCounters
from manager.relay.config import LimitsConfig
from manager.relay.ice_restart import RestartWindow, answer_fragment
from tests.support.signaling import KEY, PUBLIC, RESTART, RESTART_PWD, TRICKLE, problem, relay, run, sdpfrag


def fragment(ufrag: str, pwd: str | None = RESTART_PWD) -> str:
    """What a browser's restart PATCHes (whip-whep's shape): credentials, then its media sections."""
    return sdpfrag(ufrag, pwd)


def test_a_restart_answers_new_credentials_with_the_calls_routing_hint() -> None:
    async def scenario() -> None:
        counters = SignalingCounters()
        async with relay(counters=counters) as env:
            _, resp = await env.place()
            location, tag = resp.headers["Location"], resp.headers["ETag"]
            call = env.registry.calls()[0]
            old_ufrag, conn_id = call.server_ufrag, call.conn_id
            resp = await env.http.patch(location, data=fragment("clientnew1"), headers=RESTART)
            assert resp.status == 200, await resp.text()
            assert resp.content_type == "application/trickle-ice-sdpfrag"
            body = await resp.text()
            frag = parse_fragment(body)
            # The new ufrag routes like the old one: same owner and connection id, new nonce and MAC.
            old, new = decode_ufrag(KEY, old_ufrag), decode_ufrag(KEY, frag.ufrag)
            assert (new.transceiver_id, new.conn_id) == (old.transceiver_id, old.conn_id) == (call.transceiver_id,
                                                                                             conn_id)
            assert frag.ufrag != old_ufrag
            # The owner was asked with the client's new credentials; its password is the answer's.
            fake = env.fakes[call.transceiver_id - 1]
            assert fake.restarts == [(conn_id, {"ufrag": frag.ufrag, "remote_ufrag": "clientnew1",
                                                "remote_pwd": RESTART_PWD})]
            assert frag.pwd == "pwd000000000000000000001"
            # The relay's candidates, as the answer had them, CRLF lines.
            assert [f"{c.host} {c.port}" for c in frag.candidates if c.transport == "udp"] == [
                f"{a} {p}" for a, p in PUBLIC]
            assert frag.end_of_candidates and body.endswith("a=end-of-candidates\r\n") and "\n" not in body.replace(
                "\r\n", "")
            # The registry holds the new ufrags: a new ETag, the same call.
            call = env.registry.calls()[0]
            assert (call.server_ufrag, call.client_ufrag, call.conn_id) == (frag.ufrag, "clientnew1", conn_id)
            assert resp.headers["ETag"] != tag
            assert counters.restarts() == 1
            # Trickle goes on under the new ufrag and ETag; the old ETag is stale.
            resp2 = await env.http.patch(location, data=fragment("clientnew1"),
                                         headers={**TRICKLE, "If-Match": resp.headers["ETag"]})
            assert resp2.status == 204, await resp2.text()
            resp2 = await env.http.patch(location, data=fragment("clientnew1"), headers={**TRICKLE, "If-Match": tag})
            assert (await problem(resp2, 412))["code"] == "stale-etag"
            # A DELETE still ends it.
            assert (await env.http.delete(location)).status == 204

    run(scenario)


def test_a_restart_storm_is_refused_and_counted_and_the_call_is_untouched() -> None:
    async def scenario() -> None:
        counters = SignalingCounters()
        async with relay(counters=counters, limits=LimitsConfig(max_ice_restarts_per_minute=3)) as env:
            _, resp = await env.place()
            location = resp.headers["Location"]
            for i in range(3):
                resp = await env.http.patch(location, data=fragment(f"client{i}new"), headers=RESTART)
                assert resp.status == 200, await resp.text()
            before = env.registry.calls()[0].to_dict()
            fake = env.fakes[env.registry.calls()[0].transceiver_id - 1]
            resp = await env.http.patch(location, data=fragment("client9new"), headers=RESTART)
            got = await problem(resp, 429)
            assert got["code"] == "restart-storm"
            assert got["detail"] == "too many ICE restarts: at most 3 a minute per call"
            assert 1 <= int(resp.headers["Retry-After"]) <= 60
            assert counters.refusals("restart-storm") == 1 and counters.restarts() == 3
            assert len(fake.restarts) == 3  # the owner was not asked
            assert [c.to_dict() for c in env.registry.calls()] == [before]

    run(scenario)


def test_the_storm_window_slides() -> None:
    now = [0.0]
    window = RestartWindow(clock=lambda: now[0])
    assert [window.take(1, 2) for _ in range(2)] == [None, None]
    assert window.take(1, 2) == 60.0
    assert window.take(2, 2) is None  # per call
    now[0] = 59.0
    assert window.take(1, 2) == 1.0
    now[0] = 60.0
    assert window.take(1, 2) is None  # the first fell out of the window
    window.forget(1)
    assert window.take(1, 1) is None


def test_a_call_that_cannot_restart_gets_422_naming_why() -> None:
    async def scenario() -> None:
        counters = SignalingCounters()
        async with relay(counters=counters) as env:
            _, resp = await env.place()
            location, tag = resp.headers["Location"], resp.headers["ETag"]
            before = env.registry.calls()[0].to_dict()
            for fake in env.fakes:
                fake.mode = "aiortc"
            resp = await env.http.patch(location, data=fragment("clientnew1"), headers=RESTART)
            got = await problem(resp, 422)
            assert got["code"] == "ice-restart-unsupported"
            assert got["detail"].startswith("this call cannot restart ICE: call ") and "aioice" in got["detail"]
            assert counters.refusals("ice-restart-unsupported") == 1
            for fake in env.fakes:
                fake.mode = "error"
            resp = await env.http.patch(location, data=fragment("clientnew2"), headers=RESTART)
            got = await problem(resp, 502)
            assert got["detail"] == "the call's transceiver failed to restart ICE"  # nothing of the inside
            assert counters.refusals("restart-failed") == 1 and counters.restarts() == 0
            assert [c.to_dict() for c in env.registry.calls()] == [before]
            resp = await env.http.patch(location, data=fragment(before["client_ufrag"]),
                                        headers={**TRICKLE, "If-Match": tag})
            assert resp.status == 204  # the call still takes its trickle

    run(scenario)


def test_bad_restart_fragments_are_refused_before_the_owner_is_asked() -> None:
    async def scenario() -> None:
        counters = SignalingCounters()
        async with relay(counters=counters) as env:
            _, resp = await env.place()
            location = resp.headers["Location"]
            cases = [
                (fragment("clientnew1", None), 400, "bad fragment: an ICE restart needs the new a=ice-pwd"),
                (fragment("clientnew1", "short"), 400, "bad fragment: a=ice-pwd must be 22 to 256"),
                (fragment("bad ufrag!"), 400, "bad fragment: a=ice-ufrag must be 4 to 256"),
            ]
            for body, status, detail in cases:
                got = await problem(await env.http.patch(location, data=body, headers=RESTART), status)
                assert got["detail"].startswith(detail), got
            assert counters.refusals("no-pwd") == 1 and counters.refusals("bad-fragment") == 2
            assert all(not fake.restarts for fake in env.fakes)
            # Without If-Match: "*" a new ufrag is no restart.
            got = await problem(await env.http.patch(location, data=fragment("clientnew1"), headers=TRICKLE), 422)
            assert got["detail"] == "the fragment's ice-ufrag is not this call's"

    run(scenario)


def test_the_answer_fragment_is_what_whip_clients_parse() -> None:
    text = answer_fragment("u" * 24, "p" * 24, ["a=candidate:1 1 udp 1 203.0.113.7 3478 typ host",
                                                 "a=end-of-candidates"])
    assert text == (f"a=ice-ufrag:{'u' * 24}\r\na=ice-pwd:{'p' * 24}\r\n"
                    "a=candidate:1 1 udp 1 203.0.113.7 3478 typ host\r\na=end-of-candidates\r\n")


def test_the_registry_carries_a_restart_to_its_listeners_and_the_fleet() -> None:
    from manager.protocol.addresses import OwnerAddr
    from manager.relay.registry import Registry

    owner = OwnerAddr(addr4="10.0.0.2", port4=4000)
    here, there = Registry(), Registry()
    for registry in (here, there):
        registry.register_transceiver(1, "http://tx1", 10)
    records: list[dict] = []
    here.on_change(lambda kind, rec: records.append(rec) if kind == "call" else None)
    call = here.add_call(conn_id=7, transceiver_id=1, client_ufrag="cold", server_ufrag="s" * 24, owner=owner)
    there.apply_call(records[-1])
    heard: list[tuple[str, str]] = []
    there.on_ice_restart(lambda c, old: heard.append((old, c.server_ufrag)))
    mine: list[str] = []
    here.on_ice_restart(lambda c, old: mine.append(old))
    gen = call.generation
    here.restart_ice(7, "cnew", "t" * 24)
    assert (call.client_ufrag, call.server_ufrag, mine) == ("cnew", "t" * 24, ["s" * 24])
    assert call.generation == gen + 1 and records[-1]["server_ufrag"] == "t" * 24
    there.apply_call(records[-1])  # another relay of the fleet learns it from the store
    assert heard == [("s" * 24, "t" * 24)]
    assert (there.get_call(7).client_ufrag, there.get_call(7).server_ufrag) == ("cnew", "t" * 24)
