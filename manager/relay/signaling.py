"""The relay's HTTP API: SDP exchange for clients, registration for transceivers.

Client-facing (WHIP-like: one POST with the offer, the answer in the reply):
    POST   /v1/calls              application/sdp offer -> 201 answer, Location
    DELETE /v1/calls/{call_id}    -> 204
    GET    /v1/calls[/{call_id}], GET /v1/transceivers -> JSON
Transceiver-facing:
    POST   /v1/transceivers                  {"id", "control_url", "capacity"} -> 201
    PUT    /v1/transceivers/{id}/heartbeat   {"healthy", "calls"} -> 204 (404: register again)

Placing a call: validate the offer, pick a transceiver, mint the server ufrag
carrying the routing hint, have the transceiver answer the offer (with the
client's candidates stripped) using that ufrag, then give the client the
answer with the relay's public address(es) as the only candidates. Every
failure is a one-line text/plain reply, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence

from aiohttp import web

from manager.protocol.api import ApiError, Heartbeat, M, Registration, parse_body
from manager.protocol.sdp import (
    SdpError,
    check_public_addrs,
    ice_credentials,
    rewrite_candidates,
    strip_candidates,
    validate,
)
from manager.protocol.ufrag import encode_ufrag
from manager.relay.registry import PlacementError, Registry, Transceiver, UnknownTransceiverError
from manager.relay.transceiver_client import TransceiverClient, TransceiverError

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024  # an SDP offer is a few KiB; anything bigger is not one


# -- responses -------------------------------------------------------------------


def _text(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", content_type="text/plain")


def _json(data: object, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, indent=1))


async def _json_body(request: web.Request, model: type[M]) -> M | web.Response:
    if request.content_type != "application/json":
        return _text(415, "Content-Type must be application/json")
    try:
        return parse_body(await request.read(), model)
    except ApiError as exc:
        return _text(exc.status, str(exc))


# -- the API -------------------------------------------------------------------


class _Api:
    def __init__(
        self,
        registry: Registry,
        hint_key: bytes,
        public_addrs: list[tuple[str, int]],
        client: TransceiverClient,
    ) -> None:
        self.registry = registry
        self.hint_key = hint_key
        self.public_addrs = public_addrs
        self.client = client
        self._background: set[asyncio.Task[None]] = set()

    # Client-facing -----------------------------------------------------------

    async def create_call(self, request: web.Request) -> web.Response:
        if request.content_type != "application/sdp":
            return _text(415, "Content-Type must be application/sdp")
        try:
            offer = (await request.read()).decode("utf-8")
        except UnicodeDecodeError:
            return _text(400, "bad offer: SDP is not valid UTF-8")
        try:
            validate(offer, "offer")
            client_ufrag, _ = ice_credentials(offer)
        except SdpError as exc:
            return _text(400, f"bad offer: {exc}")

        try:
            transceiver = self.registry.place()
        except PlacementError as exc:
            return _text(503, f"no transceiver available: {exc}")
        conn_id = self.registry.allocate_conn_id()
        server_ufrag = encode_ufrag(self.hint_key, transceiver.id, conn_id)
        # Recorded before the transceiver is asked, so that concurrent offers
        # already see this one in the transceiver's load.
        call = self.registry.add_call(
            conn_id=conn_id,
            transceiver_id=transceiver.id,
            client_ufrag=client_ufrag,
            server_ufrag=server_ufrag,
        )
        try:
            answer, owner = await self.client.create_call(
                transceiver, conn_id, server_ufrag, strip_candidates(offer)
            )
        except TransceiverError as exc:
            self.registry.end_call(conn_id, "placement-failed")
            log.warning("placing conn_id %d on %d: %s", conn_id, transceiver.id, exc)
            return _text(502, f"transceiver {transceiver.id} failed: {exc}")
        except BaseException:
            # Cancelled (client gone, shutdown): the transceiver may hold the call.
            self.registry.end_call(conn_id, "placement-failed")
            self._delete_later(transceiver, conn_id)
            raise

        problem = self._check_answer(answer, server_ufrag)
        if problem is None and self.registry.get_call(conn_id) is not call:
            problem = "the call ended while it was being placed"
        if problem is not None:
            self.registry.end_call(conn_id, "placement-failed")
            self._delete_later(transceiver, conn_id)
            log.warning("placing conn_id %d on %d: %s", conn_id, transceiver.id, problem)
            return _text(502, f"transceiver {transceiver.id} failed: {problem}")

        self.registry.activate(conn_id, owner)
        log.info(
            "call %s conn_id %d placed on transceiver %d", call.call_id, conn_id, transceiver.id
        )
        return web.Response(
            status=201,
            text=rewrite_candidates(answer, self.public_addrs),
            content_type="application/sdp",
            headers={"Location": f"/v1/calls/{call.call_id}"},
        )

    @staticmethod
    def _check_answer(answer: str, server_ufrag: str) -> str | None:
        try:
            validate(answer, "answer")
            ufrag, _ = ice_credentials(answer)
        except SdpError as exc:
            return f"invalid answer: {exc}"
        if ufrag != server_ufrag:
            # The client would send the hint-less ufrag: the relay could not route it.
            return f"answer uses ufrag {ufrag!r}, not the minted one"
        return None

    def _delete_later(self, transceiver: Transceiver, conn_id: int) -> None:
        """Best-effort cleanup that must not delay (or fail) the reply."""

        async def delete() -> None:
            try:
                await self.client.delete_call(transceiver, conn_id)
            except TransceiverError as exc:
                log.warning("cleaning up conn_id %d: %s", conn_id, exc)

        task = asyncio.get_running_loop().create_task(delete())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def delete_call(self, request: web.Request) -> web.Response:
        call = self.registry.get_call_by_id(request.match_info["call_id"])
        if call is None:
            return _text(404, "unknown call")
        transceiver_id = call.transceiver_id
        # Ended first: the relay stops forwarding even if the transceiver is unreachable.
        self.registry.end_call(call.conn_id, "client-hangup")
        try:
            transceiver = self.registry.get_transceiver(transceiver_id)
            await self.client.delete_call(transceiver, call.conn_id)
        except (TransceiverError, UnknownTransceiverError) as exc:
            log.warning("ending conn_id %d on %d: %s", call.conn_id, transceiver_id, exc)
        return web.Response(status=204)

    async def list_calls(self, request: web.Request) -> web.Response:
        return _json({"calls": [call.to_dict() for call in self.registry.calls()]})

    async def get_call(self, request: web.Request) -> web.Response:
        call = self.registry.get_call_by_id(request.match_info["call_id"])
        if call is None:
            return _text(404, "unknown call")
        return _json(call.to_dict())

    async def list_transceivers(self, request: web.Request) -> web.Response:
        return _json({"transceivers": [t.to_dict() for t in self.registry.transceivers()]})

    # Transceiver-facing ------------------------------------------------------

    async def register_transceiver(self, request: web.Request) -> web.Response:
        body = await _json_body(request, Registration)
        if isinstance(body, web.Response):
            return body
        assert isinstance(body, Registration)
        try:
            t = self.registry.register_transceiver(body.id, body.control_url, body.capacity)
        except ValueError as exc:
            return _text(400, f"invalid registration: {exc}")
        log.info("transceiver %d registered at %s (capacity %d)", t.id, t.control_url, t.capacity)
        return web.json_response(
            t.to_dict(), status=201, headers={"Location": f"/v1/transceivers/{t.id}"}
        )

    async def heartbeat(self, request: web.Request) -> web.Response:
        transceiver_id = int(request.match_info["id"])
        body = await _json_body(request, Heartbeat)
        if isinstance(body, web.Response):
            return body
        assert isinstance(body, Heartbeat)
        try:
            orphans = self.registry.heartbeat(transceiver_id, body.calls, body.healthy)
        except UnknownTransceiverError:
            return _text(404, f"unknown transceiver {transceiver_id}: register first")
        if orphans:
            # Not closed from here: after a manager restart every live call is
            # unknown to the (empty) registry and must keep running.
            log.debug("transceiver %d holds unknown conn_ids %s", transceiver_id, orphans)
        return web.Response(status=204)

    async def cleanup(self, app: web.Application) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)


def make_app(
    registry: Registry,
    *,
    hint_key: bytes,
    public_addrs: Sequence[tuple[str, int]],
    transceiver_client: TransceiverClient | None = None,
) -> web.Application:
    """Build the signaling application. A client passed in stays the caller's to close."""
    encode_ufrag(hint_key, 1, 1)  # fail now, not on the first call, if the key is unusable
    addrs = [(addr, port) for addr, port, _ in check_public_addrs(public_addrs)]
    client = transceiver_client if transceiver_client is not None else TransceiverClient()
    api = _Api(registry, hint_key, addrs, client)

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/v1/calls", api.create_call)
    app.router.add_get("/v1/calls", api.list_calls)
    app.router.add_get("/v1/calls/{call_id}", api.get_call)
    app.router.add_delete("/v1/calls/{call_id}", api.delete_call)
    app.router.add_get("/v1/transceivers", api.list_transceivers)
    app.router.add_post("/v1/transceivers", api.register_transceiver)
    app.router.add_put(r"/v1/transceivers/{id:\d{1,5}}/heartbeat", api.heartbeat)
    app.on_cleanup.append(api.cleanup)
    if transceiver_client is None:

        async def close_client(app: web.Application) -> None:
            await client.close()

        app.on_cleanup.append(close_client)
    return app
