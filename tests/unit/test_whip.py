"""WHIP (RFC 9725) on the public listener: Location and ETag on the 201,
trickle ICE by PATCH, DELETE, and every refusal an RFC 9457 problem that is
counted and leaves the call as it was."""

from __future__ import annotations

from manager.protocol.client_auth import mint_token
from manager.relay.call_desk import SignalingCounters
from manager.relay.credentials import ClientAuth
from tests.support.signaling import SDP, TRICKLE, problem, relay, run, sdpfrag

TOKEN_KEY = b"t" * 32
CANDIDATES = ("a=candidate:1 1 udp 2130706431 192.0.2.10 50000 typ host\r\n"
              "a=candidate:2 1 udp 1694498815 198.51.100.3 61000 typ srflx raddr 0.0.0.0 rport 0\r\n")


def fragment(ufrag: str | None, candidates: str = CANDIDATES, pwd: str = "pwdpwdpwdpwdpwdpwdpwdpwd") -> str:
    return sdpfrag(ufrag, pwd if ufrag is not None else None, candidates=candidates)


def trickled(counters: SignalingCounters) -> float:
    return counters.prometheus.get_sample_value("splitrelay_trickle_candidates_total") or 0.0


def test_201_carries_location_and_etag_and_trickle_is_taken() -> None:
    async def scenario() -> None:
        counters = SignalingCounters()
        async with relay(counters=counters) as env:
            _, resp = await env.place()
            assert resp.status == 201, await resp.text()
            location, tag = resp.headers["Location"], resp.headers["ETag"]
            assert tag.startswith('"') and tag.endswith('"') and len(tag) == 34
            assert "Link" not in resp.headers  # no ice-server to name: the relay is the only path
            call = env.registry.calls()[0]
            resp = await env.http.patch(location, data=fragment(call.client_ufrag),
                                        headers={**TRICKLE, "If-Match": tag})
            assert resp.status == 204, await resp.text()
            assert resp.headers["ETag"] == tag
            assert trickled(counters) == 2
            # If-Match is optional for a client that never read the ETag.
            resp = await env.http.patch(location, data=fragment(call.client_ufrag, "a=end-of-candidates\r\n"),
                                        headers=TRICKLE)
            assert resp.status == 204, await resp.text()
            resp = await env.http.delete(location)
            assert resp.status == 204
            assert env.registry.calls() == []

    run(scenario)


def test_bad_patches_are_refused_counted_and_leave_the_call() -> None:
    async def scenario() -> None:
        counters = SignalingCounters()
        async with relay(counters=counters) as env:
            _, resp = await env.place()
            location, tag = resp.headers["Location"], resp.headers["ETag"]
            call = env.registry.calls()[0]
            before = call.to_dict()
            cases = [
                ("stale-etag", {**TRICKLE, "If-Match": '"0123456789abcdef0123456789abcdef"'},
                 fragment(call.client_ufrag), 412, "If-Match does not name this ICE session's current ETag"),
                ("no-ufrag", TRICKLE, fragment(None), 400, "bad fragment: no a=ice-ufrag"),
                ("no-pwd", {**TRICKLE, "If-Match": "*"}, "a=ice-ufrag:newufrag\r\n", 400,
                 "bad fragment: an ICE restart needs the new a=ice-pwd"),
                ("wrong-ufrag", TRICKLE, fragment("someoneelse"), 422, "the fragment's ice-ufrag is not this call's"),
                ("bad-fragment", TRICKLE, fragment(call.client_ufrag, "a=candidate:1 1 udp notanumber\r\n"), 400,
                 "bad fragment: line 5: malformed candidate"),
                ("content-type", {"Content-Type": "application/sdp"}, fragment(call.client_ufrag), 415,
                 "Content-Type must be application/trickle-ice-sdpfrag"),
            ]
            for reason, headers, body, status, detail in cases:
                resp = await env.http.patch(location, data=body, headers=headers)
                got = await problem(resp, status)
                assert got["detail"].startswith(detail), got
                assert counters.refusals(reason) == 1, reason
            assert (await problem(await env.http.patch(location, data=fragment(None), headers=TRICKLE),
                                  400))["code"] == "no-ufrag"
            assert trickled(counters) == 0
            assert [c.to_dict() for c in env.registry.calls()] == [before]
            # The call still takes a good trickle with its ETag.
            resp = await env.http.patch(location, data=fragment(call.client_ufrag), headers={**TRICKLE, "If-Match": tag})
            assert resp.status == 204

    run(scenario)


def test_a_patch_for_another_clients_call_is_refused_and_counted() -> None:
    async def scenario() -> None:
        counters = SignalingCounters()
        auth = ClientAuth("tokens", token_key=TOKEN_KEY)
        async with relay(auth=auth, counters=counters) as env:
            alice, mallory = mint_token(TOKEN_KEY, ttl=60, subject="a"), mint_token(TOKEN_KEY, ttl=60, subject="m")
            _, offer = await env.offer()
            resp = await env.http.post("/v1/calls", data=offer, headers={**SDP, "Authorization": f"Bearer {alice}"})
            assert resp.status == 201, await resp.text()
            location, tag = resp.headers["Location"], resp.headers["ETag"]
            call = env.registry.calls()[0]
            resp = await env.http.patch(location, data=fragment(call.client_ufrag), headers={
                **TRICKLE, "If-Match": tag, "Authorization": f"Bearer {mallory}"})
            got = await problem(resp, 401)
            assert got["detail"] == "unauthorized: this call was created with another credential"
            assert resp.headers["WWW-Authenticate"] == 'Bearer realm="splitrelay"'
            assert counters.refusals("other-credential") == 1
            assert trickled(counters) == 0 and len(env.registry.calls()) == 1

    run(scenario)


def test_every_error_of_the_public_listener_is_a_problem() -> None:
    async def scenario() -> None:
        async with relay() as env:
            resp = await env.http.get("/nowhere")
            assert (await problem(resp, 404))["detail"] == "no such resource: /nowhere"
            resp = await env.http.get("/v1/calls")
            got = await problem(resp, 405)
            assert got["detail"] == "GET is not allowed on /v1/calls" and got["title"] == "Method Not Allowed"
            assert "POST" in resp.headers["Allow"]
            resp = await env.http.patch("/v1/calls/" + "0" * 32, data=fragment("abcd"), headers=TRICKLE)
            assert (await problem(resp, 404))["detail"] == "unknown call"
            resp = await env.http.post("/v1/calls", data="v=0\r\n", headers=SDP)
            assert (await problem(resp, 400))["detail"].startswith("bad offer: ")

    run(scenario)


def test_a_delete_after_the_transceiver_ended_the_call_is_204_for_its_creator_only() -> None:
    async def scenario() -> None:
        auth = ClientAuth("tokens", token_key=TOKEN_KEY)
        async with relay(auth=auth) as env:
            alice, mallory = mint_token(TOKEN_KEY, ttl=60, subject="a"), mint_token(TOKEN_KEY, ttl=60, subject="m")
            _, offer = await env.offer()
            resp = await env.http.post("/v1/calls", data=offer, headers={**SDP, "Authorization": f"Bearer {alice}"})
            location = resp.headers["Location"]
            # The client closed its peer connection: the transceiver ended the call before the DELETE.
            env.registry.end_call(env.registry.calls()[0].conn_id, "transceiver-closed")
            resp = await env.http.delete(location, headers={"Authorization": f"Bearer {mallory}"})
            assert (await problem(resp, 404))["detail"] == "unknown call"
            resp = await env.http.delete(location, headers={"Authorization": f"Bearer {alice}"})
            assert resp.status == 204

    run(scenario)
