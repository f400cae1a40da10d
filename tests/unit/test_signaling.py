"""Signaling API against real stand-in transceivers that answer with aiortc."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest
from aiortc import RTCSessionDescription
from aiortc.sdp import SessionDescription

from manager.protocol.ufrag import decode_ufrag
from manager.relay.registry import Registry
from manager.relay.signaling import make_app
from tests.support.signaling import (
    KEY,
    PUBLIC,
    SDP,
    _error,
    relay,
    run,
)
from tests.support.waiting import eventually_async


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now












def _candidates(sdp: str) -> list[list[tuple[str, int, str]]]:
    return [
        [(c.ip, c.port, c.type) for c in media.ice_candidates]
        for media in SessionDescription.parse(sdp).media
    ]


# -- the happy path ---------------------------------------------------------


def test_place_call_end_to_end() -> None:
    async def scenario() -> None:
        async with relay(transceivers=1) as env:
            pc, offer = await env.offer()
            resp = await env.http.post("/v1/calls", data=offer, headers=SDP)
            answer = await resp.text()
            assert resp.status == 201, answer
            assert resp.content_type == "application/sdp"
            call_id = resp.headers["Location"].removeprefix("/v1/calls/")
            assert re.fullmatch(r"[0-9a-f]{32}", call_id)  # 128 random bits

            # What the transceiver was asked: no client candidates, a valid hint.
            (request,) = env.fakes[0].created
            assert "a=candidate:" not in request["offer"]
            assert "a=end-of-candidates" not in request["offer"]
            assert "a=candidate:" in offer  # ...which the client did send
            hint = decode_ufrag(KEY, request["ufrag"])
            assert (hint.transceiver_id, hint.conn_id) == (1, request["conn_id"])

            # What the client got: the minted ufrag, only the relay's candidates.
            assert f"a=ice-ufrag:{request['ufrag']}" in answer
            public = [("203.0.113.7", 3478, "host"), ("2001:db8::7", 3478, "host")]
            assert _candidates(answer) == [public, public]
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            assert pc.signalingState == "stable"

            call = env.registry.get_call_by_id(call_id)
            assert call is not None and call.conn_id == request["conn_id"]
            assert call.state == "active"
            assert call.owner.to_dict() == {
                "addr4": "127.0.0.1", "port4": 40001, "addr6": None, "port6": 0,
            }
            assert call.client_ufrag == SessionDescription.parse(offer).media[0].ice.usernameFragment
            assert call.server_ufrag == request["ufrag"]

            # The public listener lists nothing.
            for path in (f"/v1/calls/{call_id}", "/v1/calls", "/v1/transceivers"):
                resp = await env.http.get(path)
                assert resp.status in (404, 405), path
            (t,) = env.registry.transceivers()
            assert (t.id, t.calls, t.healthy) == (1, 1, True)

    run(scenario)


def test_least_loaded_placement_across_two_transceivers() -> None:
    async def scenario() -> None:
        async with relay(transceivers=2) as env:
            locations = []
            for _ in range(4):
                _, resp = await env.place()
                assert resp.status == 201, await resp.text()
                locations.append(resp.headers["Location"])
            assert [len(f.created) for f in env.fakes] == [2, 2]
            owners = [env.registry.get_call_by_id(loc.split("/")[-1]).transceiver_id for loc in locations]
            assert owners == [1, 2, 1, 2]
            # Free one slot on transceiver 2: it is now the least loaded.
            resp = await env.http.delete(locations[1])
            assert resp.status == 204
            _, resp = await env.place()
            assert resp.status == 201
            assert [len(f.created) for f in env.fakes] == [2, 3]

    run(scenario)


def test_concurrent_offers_spread_before_any_answer() -> None:
    async def scenario() -> None:
        async with relay(transceivers=2) as env:
            offers = [(await env.offer())[1] for _ in range(4)]
            resps = await asyncio.gather(
                *(env.http.post("/v1/calls", data=o, headers=SDP) for o in offers)
            )
            assert [r.status for r in resps] == [201] * 4
            assert [len(f.created) for f in env.fakes] == [2, 2]

    run(scenario)


# -- client errors ----------------------------------------------------------


def test_wrong_content_type_415() -> None:
    async def scenario() -> None:
        async with relay(transceivers=1) as env:
            _, offer = await env.offer()
            for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "application/json"}):
                resp = await env.http.post("/v1/calls", data=offer, headers=headers)
                assert await _error(resp, 415) == "Content-Type must be application/sdp"
            assert env.fakes[0].created == []

    run(scenario)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda o: "hello", "bad offer: SDP does not start with v=0"),
        (lambda o: o.split("m=", 1)[0], "bad offer: SDP has no media section (m= line)"),
        (lambda o: re.sub(r"a=ice-ufrag:\S+\r\n", "", o), "bad offer: media section 0 (audio) has no a=ice-ufrag"),
        (lambda o: o.replace("t=0 0", "t=0 0\r\na=ice-lite"), "bad offer: ice-lite offers are not supported"),
        (lambda o: o.encode("utf-8") + b"\xff", "bad offer: SDP is not valid UTF-8"),
    ],
)
def test_bad_offer_400(mutate, message: str) -> None:
    async def scenario() -> None:
        async with relay(transceivers=1) as env:
            _, offer = await env.offer()
            resp = await env.http.post("/v1/calls", data=mutate(offer), headers=SDP)
            assert (await _error(resp, 400)).startswith(message)
            assert env.fakes[0].created == []
            assert env.registry.calls() == []

    run(scenario)


def test_oversized_offer_413() -> None:
    async def scenario() -> None:
        async with relay(transceivers=1) as env:
            resp = await env.http.post("/v1/calls", data="v=0\r\n" + "a=x\r\n" * 20000, headers=SDP)
            assert resp.status == 413
            assert env.registry.calls() == []

    run(scenario)


# -- 503: nowhere to place ----------------------------------------------------


def test_no_transceiver_503() -> None:
    async def scenario() -> None:
        async with relay(transceivers=0) as env:
            _, resp = await env.place()
            assert await _error(resp, 503) == "no transceiver available: no transceiver is registered"

    run(scenario)


def test_at_capacity_503() -> None:
    async def scenario() -> None:
        async with relay(transceivers=1, capacity=1) as env:
            _, resp = await env.place()
            assert resp.status == 201
            _, resp = await env.place()
            assert await _error(resp, 503) == (
                "no transceiver available: all 1 healthy transceivers are at capacity"
            )
            assert len(env.fakes[0].created) == 1

    run(scenario)


def test_heartbeat_expiry_503_and_recovery() -> None:
    clock = Clock()

    async def scenario() -> None:
        async with relay(transceivers=1, clock=clock) as env:
            clock.now += 3.5  # longer than the 3 s heartbeat timeout
            _, resp = await env.place()
            assert await _error(resp, 503) == (
                "no transceiver available: no healthy transceiver (1 registered)"
            )
            assert env.registry.transceivers()[0].healthy is False
            resp = await env.internal.put("/v1/transceivers/1/heartbeat", json={"healthy": True, "calls": []})
            assert resp.status == 204
            _, resp = await env.place()
            assert resp.status == 201, await resp.text()

    run(scenario)


def test_reported_unhealthy_503() -> None:
    async def scenario() -> None:
        async with relay(transceivers=1) as env:
            resp = await env.internal.put("/v1/transceivers/1/heartbeat", json={"healthy": False})
            assert resp.status == 204
            _, resp = await env.place()
            await _error(resp, 503)

    run(scenario)


# -- 502: the transceiver failed ----------------------------------------------


@pytest.mark.parametrize(
    "mode, message, cleaned_up",
    [
        ("error", r"transceiver 1 failed: POST http://127\.0\.0\.1:\d+/calls returned 500: agent crashed", False),
        ("slow", r"transceiver 1 failed: POST http://127\.0\.0\.1:\d+/calls timed out after 2 s", False),
        ("garbage", r"transceiver 1 failed: POST http://127\.0\.0\.1:\d+/calls reply is invalid: Invalid JSON: .+", False),
        ("bad-owner", r"transceiver 1 failed: POST http://127\.0\.0\.1:\d+/calls reply is invalid: owner addr4 'not-an-ip' is not an IP address", False),
        ("wrong-ufrag", r"transceiver 1 failed: answer uses ufrag '[^']+', not the minted one", True),
        ("bad-answer", r"transceiver 1 failed: invalid answer: media section 0 \(audio\) a=setup must be one of active/passive in an answer", True),
    ],
)
def test_transceiver_failure_502(mode: str, message: str, cleaned_up: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="manager.relay.signaling")

    async def scenario() -> None:
        async with relay(transceivers=1, timeout=2.0) as env:
            fake = env.fakes[0]
            fake.mode = mode
            _, resp = await env.place()
            # The client learns no internal address; the log says what happened.
            assert await _error(resp, 502) == "transceiver 1 failed to answer the offer"
            detail = message.removeprefix("transceiver 1 failed: ")
            assert any(re.search(detail, r.getMessage()) for r in caplog.records), caplog.text
            (request,) = fake.created
            # The call is gone and its slot is free again.
            assert env.registry.calls() == []
            assert env.registry.get_transceiver(1).calls == 0
            assert env.ended == [(request["conn_id"], "placement-failed")]
            if cleaned_up:
                # The transceiver did create the call: it is told to drop it.
                await eventually_async(lambda: fake.deleted, 2, what="the transceiver told to drop the call")
                assert fake.deleted == [request["conn_id"]]
                assert fake.pcs == {}

    run(scenario)


def test_transceiver_unreachable_502() -> None:
    async def scenario() -> None:
        async with relay(transceivers=1) as env:
            await env.fakes[0].server.close()
            _, resp = await env.place()
            text = await _error(resp, 502)
            assert text == "transceiver 1 failed to answer the offer" and "127.0.0.1" not in text
            assert env.registry.calls() == []

    run(scenario)


# -- DELETE -------------------------------------------------------------------


def test_delete_propagates_to_transceiver() -> None:
    async def scenario() -> None:
        async with relay(transceivers=2) as env:
            _, resp = await env.place()
            location = resp.headers["Location"]
            call = env.registry.get_call_by_id(location.split("/")[-1])
            fake = env.fakes[call.transceiver_id - 1]
            assert list(fake.pcs) == [call.conn_id]

            resp = await env.http.delete(location)
            assert resp.status == 204
            assert fake.deleted == [call.conn_id]
            assert fake.pcs == {}
            assert env.ended == [(call.conn_id, "client-hangup")]
            assert env.registry.get_transceiver(call.transceiver_id).calls == 0
            assert env.registry.get_call_by_id(location.split("/")[-1]) is None

            resp = await env.http.delete(location)
            assert await _error(resp, 404) == "unknown call"
            resp = await env.http.delete("/v1/calls/0123456789abcdef")
            assert await _error(resp, 404) == "unknown call"
            assert fake.deleted == [call.conn_id]

    run(scenario)


def test_delete_when_transceiver_unreachable_still_ends_call() -> None:
    async def scenario() -> None:
        async with relay(transceivers=1) as env:
            _, resp = await env.place()
            location = resp.headers["Location"]
            await env.fakes[0].server.close()
            resp = await env.http.delete(location)
            assert resp.status == 204
            assert env.registry.calls() == []

    run(scenario)


# -- transceiver-facing API ---------------------------------------------------


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"control_url": "http://a:1", "capacity": 1}, 400, "invalid request body: id: Field required"),
        ({"id": "1", "control_url": "http://a:1", "capacity": 1}, 400, "invalid request body: id: Input should be a valid integer"),
        ({"id": 1, "control_url": "http://a:1", "capacity": 1.5}, 400, "invalid request body: capacity: Input should be a valid integer"),
        ({"id": 0, "control_url": "http://a:1", "capacity": 1}, 400, "invalid registration: transceiver id must be an integer in 1..65535"),
        ({"id": 1, "control_url": "a:1", "capacity": 1}, 400, "invalid registration: control_url 'a:1' is not an http(s) URL"),
        ("not json", 400, "invalid request body: Invalid JSON"),
        ([1, 2], 400, "invalid request body: Input should be an object"),
    ],
)
def test_register_rejections(body, status: int, message: str) -> None:
    async def scenario() -> None:
        async with relay(transceivers=0) as env:
            if isinstance(body, str):
                resp = await env.internal.post("/v1/transceivers", data=body, headers={"Content-Type": "application/json"})
            else:
                resp = await env.internal.post("/v1/transceivers", json=body)
            assert (await _error(resp, status)).startswith(message)
            assert env.registry.transceivers() == []

    run(scenario)


def test_register_wrong_content_type_415() -> None:
    async def scenario() -> None:
        async with relay(transceivers=0) as env:
            resp = await env.internal.post("/v1/transceivers", data='{"id": 1}', headers={"Content-Type": "text/plain"})
            assert await _error(resp, 415) == "Content-Type must be application/json"

    run(scenario)


def test_register_reply_and_reregistration() -> None:
    async def scenario() -> None:
        async with relay(transceivers=0) as env:
            body = {"id": 7, "control_url": "http://10.0.0.9:8080", "capacity": 3}
            seven = {"X-Test-Transceiver": "7"}
            resp = await env.internal.post("/v1/transceivers", json=body, headers=seven)
            assert resp.status == 201
            assert resp.headers["Location"] == "/v1/transceivers/7"
            assert await resp.json() == {**body, "calls": 0, "healthy": True, "draining": False}
            resp = await env.internal.post("/v1/transceivers", json={**body, "capacity": 5}, headers=seven)
            assert resp.status == 201
            assert [t.capacity for t in env.registry.transceivers()] == [5]

    run(scenario)


def test_heartbeat_unknown_404_and_bad_body_400() -> None:
    async def scenario() -> None:
        async with relay(transceivers=1) as env:
            resp = await env.internal.put("/v1/transceivers/9/heartbeat", json={"healthy": True})
            assert await _error(resp, 404) == "unknown transceiver 9: register first"
            resp = await env.internal.put("/v1/transceivers/1/heartbeat", json={"calls": []})
            assert await _error(resp, 400) == "invalid request body: healthy: Field required"
            resp = await env.internal.put("/v1/transceivers/1/heartbeat", json={"healthy": True, "calls": ["x"]})
            assert await _error(resp, 400) == "invalid request body: calls.0: Input should be a valid integer"

    run(scenario)


def test_heartbeat_reconciles_calls() -> None:
    async def scenario() -> None:
        async with relay(transceivers=1) as env:
            conn_ids = []
            for _ in range(2):
                _, resp = await env.place()
                assert resp.status == 201
                conn_ids.append(env.registry.get_call_by_id(resp.headers["Location"].split("/")[-1]).conn_id)
            resp = await env.internal.put(
                "/v1/transceivers/1/heartbeat", json={"healthy": True, "calls": [conn_ids[0]]}
            )
            assert resp.status == 204
            assert [c.conn_id for c in env.registry.calls()] == [conn_ids[0]]
            assert env.ended == [(conn_ids[1], "transceiver-closed")]
            # The relay ended it on the transceiver's word: it sends no DELETE back.
            assert env.fakes[0].deleted == []

    run(scenario)


# -- construction ---------------------------------------------------------------


def test_make_app_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="hint key must be at least 16 bytes"):
        make_app(Registry(), hint_key=b"short", public_addrs=PUBLIC)
    with pytest.raises(ValueError, match="at least one public address is needed"):
        make_app(Registry(), hint_key=KEY, public_addrs=[])
    with pytest.raises(ValueError, match="is not an"):
        make_app(Registry(), hint_key=KEY, public_addrs=[("vip.example", 3478)])


def test_the_talk_page_is_served_only_when_configured() -> None:
    async def scenario() -> None:
        async with relay(transceivers=1) as env:
            resp = await env.http.get("/")
            assert resp.status in (404, 405)  # off by default: a production relay serves no page
        async with relay(transceivers=1, page=True) as env:
            resp = await env.http.get("/")
            assert resp.status == 200 and resp.content_type == "text/html"
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            body = await resp.text()
            assert "<title>splitrelay: talk to the agent</title>" in body
            assert 'fetch("/v1/calls"' in body  # same origin: no CORS needed

    run(scenario)


def test_the_answer_offers_tcp_candidates_when_given() -> None:
    async def scenario() -> None:
        async with relay(transceivers=1, tcp_addrs=[("203.0.113.10", 443)]) as env:
            pc, offer = await env.offer()
            resp = await env.http.post("/v1/calls", data=offer, headers={"Content-Type": "application/sdp"})
            answer = await resp.text()
            assert resp.status == 201, answer
            tcp = [line for line in answer.splitlines() if " tcp " in line and line.startswith("a=candidate:")]
            assert tcp and all(line.endswith("203.0.113.10 443 typ host tcptype passive") for line in tcp)

    run(scenario)


# -- an offer in several TCP segments ----------------------------------------


def test_an_offer_sent_in_two_writes_is_read_whole() -> None:
    """A slow link or a proxy splits a body: the second half arrives 300 ms
    after the first. The relay waits for the whole body (Content-Length)."""
    async def scenario() -> None:
        async with relay(transceivers=1) as env:
            _, offer = await env.offer()
            body = offer.encode()
            reader, writer = await asyncio.open_connection(env.http.server.host, env.http.server.port)
            writer.write(b"POST /v1/calls HTTP/1.1\r\nHost: relay\r\nContent-Type: application/sdp\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body[:len(body) // 2])
            await writer.drain()
            await asyncio.sleep(0.3)  # pacing: the second write must be a segment of its own, later
            writer.write(body[len(body) // 2:])
            await writer.drain()
            reply = await reader.read()
            writer.close()
            status = reply.split(b"\r\n", 1)[0]
            assert status == b"HTTP/1.1 201 Created", reply[:300]
            assert len(env.registry.calls()) == 1

    run(scenario)
