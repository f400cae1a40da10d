"""The internal listener: transceivers register and heartbeat here, over
mutual TLS only. A transceiver's identity is its certificate (transceiver-N in
its subjectAltName, manager.pki): it may register and heartbeat only as N, and
its control address must lie in the configured internal prefixes.

    POST   /v1/transceivers                  {"id", "control_url", "capacity"} -> 201
    PUT    /v1/transceivers/{id}/heartbeat   {"healthy", "calls"} -> 204 (404: register again)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from urllib.parse import urlsplit

from aiohttp import web

from manager import pki
from manager.protocol.api import ApiError, Heartbeat, Registration
from manager.protocol.http import error_middleware, model_body, text_error
from manager.relay.registry import Registry, UnknownTransceiverError

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024


def peer_identity(request: web.Request) -> pki.Identity | None:
    """The identity in the TLS client certificate of this request's connection
    (verified against the CA by the handshake), or None."""
    transport = request.transport
    return pki.peer_identity(transport.get_extra_info("peercert") if transport is not None else None)


class _Internal:
    def __init__(self, registry: Registry, allows: Callable[[str], bool],
                 identify: Callable[[web.Request], pki.Identity | None],
                 on_register: Callable[[int], None] = lambda transceiver_id: None) -> None:
        self.registry = registry
        self.on_register = on_register
        self.allows = allows
        self.identify = identify

    def _caller(self, request: web.Request, transceiver_id: int) -> None:
        who = self.identify(request)
        if who is None or who.role != "transceiver":
            raise ApiError(403, "a transceiver certificate from this relay's CA is required")
        if who.transceiver_id != transceiver_id:
            raise ApiError(403, f"this certificate is for transceiver {who.transceiver_id}, not {transceiver_id}")

    async def register_transceiver(self, request: web.Request) -> web.Response:
        body = await model_body(request, Registration)
        if not 1 <= body.id <= 0xFFFF:
            raise ApiError(400, "invalid registration: transceiver id must be an integer in 1..65535")
        self._caller(request, body.id)
        host = urlsplit(body.control_url).hostname or ""
        if not self.allows(host):
            raise ApiError(403, f"control_url host {host!r} is not an address in the internal prefixes")
        try:
            t = self.registry.register_transceiver(body.id, body.control_url, body.capacity)
        except ValueError as exc:
            raise ApiError(400, f"invalid registration: {exc}") from None
        log.info("transceiver %d registered at %s (capacity %d)", t.id, t.control_url, t.capacity)
        self.on_register(t.id)
        return web.json_response(t.to_dict(), status=201, headers={"Location": f"/v1/transceivers/{t.id}"})

    async def heartbeat(self, request: web.Request) -> web.Response:
        transceiver_id = int(request.match_info["id"])
        self._caller(request, transceiver_id)
        body = await model_body(request, Heartbeat)
        try:
            orphans = self.registry.heartbeat(transceiver_id, body.calls, body.healthy)
        except UnknownTransceiverError:
            return text_error(404, f"unknown transceiver {transceiver_id}: register first")
        if orphans:
            # Not closed from here: after a manager restart every live call is
            # unknown to the (empty) registry and must keep running.
            log.debug("transceiver %d holds unknown conn_ids %s", transceiver_id, orphans)
        return web.Response(status=204)


def make_internal_app(registry: Registry, *, allows: Callable[[str], bool],
                      identify: Callable[[web.Request], pki.Identity | None] = peer_identity,
                      on_register: Callable[[int], None] = lambda transceiver_id: None) -> web.Application:
    """The transceivers' API. Serve it only with pki.server_context (the
    handshake verifies the chain; `identify` reads who the certificate names)."""
    api = _Internal(registry, allows, identify, on_register)
    app = web.Application(client_max_size=MAX_BODY, middlewares=[error_middleware(text_error, refusals=log)])
    app.router.add_post("/v1/transceivers", api.register_transceiver)
    app.router.add_put(r"/v1/transceivers/{id:\d{1,5}}/heartbeat", api.heartbeat)
    return app
