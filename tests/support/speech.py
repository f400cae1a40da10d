"""Speech for tests: espeak-ng says a sentence, PyAV turns it into a call's 20 ms frames."""

from __future__ import annotations

import asyncio
import fractions
import subprocess
import time
import wave
from pathlib import Path

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

RATE = 48000
FRAME = 960  # 20 ms at 48 kHz


def speech_wav(text: str, path: Path) -> Path:
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True, timeout=30)
    return path


def wav_samples(path: Path, rate: int = RATE) -> np.ndarray:
    """Mono s16 samples of a WAV at ``rate``."""
    out = []
    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        for frame in container.decode(audio=0):
            out.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
        out.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    return np.concatenate(out).astype(np.int16)


def write_wav(path: Path, pcm: bytes, rate: int = RATE) -> Path:
    """A mono s16 WAV of ``pcm``."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return path


def mic_wav(samples: np.ndarray, path: Path, silence_s: float, rate: int = RATE) -> Path:
    """A mono s16 WAV of ``samples`` then ``silence_s`` of silence: one turn of a
    conversation each time a browser's fake microphone loops it."""
    pcm = np.concatenate([samples.astype(np.int16), np.zeros(int(silence_s * rate), dtype=np.int16)])
    return write_wav(path, pcm.tobytes(), rate)


def call_frames(samples: np.ndarray) -> list[av.AudioFrame]:
    """20 ms stereo s16 frames at 48 kHz, as a call's Opus decoder hands them to the agent."""
    pad = (-len(samples)) % FRAME
    samples = np.concatenate([samples, np.zeros(pad, dtype=np.int16)])
    frames = []
    for i in range(0, len(samples), FRAME):
        mono = samples[i:i + FRAME]
        stereo = np.repeat(mono, 2).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(stereo, format="s16", layout="stereo")
        frame.sample_rate = RATE
        frames.append(frame)
    return frames


def spectral_centroid(samples: np.ndarray, rate: int = RATE) -> float:
    """The power-weighted mean frequency of a signal (Hz)."""
    x = samples.astype(np.float64)
    power = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    return float((freqs * power).sum() / power.sum())


def voiced(samples: np.ndarray, threshold: float = 500.0, window: int = FRAME) -> np.ndarray:
    """The samples of the 20 ms windows whose RMS passes ``threshold``."""
    n = len(samples) // window
    blocks = samples[: n * window].reshape(n, window).astype(np.float64)
    loud = np.sqrt((blocks**2).mean(axis=1)) > threshold
    return blocks[loud].reshape(-1)


class SpeechTrack(MediaStreamTrack):
    """A client's microphone: silence, and what :meth:`say` queues, in real time (20 ms, 48 kHz mono)."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._queue = np.zeros(0, dtype=np.int16)
        self._pts = 0
        self._start: float | None = None

    def say(self, samples: np.ndarray) -> None:
        self._queue = np.concatenate([self._queue, samples.astype(np.int16)])

    @property
    def speaking(self) -> bool:
        return len(self._queue) > 0

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            await asyncio.sleep(max(0.0, self._start + self._pts / RATE - time.monotonic()))  # pacing
        chunk, self._queue = self._queue[:FRAME], self._queue[FRAME:]
        chunk = np.concatenate([chunk, np.zeros(FRAME - len(chunk), dtype=np.int16)])
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, RATE)
        self._pts += FRAME
        return frame
