"""A Pipecat bot with no cloud service: it repeats what you said, in a higher pitch.

Silero VAD (the model Pipecat ships, loaded from the package) finds where
each utterance starts and ends; ``RepeatHigher`` keeps the utterance's audio
and, when it ends, plays it back 1.5x higher (the same samples played at 1.5
times the rate). Data-channel messages are answered with the turn count and
the conversation so far (the context's messages), so a client sees it go on
across a migration. An RTVI client (Pipecat's own) asks the same with a
``client-message`` of type ``"state"`` (``sendClientRequest("state")``),
answered as a ``server-response``, and gets a ``server-message``
``{"turns": n}`` with each reply. The conversation lives in an
``LLMContext`` (one user and one assistant message a turn) and a turn
counter, both carried by a live migration.

Run it as a call's agent::

    relayctl lab up --agent examples/pipecat_bot.py:make_pipeline
"""

from __future__ import annotations

from typing import Any

from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    InputTransportMessageFrame,
    OutputTransportMessageFrame,
    SpeechOutputAudioRawFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.processors.frameworks.rtvi.frames import (
    RTVIClientMessageFrame,
    RTVIServerMessageFrame,
    RTVIServerResponseFrame,
)

from manager.integrations.pipecat_agent import PipecatCall, pipecat_bot
from manager.integrations.pipecat_rtvi import is_rtvi

PITCH = 1.5
PRE_ROLL_S = 0.3  # audio kept from before the VAD's start decision (it needs start_secs of speech)
MAX_UTTERANCE_S = 15.0
FRAME_S = 0.02
# Silence that ends a reply: a speech stream's end is its silence, and Pipecat's output
# transport reports the bot stopped speaking after 0.35 s of it.
TAIL_S = 0.5


class RepeatHigher(FrameProcessor):
    """Collects an utterance between the VAD's start and stop, then plays it back higher."""

    def __init__(self, context: LLMContext, pitch: float = PITCH) -> None:
        super().__init__()
        self.context = context
        self.pitch = pitch
        self.turns = 0
        self._speaking = False
        self._audio = bytearray()
        self._rate = 16000

    def export_state(self) -> dict[str, Any]:
        return {"turns": self.turns}

    def import_state(self, state: dict[str, Any]) -> None:
        self.turns = int(state.get("turns", 0))

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            self._rate = frame.sample_rate
            self._audio.extend(frame.audio)
            limit = int((MAX_UTTERANCE_S if self._speaking else PRE_ROLL_S) * self._rate) * 2
            if len(self._audio) > limit:
                del self._audio[: len(self._audio) - limit]
            return  # the client's audio is not played back as it is
        if isinstance(frame, VADUserStartedSpeakingFrame):
            self._speaking = True
        elif isinstance(frame, VADUserStoppedSpeakingFrame) and self._speaking:
            self._speaking = False
            await self._repeat()
        elif isinstance(frame, InputTransportMessageFrame) and not is_rtvi(frame.message):
            await self.push_frame(OutputTransportMessageFrame(message={"echo": frame.message, **self.snapshot()}))
            return
        elif isinstance(frame, RTVIClientMessageFrame) and frame.type == "state":
            await self.push_frame(RTVIServerResponseFrame(client_msg=frame, data=self.snapshot()))
            return
        await self.push_frame(frame, direction)

    def snapshot(self) -> dict[str, Any]:
        return {"turns": self.turns, "context": list(self.context.get_messages())}

    async def _repeat(self) -> None:
        audio, self._audio = bytes(self._audio), bytearray()
        seconds = len(audio) / 2 / self._rate
        self.turns += 1
        self.context.add_message({"role": "user", "content": f"turn {self.turns}: {seconds:.2f} s of speech"})
        self.context.add_message({"role": "assistant", "content": f"repeated {self.pitch:g}x higher"})
        await self.push_frame(RTVIServerMessageFrame(data={"turns": self.turns}))  # RTVI clients only
        rate = int(self._rate * self.pitch)  # the same samples, played faster: higher and shorter
        step = int(rate * FRAME_S) * 2
        audio += bytes(int(rate * TAIL_S) * 2)
        for i in range(0, len(audio), step):
            # Speech, not any audio: the output transport reports the bot speaking (RTVI's bot-*-speaking).
            await self.push_frame(SpeechOutputAudioRawFrame(audio=audio[i:i + step], sample_rate=rate,
                                                            num_channels=1))


@pipecat_bot
def make_pipeline(transport) -> PipecatCall:
    context = LLMContext()
    repeat = RepeatHigher(context)
    vad = VADProcessor(vad_analyzer=SileroVADAnalyzer(params=VADParams(stop_secs=0.4)))
    pipeline = Pipeline([transport.input(), vad, repeat, transport.output()])
    return PipecatCall(pipeline=pipeline, context=context, state=repeat)
