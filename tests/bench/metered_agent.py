"""The density benchmark's agent: the echo agent, metering what it hears.

Runs in the benchmark's transceiver process (tests/bench/loopback_density.py
names it): per call, the frames the agent got, how many were concealed
(``frame.opaque == "plc"`` on an engine call) or rebuilt from FEC, and the
longest wall-clock time between two frames of real audio, less one frame:
the longest gap the agent heard (a concealed frame is heard as a gap; a
stall of the jitter buffer too). Concealed frames count once real audio
follows them (the engine conceals a few frames after a stream stops).
``report()`` sums the calls.
"""

from __future__ import annotations

import time

from manager.transceiver.agent import AgentSession, CallEnded, EchoAgent

FRAME_S = 0.02
_ALL: list[Agent] = []


class Agent(EchoAgent):
    def __init__(self) -> None:
        super().__init__()
        self.frames = self.real = self.concealed = self.fec = self._pending = 0
        self.longest_gap_s = 0.0
        self._last_real: float | None = None
        _ALL.append(self)

    async def _echo_audio(self, session: AgentSession) -> None:
        try:
            while True:
                frame = await session.recv_audio()
                now = time.monotonic()
                if frame.opaque == "plc":
                    self._pending += 1
                else:
                    self.frames += 1 + self._pending
                    self.concealed += self._pending
                    self._pending = 0
                    self.fec += frame.opaque == "fec"
                    self.real += frame.opaque is None
                    if self._last_real is not None:
                        self.longest_gap_s = max(self.longest_gap_s, now - self._last_real - FRAME_S)
                    self._last_real = now
                await session.send_audio(frame)
                self.frames_echoed += 1
        except CallEnded:
            pass


def report() -> dict:
    """What every call's agent heard since the last report (then reset)."""
    out = {"calls": len(_ALL), "frames": sum(a.frames for a in _ALL), "real": sum(a.real for a in _ALL),
           "concealed": sum(a.concealed for a in _ALL), "fec": sum(a.fec for a in _ALL),
           "longest_gap_ms": round(max((a.longest_gap_s for a in _ALL), default=0.0) * 1000, 1)}
    for a in _ALL:
        a.frames = a.real = a.concealed = a.fec = a._pending = 0
        a.longest_gap_s = 0.0
        a._last_real = None
    return out
