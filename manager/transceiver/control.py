"""The transceiver's control API (aiohttp), used by relayd.

Routes (JSON bodies, errors as ``{"error": "..."}``):

* ``POST /calls`` ``{"conn_id", "ufrag", "offer", "session"?}`` -> 201 ``{"answer", "owner"}``
  (``session``: a Realtime-style session object, the agent's ``AgentSession.config``);
  400 bad input, 409 duplicate conn_id/ufrag, 503 at capacity or stopping.
* ``DELETE /calls/{conn_id}`` -> 204, 404 unknown.
* ``GET /calls/{conn_id}`` -> call state and export summary, no secrets.
* ``GET /calls/{conn_id}/quality`` -> its RTCP figures per direction, RTT and
  MOS (rtcp_stats), live or of a call that ended here lately (``"ended": true``).
* ``GET /calls`` -> ``{"calls": [conn_id, ...]}``.
* ``GET /calls/{conn_id}/sideband`` -> websocket: the call's sideband events
  (manager.transceiver.sideband); 404 unknown.
* ``GET /health`` -> ``{"id", "healthy", "capacity", "calls", ...}``.

Live migration (docs/transceiver.md, "Migration"):

* ``POST /calls/{conn_id}/export`` ``{"freeze": bool}`` -> 200 state with secrets;
  404 unknown, 409 not connected or not migratable.
* ``POST /calls/{conn_id}/unfreeze`` -> 204 (the call resumes sending here).
* ``POST /calls/{conn_id}/release`` -> 204 (dropped quietly: it moved away).
* ``POST /calls/import`` ``{"conn_id", "state"}`` -> 201 ``{"owner"}``;
  400 bad state, 409 duplicate, 503 at capacity.
* ``POST /calls/{conn_id}/activate`` -> 204 (an imported call starts sending);
  409 for a call that was not imported.

ICE restart (docs/http-api.md, "ICE restart"):

* ``POST /calls/{conn_id}/ice-restart`` ``{"ufrag", "remote_ufrag", "remote_pwd"}`` -> 200
  ``{"ufrag", "pwd"}``: the call's new local credentials (``ufrag`` minted by
  relayd); 400 bad credentials, 404 unknown, 409 frozen for a migration or
  a ufrag in use, 422 a call that cannot restart at all (kept on aiortc).

NAT rebinding (docs/security.md):

* ``POST /calls/{conn_id}/path`` ``{"old": [addr, port] | null, "new": [addr, port]}`` -> 200
  ``{"repointed": bool}``: replies go to a relay that took the call's client over
* ``POST /calls/{conn_id}/media-check`` ``{"packet": base64, "path"?: {...}}`` -> 200
  ``{"authentic": bool}``: a packet the relay holds from a client address it
  does not know; if it authenticates with the call's SRTP keys it is taken as
  the call's media, and the relay moves the client's flow to that address.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from manager import pki
from manager.observability import tracing
from manager.observability.logs import bind_call
from manager.protocol.http import error_middleware, json_body, json_error

from .errors import (
    CallStateConflict,
    CapacityExceeded,
    DuplicateCall,
    InvalidRequest,
    TransceiverError,
    UnknownCall,
    Unsupported,
)
from .sideband import serve_sideband
from .transceiver import Transceiver

MIN_SRTP, MAX_SRTP = 12, 2048  # an RTP header at least; a datagram the relay would hold

logger = logging.getLogger(__name__)

TRANSCEIVER_KEY = web.AppKey("transceiver", Transceiver)
#: Bodies are an SDP offer plus two small fields; browsers' offers are a few KiB.
MAX_BODY = 256 * 1024


def _conn_id_from_path(request: web.Request) -> int:
    raw = request.match_info["conn_id"]
    try:
        conn_id = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(
            text='{"error": "conn_id must be an integer"}', content_type="application/json"
        ) from None
    bind_call(conn_id=conn_id)  # the request's log lines (and its tasks') name the call
    return conn_id


async def _post_call(request: web.Request) -> web.Response:
    tx = request.app[TRANSCEIVER_KEY]
    body = await json_body(request)
    missing = [k for k in ("conn_id", "ufrag", "offer") if k not in body]
    if missing:
        return json_error(400, f"missing field(s): {', '.join(missing)}")
    session = body.get("session")
    if session is not None and not isinstance(session, dict):
        return json_error(400, "session must be a JSON object")
    answer, owner = await tx.create_call(body["conn_id"], body["ufrag"], body["offer"], session=session)
    return web.json_response({"answer": answer, "owner": owner}, status=201)


async def _delete_call(request: web.Request) -> web.Response:
    tx = request.app[TRANSCEIVER_KEY]
    await tx.close_call(_conn_id_from_path(request))
    return web.Response(status=204)


async def _get_call(request: web.Request) -> web.Response:
    tx = request.app[TRANSCEIVER_KEY]
    return web.json_response(tx.call_info(_conn_id_from_path(request)))


async def _call_quality(request: web.Request) -> web.Response:
    return web.json_response(request.app[TRANSCEIVER_KEY].call_quality(_conn_id_from_path(request)))


async def _export_call(request: web.Request) -> web.Response:
    tx = request.app[TRANSCEIVER_KEY]
    conn_id = _conn_id_from_path(request)
    body = await json_body(request, optional=True)
    freeze = body.get("freeze", False)
    if not isinstance(freeze, bool):
        return json_error(400, "freeze must be true or false")
    return web.json_response(tx.export_call(conn_id, freeze=freeze))


async def _unfreeze_call(request: web.Request) -> web.Response:
    request.app[TRANSCEIVER_KEY].unfreeze_call(_conn_id_from_path(request))
    return web.Response(status=204)


async def _release_call(request: web.Request) -> web.Response:
    await request.app[TRANSCEIVER_KEY].release_call(_conn_id_from_path(request))
    return web.Response(status=204)


async def _activate_call(request: web.Request) -> web.Response:
    request.app[TRANSCEIVER_KEY].activate_call(_conn_id_from_path(request))
    return web.Response(status=204)


async def _check_media(request: web.Request) -> web.Response:
    """The relay's check of a client's new address: is this packet the call's?"""
    conn_id = _conn_id_from_path(request)
    body = await json_body(request)
    try:
        packet = base64.b64decode(body.get("packet", ""), validate=True)
    except (binascii.Error, TypeError, ValueError):
        return json_error(400, "packet must be base64")
    if not MIN_SRTP <= len(packet) <= MAX_SRTP:
        return json_error(400, f"packet must be {MIN_SRTP} to {MAX_SRTP} bytes of SRTP or SRTCP")
    path = _path(body["path"]) if body.get("path") is not None else None
    authentic = await request.app[TRANSCEIVER_KEY].check_media(conn_id, packet, path)
    return web.json_response({"authentic": authentic})


