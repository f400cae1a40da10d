"""aiortc's RTP receiver: the client's audio it holds at a hand-over to the
media engine, and audio handed to the agent as it arrives."""

from __future__ import annotations

import queue
from dataclasses import dataclass, field

import av
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpreceiver import RTCRtpReceiver
from aiortc.utils import uint16_gt


@dataclass
class HeldAudio:
    """The client's audio aiortc received and had not yet handed to the agent, oldest first."""

    frames: list[av.AudioFrame] = field(default_factory=list)  # decoded, queued on the remote track
    payloads: list[bytes] = field(default_factory=list)  # Opus payloads not decoded yet


def take_held_audio(receiver: RTCRtpReceiver) -> HeldAudio:
    """Take out what an audio receiver holds: the frames decoded and queued on
    its track (`_track._queue`), the frames waiting for its decoder thread
    (`__decoder_queue`) and the packets in its jitter buffer
    (`__jitter_buffer`: aiortc keeps 4 packets, 80 ms, of prefetch there).
    aiortc plays none of it afterwards; the media engine plays it at once."""
    held = HeldAudio()
    track = receiver._track
    if track is not None:
        while not track._queue.empty():
            frame = track._queue.get_nowait()
            if frame is not None:
                held.frames.append(frame)
    pending: queue.Queue = receiver._RTCRtpReceiver__decoder_queue
    while True:
        try:
            task = pending.get_nowait()
        except queue.Empty:
            break
        if task is not None:
            held.payloads.append(task[1].data)
    jitter = receiver._RTCRtpReceiver__jitter_buffer
    if jitter._origin is not None:
        for count in range(jitter.capacity):
            pos = (jitter._origin + count) % jitter.capacity
            packet = jitter._packets[pos]
            if packet is not None and packet.payload:
                held.payloads.append(packet.payload)
        jitter.remove(jitter.capacity)
    return held


class _OnArrival:
    """Stands in for aiortc's audio JitterBuffer (same `add`): every Opus
    packet is a whole 20 ms frame, so each goes to the decoder as it arrives;
    one older than the last handed on is dropped (its slot has been played)."""

    _origin = None  # holds nothing: take_held_audio finds it empty

    def __init__(self) -> None:
        self._last: int | None = None

    def add(self, packet) -> tuple[bool, JitterFrame | None]:
        if self._last is not None and not uint16_gt(packet.sequence_number, self._last):
            return False, None
        self._last = packet.sequence_number
        return False, JitterFrame(data=packet._data, timestamp=packet.timestamp)


def play_audio_on_arrival(receiver: RTCRtpReceiver) -> None:
    """Decode a call's audio as it arrives. aiortc's audio receiver holds each
    frame until four more are buffered (JitterBuffer(prefetch=4), kept in
    `__jitter_buffer`): 80 ms before the agent hears the client's first word,
    and as much in every echo. The agent's own pipeline paces what it plays,
    and a call handed to the media engine gets its real jitter buffer there."""
    receiver._RTCRtpReceiver__jitter_buffer = _OnArrival()  # type: ignore[attr-defined]
