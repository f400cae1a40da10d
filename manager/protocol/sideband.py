"""The sideband's frames, as relayd and the transceiver both read them: one
JSON object per websocket text frame (manager.relay.sideband,
manager.transceiver.sideband)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import WSMsgType

MAX_FRAME = 64 * 1024  # one event; a Realtime session.update is a few KiB
#: The transceiver's last frame when the call ends there: {"type", "undelivered": [...]}.
CLOSED = "sideband.closed"


def error_event(message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"message": message}}


async def events(ws: AsyncIterator[Any]) -> AsyncIterator[tuple[str, dict[str, Any] | None]]:
    """(raw text, the JSON object or None when the frame is not one) for each text frame."""
    async for msg in ws:
        if msg.type != WSMsgType.TEXT:
            continue
        try:
            event = json.loads(msg.data)
        except ValueError:
            event = None
        yield msg.data, event if isinstance(event, dict) else None
