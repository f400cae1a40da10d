"""The data-channel messages Pipecat's SmallWebRTC client sends to its
server, not to the bot.

Pipecat's browser transport (``SmallWebRTCTransport`` in
``@pipecat-ai/small-webrtc-transport``, which the prebuilt client uses)
shares the call's data channel between the application and the transport
itself:

- ``"ping..."`` text every second: the client's keep-alive, which Pipecat's
  server reads as "the peer is still there";
- ``{"type": "signalling", "message": {...}}``: transport signalling, e.g.
  ``{"type": "trackStatus", "receiver_index": 0, "enabled": false}`` when
  the user mutes the microphone.

Pipecat's server (``SmallWebRTCConnection``) consumes both and hands only
the rest to the pipeline; so does this module, so a bot sees the same
messages behind splitrelay as behind Pipecat's own server.
"""

from __future__ import annotations

import time
from typing import Any

PING_PREFIX = "ping"
SIGNALLING_TYPE = "signalling"
TRACK_STATUS = "trackStatus"
#: Receiver indexes of the client's tracks, as SmallWebRTC numbers them.
SOURCES = {0: "microphone", 1: "camera", 2: "screen"}


class SmallWebRTCControl:
    """What the client's transport said of itself: its last keep-alive and
    which of its sources are on."""

    def __init__(self) -> None:
        self.pings = 0
        self.last_ping_at: float | None = None  # monotonic
        self.track_status: dict[str, bool] = {}
        self.signalling = 0  # signalling messages consumed (any kind)

    def consume(self, message: Any) -> bool:
        """True if ``message`` (a data-channel message, JSON objects already
        parsed) is the client transport's own and must not reach the bot."""
        if isinstance(message, str) and message.startswith(PING_PREFIX):
            self.pings += 1
            self.last_ping_at = time.monotonic()
            return True
        if not (isinstance(message, dict) and message.get("type") == SIGNALLING_TYPE):
            return False
        self.signalling += 1
        inner = message.get("message")
        if isinstance(inner, dict) and inner.get("type") == TRACK_STATUS:
            source = SOURCES.get(inner.get("receiver_index"))
            enabled = inner.get("enabled")
            if source is not None and isinstance(enabled, bool):
                self.track_status[source] = enabled
        return True
