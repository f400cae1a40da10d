"""The Realtime-style calls endpoint: the offer as application/sdp or a
multipart form with a `session` JSON that reaches the transceiver (and so the
call's agent), Location under /v1/realtime/calls, DELETE, and bad forms."""

from __future__ import annotations

import json
import re

import aiohttp

from manager.relay.call_desk import SignalingCounters
from manager.transceiver.agent import AgentSession
from tests.support.signaling import SDP, problem, relay, run

SESSION = {"type": "realtime", "model": "echo", "instructions": "Speak like a pirate."}


def form(offer: str | None, session: str | None) -> aiohttp.FormData:
    data = aiohttp.FormData()
    if offer is not None:
        data.add_field("sdp", offer, content_type="application/sdp")
    if session is not None:
        data.add_field("session", session, content_type="application/json")
    return data


def test_sdp_and_multipart_offers_place_calls_and_the_session_reaches_the_transceiver() -> None:
    async def scenario() -> None:
        async with relay(transceivers=1) as env:
            pc, offer = await env.offer()
            resp = await env.http.post("/v1/realtime/calls", data=offer, headers=SDP)
            assert resp.status == 201, await resp.text()
            assert resp.content_type == "application/sdp"
            assert re.fullmatch(r"/v1/realtime/calls/[0-9a-f]{32}", resp.headers["Location"])
            assert "session" not in env.fakes[0].created[-1]

            pc, offer = await env.offer()
            resp = await env.http.post("/v1/realtime/calls", data=form(offer, json.dumps(SESSION)))
            assert resp.status == 201, await resp.text()
            assert (await resp.text()).startswith("v=0")
            assert env.fakes[0].created[-1]["session"] == SESSION
            location = resp.headers["Location"]
            call_id = location.rsplit("/", 1)[1]
            assert env.registry.get_call_by_id(call_id) is not None
            resp = await env.http.delete(location)
            assert resp.status == 204
            assert env.registry.get_call_by_id(call_id) is None
            assert await env.http.delete(location) is not None

    run(scenario)


def test_a_bad_session_or_form_is_a_400_naming_the_field_and_places_nothing() -> None:
    async def scenario() -> None:
        counters = SignalingCounters()
        async with relay(transceivers=1, counters=counters) as env:
            _, offer = await env.offer()
            cases = [
                (form(offer, '{"instructions": "unterminated'), "session: not valid JSON (Unterminated string starting at: "
                 "line 1 column 18)", "bad-session"),
                (form(offer, "[1, 2]"), "session: must be a JSON object, not list", "bad-session"),
                (form(offer, '{"instructions": 7}'), "session.instructions: must be a string", "bad-session"),
                (form(None, json.dumps(SESSION)), "sdp: missing form field (the offer)", None),
            ]
            for data, detail, code in cases:
                got = await problem(await env.http.post("/v1/realtime/calls", data=data), 400)
                assert got["detail"] == detail
                assert got.get("code") == code
            assert counters.refusals("bad-form") == 4
            got = await problem(await env.http.post("/v1/realtime/calls", data="{}",
                                                    headers={"Content-Type": "application/json"}), 415)
            assert got["detail"] == "Content-Type must be application/sdp or multipart/form-data"
            assert env.fakes[0].created == [] and env.registry.calls() == []

    run(scenario)


def test_the_session_config_moves_with_the_agent_session() -> None:
    async def scenario() -> None:
        old = AgentSession(7, config=SESSION)
        state = json.loads(json.dumps(old.export_state()))  # as a migration carries it
        new = AgentSession(7)
        new.import_state(state)
        assert new.config == SESSION
        old.close()
        new.close()

    run(scenario)
