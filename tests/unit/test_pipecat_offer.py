"""Pipecat's SmallWebRTC signaling shape (`POST`/`PATCH /api/offer`) mapped
onto the relay's placement, driven as Pipecat's client drives it: an aiortc
offer in `{sdp, type, pc_id, restart_pc}`, candidates in `{pc_id, candidates}`."""

from __future__ import annotations

from manager.relay.call_desk import SignalingCounters
from tests.support.signaling import problem, relay, run

CANDIDATE = "candidate:842163049 1 udp 1677729535 192.0.2.1 50000 typ srflx raddr 0.0.0.0 rport 0 generation 0"


def test_offer_answer_and_trickle_in_pipecats_shape() -> None:
    async def scenario() -> None:
        counters = SignalingCounters()
        async with relay(transceivers=1, counters=counters) as env:
            _, offer = await env.offer()
            resp = await env.http.post("/api/offer", json={"sdp": offer, "type": "offer", "pc_id": None,
                                                           "restart_pc": False, "requestData": {"voice": "x"}})
            assert resp.status == 200, await resp.text()
            body = await resp.json()
            assert body["type"] == "answer" and body["sdp"].startswith("v=0")
            call = env.registry.get_call_by_id(body["pc_id"])
            assert call is not None
            assert env.fakes[0].created[-1]["session"] == {"voice": "x"}

            resp = await env.http.patch("/api/offer", json={"pc_id": body["pc_id"], "candidates": [
                {"candidate": CANDIDATE, "sdp_mid": "0", "sdp_mline_index": 0},
                {"candidate": "", "sdp_mid": "0", "sdp_mline_index": 0}]})
            assert resp.status == 200, await resp.text()
            assert await resp.json() == {"status": "success"}
            assert counters.prometheus.get_sample_value("splitrelay_trickle_candidates_total") == 1

            # Renegotiating a live connection is refused; the call stays.
            resp = await env.http.post("/api/offer", json={"sdp": offer, "type": "offer", "pc_id": body["pc_id"],
                                                           "restart_pc": True})
            got = await problem(resp, 409)
            assert got["detail"].startswith("this connection is live: the relay does not renegotiate")
            assert env.registry.get_call_by_id(body["pc_id"]) is call

    run(scenario)


def test_bad_pipecat_bodies_are_problems() -> None:
    async def scenario() -> None:
        async with relay(transceivers=1) as env:
            _, offer = await env.offer()
            got = await problem(await env.http.post("/api/offer", json={"type": "offer"}), 400)
            assert got["detail"] == "invalid request body: sdp: Field required"
            got = await problem(await env.http.post("/api/offer", json={"sdp": offer, "type": "answer"}), 400)
            assert got["detail"] == "type must be 'offer', not 'answer'"
            got = await problem(await env.http.patch("/api/offer", json={"pc_id": "0" * 32, "candidates": []}), 404)
            assert got["detail"] == "unknown call"
            resp = await env.http.post("/api/offer", json={"sdp": offer, "type": "offer"})
            pc_id = (await resp.json())["pc_id"]
            got = await problem(await env.http.patch("/api/offer", json={"pc_id": pc_id, "candidates": [
                {"candidate": "candidate:1 1 udp x", "sdp_mid": "0"}]}), 400)
            assert got["detail"] == "bad candidate: line 1: malformed candidate"
            assert env.fakes[0].created and len(env.registry.calls()) == 1

    run(scenario)


def test_the_runner_flow_start_then_a_session_offer() -> None:
    async def scenario() -> None:
        async with relay(transceivers=1) as env:
            resp = await env.http.post("/start", json={"transport": "webrtc", "enableDefaultIceServers": True,
                                                       "body": {"instructions": "hi"}})
            assert resp.status == 200, await resp.text()
            started = await resp.json()
            assert set(started) == {"sessionId"}
            _, offer = await env.offer()
            resp = await env.http.post(f"/sessions/{started['sessionId']}/api/offer",
                                       json={"sdp": offer, "type": "offer", "pc_id": None, "restart_pc": False})
            assert resp.status == 200, await resp.text()
            body = await resp.json()
            assert env.fakes[0].created[-1]["session"] == {"instructions": "hi"}
            resp = await env.http.patch(f"/sessions/{started['sessionId']}/api/offer",
                                        json={"pc_id": body["pc_id"], "candidates": [{"candidate": CANDIDATE}]})
            assert resp.status == 200, await resp.text()
            got = await problem(await env.http.post("/sessions/nope/api/offer", json={"sdp": offer, "type": "offer"}),
                                404)
            assert got["detail"] == "unknown or expired session: POST /start first"
            got = await problem(await env.http.post("/start", json={"transport": "daily"}), 400)
            assert got["detail"] == "transport 'daily' is not served here: the relay speaks WebRTC only"

    run(scenario)
