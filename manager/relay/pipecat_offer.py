"""Pipecat's SmallWebRTC signaling, so that Pipecat's own clients (the
`@pipecat-ai/small-webrtc-transport` JS client, the prebuilt page) place
calls through the relay unmodified:

    POST  /api/offer  {"sdp", "type": "offer", "pc_id"?, "restart_pc"?, "requestData"?}
                      -> 200 {"sdp", "type": "answer", "pc_id"}: a new call; pc_id is its call id
    PATCH /api/offer  {"pc_id", "candidates": [{"candidate", "sdp_mid", "sdp_mline_index"}]}
                      -> 200 {"status": "success"}: trickled candidates checked and counted
    POST  /start      {"transport": "webrtc", "body"?, ...} -> 200 {"sessionId"}: Pipecat's
                      runner flow (the prebuilt client's); no iceConfig, the relay needs none
    POST|PATCH /sessions/{sessionId}/api/offer   as /api/offer, `body` of /start as requestData

A session from /start is kept SESSION_TTL seconds for its offer (at most
MAX_SESSIONS at once, on the relay that answered /start).

A POST naming a live call's pc_id asks Pipecat's server to renegotiate that
connection; the relay does not renegotiate (the call keeps its media and
survives network changes without it) and answers 409. `requestData` is
handed to the agent as the session config (AgentSession.config), as a
Realtime `session` is. Credentials and bounds are WHIP's.
"""

from __future__ import annotations

import collections
import json
import secrets
import time
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from manager.observability import tracing
from manager.protocol.api import validation_message
from manager.protocol.sdpfrag import FragmentError, parse_fragment
from manager.relay.call_desk import CallDesk
from manager.relay.credentials import CreateGrant
from manager.relay.problems import problem

MAX_CANDIDATES = 64
SESSION_TTL = 120.0
MAX_SESSIONS = 4096


class OfferBody(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    sdp: str
    type: str
    pc_id: str | None = None
    restart_pc: bool | None = None
    request_data: dict[str, Any] | None = Field(default=None, alias="requestData")


class Candidate(BaseModel):
    model_config = ConfigDict(extra="ignore")
    candidate: str
    sdp_mid: str | None = None
    sdp_mline_index: int | None = None


class PatchBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    pc_id: str
    candidates: list[Candidate] = Field(max_length=MAX_CANDIDATES)


def _parse(raw: bytes, model: type[BaseModel]) -> BaseModel | web.Response:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        return problem(400, f"invalid request body: {validation_message(exc)}")


class PipecatOffer:
    def __init__(self, desk: CallDesk) -> None:
        self.desk = desk
        # sessionId -> (the /start body, when): what the session's offer hands its agent.
        self._sessions: collections.OrderedDict[str, tuple[dict[str, Any] | None, float]] = \
            collections.OrderedDict()

    async def start(self, request: web.Request) -> web.Response:
        """Pipecat's runner /start for WebRTC: a session id for the offer to come."""
        # No credential here: the offer that follows is checked as every creation is.
        try:
            raw = await self.desk.read_body(request)
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            return problem(400, "body is not JSON")
        if not isinstance(body, dict):
            return problem(400, "body must be a JSON object")
        transport = body.get("transport", "webrtc")
        if transport != "webrtc":
            return problem(400, f"transport {transport!r:.40} is not served here: the relay speaks WebRTC only")
        data = body.get("body")
        if data is not None and not isinstance(data, dict):
            return problem(400, "body.body: must be a JSON object")
        now = time.monotonic()
        while self._sessions and (len(self._sessions) >= MAX_SESSIONS
                                  or now - next(iter(self._sessions.values()))[1] > SESSION_TTL):
            self._sessions.popitem(last=False)
        session_id = secrets.token_hex(16)
        self._sessions[session_id] = (data, now)
        return web.json_response({"sessionId": session_id})

    def _session(self, request: web.Request) -> dict[str, Any] | None | web.Response:
        """The /start body of the URL's session (None outside /sessions/...)."""
        session_id = request.match_info.get("session_id")
        if session_id is None:
            return None
        entry = self._sessions.get(session_id)
        if entry is None or time.monotonic() - entry[1] > SESSION_TTL:
            return problem(404, "unknown or expired session: POST /start first")
        return entry[0] or {}

    async def post(self, request: web.Request) -> web.Response:
        return await self.desk.admit(request, self._create, ("application/json",))

    async def _create(self, request: web.Request, grant: CreateGrant, setup: tracing.Trace) -> web.Response:
        raw = await self.desk.read_body(request)
        if len(raw) > self.desk.limits.max_body:
            return problem(413, f"offer too large: more than {self.desk.limits.max_body} bytes")
        body = _parse(raw, OfferBody)
        if isinstance(body, web.Response):
            return body
        assert isinstance(body, OfferBody)
        if body.type != "offer":
            return problem(400, f"type must be 'offer', not {body.type!r:.40}")
        started = self._session(request)
        if isinstance(started, web.Response):
            return started
        if body.pc_id is not None and self.desk.registry.get_call_by_id(body.pc_id) is not None:
            self.desk.counters.refused("renegotiation")
            return problem(409, "this connection is live: the relay does not renegotiate a call "
                           "(it keeps its media through network changes); end it or place a new one")
        placed = await self.desk.place(body.sdp, grant, setup, session=body.request_data or started)
        if isinstance(placed, web.Response):
            return placed
        return web.json_response({"sdp": placed.answer, "type": "answer", "pc_id": placed.call.call_id})

    async def patch(self, request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return problem(415, "Content-Type must be application/json")
        raw = await self.desk.read_body(request)
        if len(raw) > self.desk.limits.max_body:
            return problem(413, f"body too large: more than {self.desk.limits.max_body} bytes")
        body = _parse(raw, PatchBody)
        if isinstance(body, web.Response):
            self.desk.counters.refused("bad-fragment")
            return body
        assert isinstance(body, PatchBody)
        call = self.desk.own_call(request, body.pc_id)
        if isinstance(call, web.Response):
            return call
        # An empty candidate is end-of-candidates (RFC 8840); the rest must parse.
        lines = [c.candidate.removeprefix("a=").removeprefix("candidate:") for c in body.candidates if c.candidate]
        try:
            frag = parse_fragment("\n".join(f"a=candidate:{line}" for line in lines))
        except FragmentError as exc:
            self.desk.counters.refused("bad-fragment")
            return problem(400, f"bad candidate: {exc}")
        self.desk.counters.candidates(len(frag.candidates))
        return web.json_response({"status": "success"})


def add_routes(app: web.Application, desk: CallDesk) -> None:
    offer = PipecatOffer(desk)
    app.router.add_post("/api/offer", offer.post)
    app.router.add_patch("/api/offer", offer.patch)
    app.router.add_post("/start", offer.start)
    app.router.add_post("/sessions/{session_id}/api/offer", offer.post)
    app.router.add_patch("/sessions/{session_id}/api/offer", offer.patch)
