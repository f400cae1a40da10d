"""aiortc's RTP receiver: the client's audio it holds at a hand-over to the media engine."""

from __future__ import annotations

import queue
from dataclasses import dataclass, field

import av
from aiortc.rtcrtpreceiver import RTCRtpReceiver


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
