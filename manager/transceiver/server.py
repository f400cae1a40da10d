"""Transceiver control API (aiohttp) and registration with the relay manager.

Routes (JSON bodies, errors as ``{"error": "..."}``):

* ``POST /calls`` ``{"conn_id", "ufrag", "offer"}`` -> 201 ``{"answer", "owner"}``;
  400 bad input, 409 duplicate conn_id/ufrag, 503 at capacity or stopping.
* ``DELETE /calls/{conn_id}`` -> 204, 404 unknown.
* ``GET /calls/{conn_id}`` -> call state and export summary, no secrets.
* ``GET /calls`` -> ``{"calls": [conn_id, ...]}``.
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

The :class:`Registrar` registers with ``POST {relay_url}/v1/transceivers`` and
then heartbeats ``PUT {relay_url}/v1/transceivers/{id}/heartbeat`` every
second (and right away when a call ends), re-registering on 404.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from .agent import AgentFactory, EchoAgent
from .endpoint import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_CONSENT_TIMEOUT,
    CallStateConflict,
    CapacityExceeded,
    DuplicateCall,
    InvalidRequest,
    Transceiver,
    TransceiverError,
    UnknownCall,
)

logger = logging.getLogger(__name__)

TRANSCEIVER_KEY = web.AppKey("transceiver", Transceiver)
#: Bodies are an SDP offer plus two small fields; browsers' offers are a few KiB.
MAX_BODY = 256 * 1024


@dataclass
class TransceiverConfig:
    """Everything :func:`run` needs; built explicitly by the CLI or a test."""

    id: int
    listen_host: str = "127.0.0.1"
    listen_port: int = 8700
    relay_url: str | None = None  # None: run without registering
    capacity: int = 100
    bind_addrs: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    ice_port: int = 0
    hint_key: bytes | None = None  # for verifying routing hints later; unused now
    control_url: str | None = None  # advertised URL; default from listen_host:port
    heartbeat_interval: float = 1.0
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    consent_timeout: float = DEFAULT_CONSENT_TIMEOUT  # imported calls (migration)
    agent_factory: AgentFactory = EchoAgent


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _conn_id_from_path(request: web.Request) -> int:
    raw = request.match_info["conn_id"]
    try:
        conn_id = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(
            text='{"error": "conn_id must be an integer"}', content_type="application/json"
        ) from None
    return conn_id


async def _json_body(request: web.Request, optional: bool = False) -> dict[str, Any] | None:
    """The request's JSON object, {} for an empty optional body, None if invalid."""
    raw = await request.read()
    if optional and not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):  # json.JSONDecodeError is a ValueError
        return None
    return body if isinstance(body, dict) else None


async def _post_call(request: web.Request) -> web.Response:
    tx = request.app[TRANSCEIVER_KEY]
    body = await _json_body(request)
    if body is None:
        return _error(400, "body must be a JSON object")
    missing = [k for k in ("conn_id", "ufrag", "offer") if k not in body]
    if missing:
        return _error(400, f"missing field(s): {', '.join(missing)}")
    answer, owner = await tx.create_call(body["conn_id"], body["ufrag"], body["offer"])
    return web.json_response({"answer": answer, "owner": owner}, status=201)


async def _delete_call(request: web.Request) -> web.Response:
    tx = request.app[TRANSCEIVER_KEY]
    await tx.close_call(_conn_id_from_path(request))
    return web.Response(status=204)


async def _get_call(request: web.Request) -> web.Response:
    tx = request.app[TRANSCEIVER_KEY]
    return web.json_response(tx.call_info(_conn_id_from_path(request)))


async def _export_call(request: web.Request) -> web.Response:
    tx = request.app[TRANSCEIVER_KEY]
    conn_id = _conn_id_from_path(request)
    body = await _json_body(request, optional=True)
    if body is None:
        return _error(400, "body must be a JSON object")
    freeze = body.get("freeze", False)
    if not isinstance(freeze, bool):
        return _error(400, "freeze must be true or false")
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


async def _import_call(request: web.Request) -> web.Response:
    tx = request.app[TRANSCEIVER_KEY]
    body = await _json_body(request)
    if body is None:
        return _error(400, "body must be a JSON object")
    missing = [k for k in ("conn_id", "state") if k not in body]
    if missing:
        return _error(400, f"missing field(s): {', '.join(missing)}")
    owner = await tx.import_call(body["conn_id"], body["state"])
    return web.json_response({"owner": owner}, status=201)


async def _list_calls(request: web.Request) -> web.Response:
    return web.json_response({"calls": request.app[TRANSCEIVER_KEY].calls()})


async def _health(request: web.Request) -> web.Response:
    return web.json_response(request.app[TRANSCEIVER_KEY].health())


# Each call-level error has one HTTP status, whichever request raised it.
ERROR_STATUS: dict[type[TransceiverError], int] = {
    InvalidRequest: 400, UnknownCall: 404, DuplicateCall: 409, CallStateConflict: 409, CapacityExceeded: 503,
}