async def _restart_ice(request: web.Request) -> web.Response:
    conn_id = _conn_id_from_path(request)
    body = await json_body(request)
    missing = [k for k in ("ufrag", "remote_ufrag", "remote_pwd") if k not in body]
    if missing:
        return json_error(400, f"missing field(s): {', '.join(missing)}")
    creds = request.app[TRANSCEIVER_KEY].restart_ice(conn_id, body["ufrag"], body["remote_ufrag"],
                                                     body["remote_pwd"])
    return web.json_response(creds)


def _addr(value: Any, name: str) -> tuple[str, int]:
    try:
        host, port = value
        ipaddress.ip_address(host)
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError
    except (TypeError, ValueError):
        raise InvalidRequest(f"{name} must be [address, port]") from None
    return (str(host), port)


def _path(body: Any) -> tuple[tuple[str, int] | None, tuple[str, int]]:
    """(old, new); old null: wherever the call replies now (a relay's new ICE-TCP leg)."""
    if not isinstance(body, dict):
        raise InvalidRequest("path must be an object with old and new")
    old = None if body.get("old") is None else _addr(body.get("old"), "path.old")
    return old, _addr(body.get("new"), "path.new")


async def _repoint_call(request: web.Request) -> web.Response:
    """A relay took over the call's client tuple (failover): replies go to its flow source."""
    conn_id = _conn_id_from_path(request)
    old, new = _path(await json_body(request))
    return web.json_response({"repointed": request.app[TRANSCEIVER_KEY].repoint_call(conn_id, old, new)})


async def _import_call(request: web.Request) -> web.Response:
    tx = request.app[TRANSCEIVER_KEY]
    body = await json_body(request)
    missing = [k for k in ("conn_id", "state") if k not in body]
    if missing:
        return json_error(400, f"missing field(s): {', '.join(missing)}")
    owner = await tx.import_call(body["conn_id"], body["state"])
    return web.json_response({"owner": owner}, status=201)


