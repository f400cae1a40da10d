"""The echo agent is level-true: a mono tone sent through Opus comes back at
the level it was sent, through the same decoder, agent session, outgoing
track and encoder a call uses."""

from __future__ import annotations

import array
import asyncio
import fractions
import math

import av
from aiortc.codecs import get_decoder, get_encoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from manager.transceiver.agent import FRAME_SAMPLES, SAMPLE_RATE, AgentSession, EchoAgent, run_agent

OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2)
AMPLITUDE = 0.5  # RMS 0.354, the figure the loss was reported with
FRAMES = 50  # 1 s: the outgoing track is paced in real time
SETTLE = 10  # the codec's first frames ramp up


def _tone_frame(index: int) -> av.AudioFrame:
    """20 ms of a 440 Hz tone as a mono sender puts it into Opus (one signal on
    both channels of aiortc's stereo encoder, so the sender itself loses nothing)."""
    both = array.array("h")
    for i in range(FRAME_SAMPLES):
        x = int(AMPLITUDE * 32767 * math.sin(2 * math.pi * 440 * (index * FRAME_SAMPLES + i) / SAMPLE_RATE))
        both.extend((x, x))
    frame = av.AudioFrame(format="s16", layout="stereo", samples=FRAME_SAMPLES)
    frame.planes[0].update(both.tobytes())
    frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, index * FRAME_SAMPLES, fractions.Fraction(1, 48000)
    return frame


def _rms(frames: list[av.AudioFrame]) -> float:
    pcm = array.array("h")
    for f in frames:
        pcm.frombytes(bytes(f.planes[0])[: f.samples * len(f.layout.channels) * 2])
    return math.sqrt(sum(x * x for x in pcm) / len(pcm)) / 32768


async def _echo_levels() -> tuple[float, float]:
    client_enc, our_dec = get_encoder(OPUS), get_decoder(OPUS)
    our_enc, client_dec = get_encoder(OPUS), get_decoder(OPUS)
    session = AgentSession(1)
    agent = asyncio.ensure_future(run_agent(EchoAgent(), session, "level test"))
    sent, echoed = [], []
    try:
        for index in range(FRAMES):
            frame = _tone_frame(index)
            sent.append(frame)
            payloads, ts = client_enc.encode(frame)
            for payload in payloads:
                for decoded in our_dec.decode(JitterFrame(data=payload, timestamp=ts)):
                    session.deliver_audio(decoded)
            await asyncio.sleep(0)  # the agent echoes the frame into the outgoing FIFO
            out = await session.out_track.recv()
            payloads, ts = our_enc.encode(out)
            for payload in payloads:
                echoed.extend(client_dec.decode(JitterFrame(data=payload, timestamp=ts)))
    finally:
        session.close()
        await agent
    return _rms(sent[SETTLE:]), _rms(echoed[SETTLE + 2:])


def test_the_echo_comes_back_within_half_a_db_of_the_sent_level() -> None:
    sent, echoed = asyncio.run(_echo_levels())
    db = 20 * math.log10(echoed / sent)
    print(f"\nsent RMS {sent:.3f}, echoed RMS {echoed:.3f} ({db:+.2f} dB)")
    assert abs(sent - 0.354) < 0.01
    assert abs(db) <= 0.5, f"echo {db:+.2f} dB from the sent level (RMS {echoed:.3f} vs {sent:.3f})"