@web.middleware
async def _call_errors(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except TransceiverError as exc:
        status = next((code for cls, code in ERROR_STATUS.items() if isinstance(exc, cls)), 500)
        return _error(status, str(exc))


def create_app(transceiver: Transceiver) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_call_errors])
    app[TRANSCEIVER_KEY] = transceiver
    app.router.add_post("/calls", _post_call)
    app.router.add_post("/calls/import", _import_call)
    app.router.add_post("/calls/{conn_id}/export", _export_call)
    app.router.add_post("/calls/{conn_id}/unfreeze", _unfreeze_call)
    app.router.add_post("/calls/{conn_id}/release", _release_call)
    app.router.add_post("/calls/{conn_id}/activate", _activate_call)
    app.router.add_get("/calls", _list_calls)
    app.router.add_get("/calls/{conn_id}", _get_call)
    app.router.add_delete("/calls/{conn_id}", _delete_call)
    app.router.add_get("/health", _health)
    return app


class Registrar:
    """Keeps this transceiver registered with the relay manager and heartbeating.

    Relay down or misbehaving: keep retrying every interval, log the problem
    once, and log again when it recovers.
    """

    def __init__(
        self,
        transceiver: Transceiver,
        relay_url: str,
        control_url: str,
        interval: float = 1.0,
        timeout: float = 2.0,
    ) -> None:
        self.tx = transceiver
        self.relay_url = relay_url.rstrip("/")
        self.control_url = control_url
        self.interval = interval
        self.timeout = timeout
        self.registered = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._problem: str | None = None  # last logged problem, to log once
        self.tx.on_call_ended.append(lambda conn_id, reason: self.poke())

    def poke(self) -> None:
        """Heartbeat now (a call ended: the relay should stop routing to it)."""
        self._wake.set()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self, final_heartbeat: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._session is not None:
            if final_heartbeat and self.registered:
                # Tell the relay to place no more calls here; best effort.
                try:
                    await self._heartbeat(healthy=False)
                except (TimeoutError, aiohttp.ClientError, OSError):
                    pass
            await self._session.close()
            self._session = None

    async def _register(self) -> bool:
        assert self._session is not None
        body = {"id": self.tx.id, "control_url": self.control_url, "capacity": self.tx.capacity}
        async with self._session.post(f"{self.relay_url}/v1/transceivers", json=body) as resp:
            if resp.status in (200, 201):
                return True
            self._report(f"registration refused: HTTP {resp.status} {(await resp.text())[:200]}")
            return False

    async def _heartbeat(self, healthy: bool | None = None) -> int:
        assert self._session is not None
        body = {
            "healthy": self.tx.healthy if healthy is None else healthy,
            "calls": self.tx.calls() if healthy is not False else [],
        }
        url = f"{self.relay_url}/v1/transceivers/{self.tx.id}/heartbeat"
        async with self._session.put(url, json=body) as resp:
            return resp.status

    def _report(self, problem: str) -> None:
        if problem != self._problem:
            logger.warning(
                "relay manager %s: %s (retrying every %gs)", self.relay_url, problem, self.interval
            )
            self._problem = problem

    async def _loop(self) -> None:
        while True:
            try:
                if not self.registered:
                    self.registered = await self._register()
                    if self.registered:
                        logger.info(
                            "registered with relay manager %s as transceiver %d",
                            self.relay_url,
                            self.tx.id,
                        )
                        self._problem = None
                        continue  # first heartbeat right away
                else:
                    status = await self._heartbeat()
                    if status == 404:
                        # The relay forgot us (restart, expiry): register again.
                        logger.info(
                            "relay manager does not know transceiver %d; re-registering", self.tx.id
                        )
                        self.registered = False
                        continue
                    if status not in (200, 204):
                        self._report(f"heartbeat answered HTTP {status}")
                    elif self._problem is not None:
                        logger.info("relay manager %s reachable again", self.relay_url)
                        self._problem = None
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                self._report(f"unreachable ({type(exc).__name__}: {exc})")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass


async def run(config: TransceiverConfig, stop: asyncio.Event | None = None) -> None:
    """Run a transceiver until SIGTERM/SIGINT (or ``stop`` is set), then stop gracefully."""
    tx = Transceiver(
        config.id,
        capacity=config.capacity,
        agent_factory=config.agent_factory,
        bind_addrs=config.bind_addrs,
        ice_port=config.ice_port,
        connect_timeout=config.connect_timeout,
        consent_timeout=config.consent_timeout,
    )
    await tx.start()
    runner = web.AppRunner(create_app(tx), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.listen_host, config.listen_port)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        await tx.stop()
        raise OSError(
            exc.errno, f"cannot listen on {config.listen_host}:{config.listen_port}: {exc.strerror}"
        ) from None
    host, port = runner.addresses[0][:2]
    control_url = config.control_url or (
        f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    )
    logger.info("transceiver %d control API on %s, ICE owner %s", config.id, control_url, tx.owner)

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread: rely on `stop`

    registrar: Registrar | None = None
    if config.relay_url:
        registrar = Registrar(tx, config.relay_url, control_url, interval=config.heartbeat_interval)
        await registrar.start()
    try:
        await stop.wait()
        logger.info("transceiver %d stopping", config.id)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        if registrar is not None:
            await registrar.stop()
        await tx.stop()
        await runner.cleanup()
