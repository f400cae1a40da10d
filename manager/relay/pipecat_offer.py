"""Pipecat's SmallWebRTC signaling, so that Pipecat's own clients (the
`@pipecat-ai/small-webrtc-transport` JS client, the prebuilt page) place
calls through the relay unmodified:

    POST  /api/offer  {"sdp", "type": "offer", "pc_id"?, "restart_pc"?, "requestData"?}
                      -> 200 {"sdp", "type": "answer", "pc_id"}: a new call; pc_id is its call id
    PATCH /api/offer  {"pc_id", "candidates": [{"candidate", "sdp_mid", "sdp_mline_index"}]}
                      -> 200 {"status": "success"}: trickled candidates checked and counted

A POST naming a live call's pc_id asks Pipecat's server to renegotiate that
connection; the relay does not renegotiate (the call keeps its media and
survives network changes without it) and answers 409. `requestData` is
handed to the agent as the session config (AgentSession.config), as a
Realtime `session` is. Credentials and bounds are WHIP's.
"""

from __future__ import annotations

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
        if body.pc_id is not None and self.desk.registry.get_call_by_id(body.pc_id) is not None:
            self.desk.counters.refused("renegotiation")
            return problem(409, "this connection is live: the relay does not renegotiate a call "
                           "(it keeps its media through network changes); end it or place a new one")
        placed = await self.desk.place(body.sdp, grant, setup, session=body.request_data)
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
