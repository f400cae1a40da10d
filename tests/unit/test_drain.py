"""relayd's drain requests (manager.relay.drain): who may ask, what a
deadline may be, and what a transceiver's own drain leaves behind. The
drains here hold no call (the moves are in tests/e2e/test_transceiver_drain.py)."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from manager import pki
from manager.protocol.http import error_middleware, text_error
from manager.relay.drain import Drains
from manager.relay.registry import Registry


def claimed(request: web.Request) -> pki.Identity | None:
    """The caller is whoever the test header says (TLS identities: tests/netns/test_security.py)."""
    raw = request.headers.get("X-Test-Transceiver")
    return pki.Identity("transceiver", int(raw)) if raw else None


async def _env() -> tuple[Registry, Drains, TestClient, TestClient]:
    registry = Registry(heartbeat_timeout=3600.0)
    for tid in (1, 2):
        registry.register_transceiver(tid, f"https://10.0.0.{tid}:8700", 10)
    drains = Drains(registry, migrator=None, client=None)
    internal = web.Application(middlewares=[error_middleware(text_error)])
    drains.add_internal_routes(internal, identify=claimed)
    control = web.Application(middlewares=[error_middleware(text_error)])
    drains.add_control_routes(control)
    clients = TestClient(TestServer(internal)), TestClient(TestServer(control))
    for c in clients:
        await c.start_server()
    return registry, drains, *clients


def run(scenario) -> None:
    async def main():
        registry, drains, internal, control = await _env()
        try:
            await scenario(registry, drains, internal, control)
        finally:
            await internal.close()
            await control.close()
    asyncio.run(main())


def test_only_the_transceiver_itself_may_ask_for_its_drain() -> None:
    async def scenario(registry, drains, internal, control):
        for headers in ({}, {"X-Test-Transceiver": "2"}):
            resp = await internal.post("/v1/transceivers/1/drain", json={"deadline_s": 5}, headers=headers)
            assert resp.status == 403 and "only transceiver 1" in await resp.text()
        assert not registry.get_transceiver(1).draining
        resp = await internal.post("/v1/transceivers/1/drain", json={"deadline_s": 5},
                                   headers={"X-Test-Transceiver": "1"})
        assert resp.status == 202, await resp.text()
        assert registry.get_transceiver(1).draining
        await drains.jobs[1].done.wait()
        assert drains.view(drains.jobs[1])["state"] == "drained"
    run(scenario)


@pytest.mark.parametrize("deadline", [0, -1, 3601, "5", True, None])
def test_a_deadline_is_seconds_in_range(deadline) -> None:
    async def scenario(registry, drains, internal, control):
        resp = await control.post("/drains", json={"transceiver": 1, "deadline_s": deadline})
        assert resp.status == 400 and "deadline_s must be a number of seconds" in await resp.text()
        assert not registry.get_transceiver(1).draining
    run(scenario)


def test_unknown_transceivers_and_drains() -> None:
    async def scenario(registry, drains, internal, control):
        resp = await control.post("/drains", json={"transceiver": 9, "deadline_s": 1})
        assert resp.status == 404 and "unknown transceiver 9" in await resp.text()
        resp = await control.post("/drains", json={"transceiver": "1", "deadline_s": 1})
        assert resp.status == 400
        resp = await control.get("/drains/2")
        assert resp.status == 404 and "has not been drained" in await resp.text()
    run(scenario)


def test_the_next_process_after_its_own_drain_takes_calls_again() -> None:
    """A transceiver that drained itself has exited: its next registration
    (a restarted pod) reopens it. An operator's drain stays until undone."""
    async def scenario(registry, drains, internal, control):
        await internal.post("/v1/transceivers/1/drain", json={"deadline_s": 5}, headers={"X-Test-Transceiver": "1"})
        resp = await control.post("/drains", json={"transceiver": 2, "deadline_s": 5})
        assert resp.status == 202
        await drains.jobs[1].done.wait()
        await drains.jobs[2].done.wait()
        for tid in (1, 2):
            registry.register_transceiver(tid, f"https://10.0.0.{tid}:8700", 10)
            drains.registered(tid)
        assert not registry.get_transceiver(1).draining
        assert registry.get_transceiver(2).draining
        assert drains.view(drains.jobs[2])["requested_by"] == "operator"
    run(scenario)
