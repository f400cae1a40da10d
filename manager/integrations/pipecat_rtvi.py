"""RTVI on a splitrelay call, for the clients that speak it.

Pipecat's clients (``@pipecat-ai/client-js`` and the prebuilt page) speak
RTVI over the data channel: messages labelled ``"rtvi-ai"``, a
``client-ready`` answered by ``bot-ready`` (their ``connect()`` resolves
on it), then Pipecat's events (``bot-started-speaking``, transcriptions,
``server-message``, ...). Other clients send their own messages and expect
only the bot's answers.

:class:`CallRTVIProcessor` is Pipecat's ``RTVIProcessor`` (the one
``PipelineWorker(enable_rtvi=True)`` prepends, with its observer) with two
differences:

- it speaks RTVI only to a client that has spoken it: until an
  ``rtvi-ai`` message arrives, RTVI's own messages (its observer's events,
  its error reports) are not sent, so a plain client's data channel carries
  only what the bot sends;
- it leaves other messages alone: the transport broadcasts every message
  (downstream to the bot, upstream to this processor), and this copy of a
  non-RTVI message ends here without the warning (or, for text, the error)
  Pipecat's processor gives.

``export_state``/``import_state`` carry the handshake across a live
migration: the client does not repeat ``client-ready``, so the new
transceiver's processor starts as ready, with the client's protocol version,
and sends no second ``bot-ready``.
"""

from __future__ import annotations

from typing import Any

from pipecat.frames.frames import Frame, InputTransportMessageFrame
from pipecat.processors.frame_processor import FrameDirection
from pipecat.processors.frameworks.rtvi import RTVIProcessor
from pipecat.processors.frameworks.rtvi.models import MESSAGE_LABEL
from pydantic import BaseModel


def is_rtvi(message: Any) -> bool:
    """Whether a data-channel message (as the transport decoded it) is an RTVI message."""
    return isinstance(message, dict) and message.get("label") == MESSAGE_LABEL


class CallRTVIProcessor(RTVIProcessor):
    """Pipecat's RTVI processor, silent to clients that do not speak RTVI (see the module)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.client_speaks_rtvi = False
        self.withheld = 0  # RTVI messages not sent: the client had not spoken RTVI

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        if isinstance(frame, InputTransportMessageFrame):
            if not is_rtvi(frame.message):
                # Still the frame processor's bookkeeping, not RTVI's handling.
                await super(RTVIProcessor, self).process_frame(frame, direction)
                return
            self.client_speaks_rtvi = True
        await super().process_frame(frame, direction)

    async def push_transport_message(self, model: BaseModel, exclude_none: bool = True) -> None:
        # The processor's replies and the observer's events all come through here.
        if not self.client_speaks_rtvi:
            self.withheld += 1
            return
        await super().push_transport_message(model, exclude_none)

    # Pipecat keeps the handshake in the processor's own attributes (1.14):
    # these two read and restore exactly those.
    def export_state(self) -> dict[str, Any]:
        if not self.client_speaks_rtvi:
            return {}
        return {"client_ready": self._client_ready, "bot_ready": self._bot_ready,
                "client_version": list(self._client_version), "client_ready_id": self._client_ready_id}

    def import_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.client_speaks_rtvi = True
        self._client_ready = bool(state.get("client_ready"))
        self._bot_ready = bool(state.get("bot_ready"))
        self._client_version = [int(v) for v in state.get("client_version", [0, 0, 0])]
        self._client_ready_id = str(state.get("client_ready_id", ""))
