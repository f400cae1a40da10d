"""A call's sideband for the application's server, Realtime-style:

    GET /v1/realtime?call_id={call_id}   websocket (the credential that created the call;
                                         401 without it, 404 for an unknown call)

Text frames carry one JSON object each: the application's events for the
call's agent (AgentSession.recv_event), and the agent's events
(AgentSession.send_event) back. relayd holds one socket to the transceiver
that owns the call now (manager.transceiver.sideband); when that one closes
(the call moved, by a live migration or a drain) it connects to the new owner,
found in the registry, and carries on: events the agent queued while frozen
move with the call, and those the application sent into the freeze come back
from the old owner and are sent to the new one. The socket closes with 1000
when the call ends, 1011 when no owner can be reached.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time

from aiohttp import web

from manager.protocol.sideband import CLOSED, MAX_FRAME, error_event, events
from manager.relay.call_desk import CallDesk
from manager.relay.problems import problem
from manager.relay.transceiver_client import TransceiverError

log = logging.getLogger(__name__)

MAX_QUEUED = 1000  # events from the application not yet taken by an owner
OWNER_WAIT = 10.0  # seconds to wait for a call's new owner once its socket closed


class Sideband:
    def __init__(self, desk: CallDesk) -> None:
        self.desk = desk

    async def handle(self, request: web.Request) -> web.StreamResponse:
        call_id = request.query.get("call_id")
        if not call_id:
            return problem(400, "call_id: missing query parameter (GET /v1/realtime?call_id=...)")
        call = self.desk.own_call(request, call_id)
        if isinstance(call, web.Response):
            return call
        client = web.WebSocketResponse(max_msg_size=MAX_FRAME, heartbeat=15.0)
        if not client.can_prepare(request).ok:
            return problem(426, "a websocket upgrade is required", {"Upgrade": "websocket"})
        await client.prepare(request)
        inbox: asyncio.Queue[dict | None] = asyncio.Queue()
        reader = asyncio.ensure_future(self._read_client(client, inbox))
        try:
            await self._serve(call_id, client, inbox)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await client.close()
        return client

    async def _read_client(self, client: web.WebSocketResponse, inbox: asyncio.Queue[dict | None]) -> None:
        """The application's frames into `inbox` (None once it is gone)."""
        try:
            async for _, event in events(client):
                if event is None:
                    await client.send_json(error_event("an event must be a JSON object"))
                    continue
                if inbox.qsize() >= MAX_QUEUED:
                    await client.close(code=1008, message=b"too many events queued for the agent")
                    break
                inbox.put_nowait(event)
        finally:
            inbox.put_nowait(None)

    async def _serve(self, call_id: str, client: web.WebSocketResponse, inbox: asyncio.Queue[dict | None]) -> None:
        pending: collections.deque[dict] = collections.deque()  # to send before the inbox
        while not client.closed:
            call = self.desk.registry.get_call_by_id(call_id)
            if call is None:
                await client.close(code=1000, message=b"call ended")
                return
            owner = call.transceiver_id
            try:
                upstream = await self.desk.client.sideband(self.desk.registry.get_transceiver(owner), call.conn_id)
            except (TransceiverError, LookupError) as exc:
                log.warning("sideband of call %s: transceiver %d: %s", call_id, owner, exc)
                if not await self._owner_changed(call_id, owner):
                    await client.close(code=1011, message=b"the call's agent cannot be reached")
                    return
                continue
            gone = await self._pump(client, upstream, inbox, pending)
            if gone:
                await upstream.close()
                return
            # The owner closed the call's sideband: it ended there, or moved on.
            await self._owner_changed(call_id, owner)

    async def _owner_changed(self, call_id: str, owner: int) -> bool:
        """Whether the call ended or has an owner other than `owner`, within OWNER_WAIT."""
        deadline = time.monotonic() + OWNER_WAIT
        while time.monotonic() < deadline:
            call = self.desk.registry.get_call_by_id(call_id)
            if call is None or call.transceiver_id != owner:
                return True
            # pacing: a record applied from another relay of a fleet comes with no notification
            await asyncio.sleep(0.05)
        return False

    async def _pump(self, client: web.WebSocketResponse, upstream, inbox: asyncio.Queue[dict | None],
                    pending: collections.deque[dict]) -> bool:
        """Both ways until either side closes; True if the application went away."""
        in_flight: list[dict] = []

        async def down() -> None:
            async for raw, event in events(upstream):
                if event is not None and event.get("type") == CLOSED:
                    undelivered = event.get("undelivered")
                    if isinstance(undelivered, list):
                        pending.extendleft(reversed([e for e in undelivered if isinstance(e, dict)]))
                    return
                await client.send_str(raw)

        async def up() -> bool:
            while True:
                event = pending.popleft() if pending else await inbox.get()
                if event is None:
                    return True
                in_flight.append(event)
                await upstream.send_str(json.dumps(event))
                in_flight.clear()

        down_task, up_task = asyncio.ensure_future(down()), asyncio.ensure_future(up())
        done, _ = await asyncio.wait((down_task, up_task), return_when=asyncio.FIRST_COMPLETED)
        for task in (down_task, up_task):
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
                await task
        pending.extendleft(reversed(in_flight))  # not known to have reached the old owner
        return up_task in done and not up_task.cancelled() and up_task.exception() is None and up_task.result()


def add_routes(app: web.Application, desk: CallDesk) -> None:
    app.router.add_get("/v1/realtime", Sideband(desk).handle)
