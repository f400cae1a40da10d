"""The transceiver's end of a call's sideband (relayd's Realtime-style
`GET /v1/realtime?call_id=...`, manager.relay.realtime_api): a websocket on
the control API, `GET /calls/{conn_id}/sideband`, relayd's alone.

Text frames carry one JSON object each. relayd's frames are events for the
call's agent (AgentSession.recv_event); the agent's (AgentSession.send_event)
go back the same way. When the call ends here (a hang-up, or released to its
new owner after a migration) the last frame is
`{"type": "sideband.closed", "undelivered": [...]}`: the events that came
while the call was frozen for its move and reached no agent, for relayd to
send to the new owner. A frame that is not a JSON object is answered with
`{"type": "error", "error": {"message": ...}}` and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from manager.protocol.sideband import CLOSED, MAX_FRAME, error_event, events

from .agent import AgentSession, CallEnded


async def serve_sideband(request: web.Request, session: AgentSession) -> web.StreamResponse:
    """Pump a call's sideband events both ways until the call or the socket ends."""
    ws = web.WebSocketResponse(max_msg_size=MAX_FRAME, heartbeat=15.0)
    await ws.prepare(request)

    async def outbound() -> None:
        with contextlib.suppress(CallEnded):
            while True:
                await ws.send_json(await session.next_event_out())
        # The call ended here: hand back what no agent read, then close.
        if not ws.closed:
            await ws.send_json({"type": CLOSED, "undelivered": session.take_late_events()})
            await ws.close()

    pump = asyncio.ensure_future(outbound())
    try:
        async for _, event in events(ws):
            if event is None:
                await ws.send_json(error_event("an event must be a JSON object"))
                continue
            session.deliver_event(event)
    finally:
        if not pump.done():
            pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
    return ws
