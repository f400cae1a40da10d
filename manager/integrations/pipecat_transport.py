"""A Pipecat transport over one call's :class:`AgentSession`.

``SplitRelayTransport`` gives a Pipecat pipeline the call as Pipecat's own
transports do (``input()`` and ``output()`` processors):

- the client's audio arrives as ``InputAudioRawFrame`` (mono s16 at the
  pipeline's input rate, resampled from the call's 48 kHz);
- ``OutputAudioRawFrame`` from the pipeline goes to the client, paced to real
  time so a pipeline that produces faster than it plays waits instead of
  overflowing the call's output buffer;
- data-channel messages travel as ``InputTransportMessageFrame`` /
  ``OutputTransportMessageFrame`` (JSON objects parsed and written as JSON,
  so RTVI clients work through Pipecat's RTVI processor; other text stays
  text);
- the keep-alives and transport signalling of Pipecat's SmallWebRTC client
  are consumed here, as Pipecat's own server does (smallwebrtc_control.py);
- the end of the call arrives as an ``EndFrame`` pushed into the pipeline,
  a failing session as an ``ErrorFrame``.

The transport knows the session only through its public API (recv_audio,
send_audio, recv_message, send_message, closed).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import av
import numpy as np
from pipecat.frames.frames import (
    CancelFrame,
    ClientConnectedFrame,
    EndFrame,
    ErrorFrame,
    InputAudioRawFrame,
    InputTransportMessageFrame,
    OutputAudioRawFrame,
    OutputTransportMessageFrame,
    OutputTransportMessageUrgentFrame,
    StartFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.transports.base_input import BaseInputTransport
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import BaseTransport, TransportParams

from manager.integrations.smallwebrtc_control import SmallWebRTCControl
from manager.transceiver.agent import AgentSession, CallEnded

#: How far ahead of real time the output may run: enough to ride out the
#: pipeline's scheduling, small enough that an interruption cuts speech short.
OUTPUT_LEAD_S = 0.1


def default_params() -> TransportParams:
    return TransportParams(audio_in_enabled=True, audio_out_enabled=True)


def pcm_frame(pcm: bytes, sample_rate: int, channels: int) -> av.AudioFrame:
    """An s16 PyAV frame from interleaved PCM bytes."""
    layout = "mono" if channels == 1 else "stereo"
    samples = np.frombuffer(pcm, dtype=np.int16).reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(samples, format="s16", layout=layout)
    frame.sample_rate = sample_rate
    return frame


def encode_message(message: Any) -> str | bytes:
    return message if isinstance(message, (str, bytes)) else json.dumps(message)


def decode_message(message: str | bytes) -> Any:
    """JSON objects (RTVI and other app messages) as dicts; anything else as it came."""
    if isinstance(message, str) and message[:1] in "{[":
        try:
            return json.loads(message)
        except ValueError:
            return message
    return message


class SplitRelayInputTransport(BaseInputTransport):
    """Client audio and messages into the pipeline; the call's end as an EndFrame."""

    def __init__(self, session: AgentSession, params: TransportParams, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._session = session
        self._resampler: av.AudioResampler | None = None
        self._tasks: list[asyncio.Task] = []
        self.frames_in = 0
        self.client_transport = SmallWebRTCControl()

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=self.sample_rate)
        if not self._tasks:
            if self._params.audio_in_enabled:
                self._tasks.append(self.create_task(self._receive_audio()))
            self._tasks.append(self.create_task(self._receive_messages()))
        await self.set_transport_ready(frame)
        await self.push_frame(ClientConnectedFrame())

    async def stop(self, frame: EndFrame) -> None:
        await super().stop(frame)
        await self._stop_tasks()

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self._stop_tasks()

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._stop_tasks()

    async def _stop_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            if task is not asyncio.current_task():
                await self.cancel_task(task)

    async def _receive_audio(self) -> None:
        try:
            while True:
                frame = await self._session.recv_audio()
                try:
                    outs = self._resampler.resample(frame)
                except ValueError:
                    # The format changed (stereo from aiortc, then mono once the
                    # call is on the media engine): a resampler is fixed to its first.
                    self._resampler = av.AudioResampler(format="s16", layout="mono", rate=self.sample_rate)
                    outs = self._resampler.resample(frame)
                for out in outs:
                    self.frames_in += 1
                    await self.push_audio_frame(InputAudioRawFrame(
                        audio=bytes(out.planes[0])[: out.samples * 2], sample_rate=out.sample_rate,
                        num_channels=1))
        except CallEnded:
            await self._call_ended()
        except Exception as exc:  # the call's failure reaches the pipeline as Pipecat's error frame
            await self.push_error(f"splitrelay call {self._session.conn_id}: {exc}")

    async def _receive_messages(self) -> None:
        try:
            while True:
                message = decode_message(await self._session.recv_message())
                if self.client_transport.consume(message):
                    continue
                await self.broadcast_frame(InputTransportMessageFrame, message=message)
        except CallEnded:
            pass

    async def _call_ended(self) -> None:
        # The client hung up (or the call was ended): the pipeline ends as
        # when a Pipecat transport's client disconnects.
        await self.push_frame(EndFrame())

    async def push_error(self, message: str) -> None:
        await self.push_frame(ErrorFrame(error=message), FrameDirection.UPSTREAM)


class SplitRelayOutputTransport(BaseOutputTransport):
    """Pipeline audio and messages out to the client, paced to real time."""

    def __init__(self, session: AgentSession, params: TransportParams, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._session = session
        self._play_until = 0.0  # monotonic time at which the audio written so far has played
        self.frames_out = 0
        self.messages_out = 0

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        if self._session.closed:
            return False
        now = time.monotonic()
        lead = self._play_until - now
        if lead > OUTPUT_LEAD_S:
            await asyncio.sleep(lead - OUTPUT_LEAD_S)  # pacing: the call plays in real time
            now = time.monotonic()
        duration = len(frame.audio) / (2 * frame.num_channels * frame.sample_rate)
        self._play_until = max(self._play_until, now) + duration
        try:
            await self._session.send_audio(pcm_frame(frame.audio, frame.sample_rate, frame.num_channels))
        except CallEnded:
            return False
        self.frames_out += 1
        return True

    async def send_message(self, frame: OutputTransportMessageFrame | OutputTransportMessageUrgentFrame) -> None:
        try:
            await self._session.send_message(encode_message(frame.message))
            self.messages_out += 1
        except CallEnded:
            pass


class SplitRelayTransport(BaseTransport):
    """One call on a splitrelay transceiver, as a Pipecat transport."""

    def __init__(self, session: AgentSession, params: TransportParams | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.session = session
        self._params = params or default_params()
        self._input: SplitRelayInputTransport | None = None
        self._output: SplitRelayOutputTransport | None = None

    def input(self) -> SplitRelayInputTransport:
        if self._input is None:
            self._input = SplitRelayInputTransport(self.session, self._params, name=self._input_name)
        return self._input

    def output(self) -> SplitRelayOutputTransport:
        if self._output is None:
            self._output = SplitRelayOutputTransport(self.session, self._params, name=self._output_name)
        return self._output
