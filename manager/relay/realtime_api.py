"""The Realtime-style calls endpoint, the shape OpenAI's Realtime WebRTC
clients use, over the same placement as WHIP:

    POST   /v1/realtime/calls             application/sdp, or multipart/form-data with
                                          `sdp` and `session` (a JSON object the call's
                                          agent reads as AgentSession.config)
                                          -> 201 answer SDP, Location: /v1/realtime/calls/{id}
    DELETE /v1/realtime/calls/{call_id}   -> 204: the call ends

Credentials and creation bounds are WHIP's (manager.relay.signaling). A
`session` that is not a JSON object is refused (400 naming the field and
where it stops parsing) before any transceiver is asked.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import BodyPartReader, web

from manager.observability import tracing
from manager.relay.call_desk import CallDesk
from manager.relay.credentials import CreateGrant
from manager.relay.problems import problem

MULTIPART = "multipart/form-data"
MAX_PARTS = 8  # sdp and session, and room for fields a newer client adds (ignored)


class BadForm(Exception):
    """A form the endpoint refuses (400 with this one-line message)."""


def parse_session(raw: bytes) -> dict[str, Any]:
    """The `session` part as a JSON object; BadForm naming the field otherwise."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadForm("session: not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise BadForm(f"session: not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})") from None
    if not isinstance(value, dict):
        raise BadForm(f"session: must be a JSON object, not {type(value).__name__}")
    for key in ("instructions", "model", "voice"):
        if key in value and not isinstance(value[key], str):
            raise BadForm(f"session.{key}: must be a string")
    return value


class RealtimeCalls:
    def __init__(self, desk: CallDesk) -> None:
        self.desk = desk

    async def create(self, request: web.Request) -> web.Response:
        return await self.desk.admit(request, self._create, ("application/sdp", MULTIPART))

    async def _read_form(self, request: web.Request) -> tuple[bytes, bytes | None]:
        """(sdp, session or None) from a multipart form, within the body cap."""
        reader = await request.multipart()
        sdp: bytes | None = None
        session: bytes | None = None
        budget = self.desk.limits.max_body
        for _ in range(MAX_PARTS):
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise BadForm("nested multipart bodies are not accepted")
            data = bytearray()
            while chunk := await part.read_chunk():
                data += chunk
                if len(data) > budget:
                    raise BadForm(f"form too large: more than {self.desk.limits.max_body} bytes")
            budget -= len(data)
            if part.name == "sdp":
                sdp = bytes(data)
            elif part.name == "session":
                session = bytes(data)
        else:
            raise BadForm(f"more than {MAX_PARTS} form fields")
        if sdp is None:
            raise BadForm("sdp: missing form field (the offer)")
        return sdp, session

    async def _create(self, request: web.Request, grant: CreateGrant, setup: tracing.Trace) -> web.Response:
        session: dict[str, Any] | None = None
        try:
            if request.content_type == MULTIPART:
                raw, session_raw = await self._read_form(request)
                if session_raw is not None:
                    session = parse_session(session_raw)
            else:
                raw = await self.desk.read_body(request)
                if len(raw) > self.desk.limits.max_body:
                    raise BadForm(f"offer too large: more than {self.desk.limits.max_body} bytes")
            offer = raw.decode("utf-8")
        except BadForm as exc:
            self.desk.counters.refused("bad-form")
            return problem(400, str(exc), kind="bad-session" if str(exc).startswith("session") else None)
        except UnicodeDecodeError:
            return problem(400, "bad offer: SDP is not valid UTF-8")
        except ValueError as exc:  # aiohttp's multipart parser: a malformed form
            return problem(400, f"malformed multipart form: {exc}")
        placed = await self.desk.place(offer, grant, setup, session=session)
        if isinstance(placed, web.Response):
            return placed
        return web.Response(status=201, text=placed.answer, content_type="application/sdp",
                            headers={"Location": f"/v1/realtime/calls/{placed.call.call_id}"})

    async def delete(self, request: web.Request) -> web.Response:
        call = self.desk.own_call(request)
        if isinstance(call, web.Response):
            return call
        await self.desk.end_call(call)
        return web.Response(status=204)


def add_routes(app: web.Application, desk: CallDesk) -> None:
    calls = RealtimeCalls(desk)
    app.router.add_post("/v1/realtime/calls", calls.create)
    app.router.add_delete("/v1/realtime/calls/{call_id}", calls.delete)