async def _sideband(request: web.Request) -> web.StreamResponse:
    """A call's sideband events (manager.transceiver.sideband); 404 unknown call."""
    session = request.app[TRANSCEIVER_KEY].agent_session(_conn_id_from_path(request))
    return await serve_sideband(request, session)


async def _list_calls(request: web.Request) -> web.Response:
    return web.json_response({"calls": request.app[TRANSCEIVER_KEY].calls()})


async def _health(request: web.Request) -> web.Response:
    return web.json_response(request.app[TRANSCEIVER_KEY].health())


# Each call-level error has one HTTP status, whichever request raised it.
ERROR_STATUS: dict[type[TransceiverError], int] = {
    InvalidRequest: 400, UnknownCall: 404, DuplicateCall: 409, CallStateConflict: 409, CapacityExceeded: 503,
    Unsupported: 422,
}


def _call_error(request: web.Request, exc: Exception) -> tuple[int, str] | None:
    if not isinstance(exc, TransceiverError):
        return None
    return next((code for cls, code in ERROR_STATUS.items() if isinstance(exc, cls)), 500), str(exc)


_call_errors = error_middleware(json_error, _call_error)


def relayd_only(request: web.Request) -> bool:
    """Whether the TLS client certificate of this connection names relayd
    (the handshake already verified it against the CA)."""
    transport = request.transport
    peer = pki.peer_identity(transport.get_extra_info("peercert") if transport is not None else None)
    return peer == pki.Identity(pki.RELAYD)


def _authorized(check: Callable[[web.Request], bool]):
    @web.middleware
    async def authorized(request: web.Request, handler) -> web.StreamResponse:
        if not check(request):
            logger.warning("refused %s %s from %s: not relayd's certificate", request.method, request.path,
                           request.remote)
            return json_error(403, "relayd's client certificate is required")
        return await handler(request)

    return authorized


def _traced(transceiver_id: int):
    """A request relayd sent within a traced phase continues its trace here
    (``transceiver POST /calls/{conn_id}/export``...)."""

    @web.middleware
    async def traced(request: web.Request, handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        name = f"transceiver {request.method} {route.canonical if route is not None else request.path}"
        conn_id = request.match_info.get("conn_id")
        with tracing.server_span(name, request.headers, transceiver_id=transceiver_id,
                                 conn_id=int(conn_id) if conn_id and conn_id.isdigit() else None) as span:
            resp = await handler(request)
            if span is not None:
                span.set_attribute("http.response.status_code", resp.status)
            return resp

    return traced


def create_app(transceiver: Transceiver, *, authorize: Callable[[web.Request], bool] | None = None,
               ) -> web.Application:
    """The control API. Served with mutual TLS, `authorize=relayd_only` admits
    relayd alone; None (in-process tests over plain HTTP) admits anyone."""
    middlewares = [_call_errors] if authorize is None else [_authorized(authorize), _call_errors]
    if tracing.enabled():  # off: not even a middleware
        middlewares.insert(len(middlewares) - 1, _traced(transceiver.id))
    app = web.Application(client_max_size=MAX_BODY, middlewares=middlewares)
    app[TRANSCEIVER_KEY] = transceiver
    app.router.add_post("/calls", _post_call)
    app.router.add_post("/calls/import", _import_call)
    app.router.add_post("/calls/{conn_id}/export", _export_call)
    app.router.add_post("/calls/{conn_id}/unfreeze", _unfreeze_call)
    app.router.add_post("/calls/{conn_id}/release", _release_call)
    app.router.add_post("/calls/{conn_id}/activate", _activate_call)
    app.router.add_post("/calls/{conn_id}/media-check", _check_media)
    app.router.add_post("/calls/{conn_id}/path", _repoint_call)
    app.router.add_post("/calls/{conn_id}/ice-restart", _restart_ice)
    app.router.add_get("/calls", _list_calls)
    app.router.add_get("/calls/{conn_id}", _get_call)
    app.router.add_get("/calls/{conn_id}/sideband", _sideband)
    app.router.add_get("/calls/{conn_id}/quality", _call_quality)
    app.router.add_delete("/calls/{conn_id}", _delete_call)
    app.router.add_get("/health", _health)
    return app
