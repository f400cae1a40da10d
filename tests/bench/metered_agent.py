"""The density benchmark's agent: the echo agent, metering what it hears.

Runs in the benchmark's transceiver process (tests/bench/loopback_density.py
names it): per call, the frames the agent got from their own packet, rebuilt
from FEC (``frame.opaque == "fec"``) or concealed (``"plc"``), and the
longest wall-clock time between two frames of real audio, less one frame:
the longest gap the agent heard (a concealed frame is heard as a gap; a
stall of the jitter buffer too). Concealed frames count once real audio
follows them (the engine conceals a few frames after a stream stops).

A concealed frame stands either for a lost frame or for a late one (an
*expansion*: the jitter buffer plays concealment and waits, the late frame
plays next, so the agent hears one frame more than was sent). ``delivered``
counts the frames that stand for a frame the client sent: own packet, FEC,
and concealment of a lost frame; the expansions, read from the engine
call's jitter buffer up to the last real frame, are counted apart.
``report(tx)`` sums the calls.
"""

from __future__ import annotations

import time
from typing import Any

from manager.transceiver.agent import AgentSession, CallEnded, EchoAgent

FRAME_S = 0.02
_ALL: list[Agent] = []
_TX: Any = None  # the transceiver, known from the first report


def _expansions(conn_id: int) -> int | None:
    """The engine call's jitter-buffer expansions so far; None on aiortc."""
    call = _TX._calls.get(conn_id) if _TX is not None else None  # the bench's own transceiver
    media = getattr(call, "media", None)
    return None if media is None else media.jitter.stats.expanded


class Agent(EchoAgent):
    def __init__(self) -> None:
        super().__init__()
        self.conn_id: int | None = None
        self._reset()
        _ALL.append(self)

    def _reset(self) -> None:
        self.frames = self.real = self.concealed = self.fec = self._pending = self.expanded = 0
        self._expanded0 = _expansions(self.conn_id) if self.conn_id is not None else None
        self.longest_gap_s = 0.0
        self._last_real: float | None = None

    async def _echo_audio(self, session: AgentSession) -> None:
        self.conn_id = session.conn_id
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
                    expanded = _expansions(self.conn_id)
                    if expanded is not None:
                        if self._expanded0 is None:
                            self._expanded0 = expanded
                        self.expanded = expanded - self._expanded0
                    if self._last_real is not None:
                        self.longest_gap_s = max(self.longest_gap_s, now - self._last_real - FRAME_S)
                    self._last_real = now
                await session.send_audio(frame)
                self.frames_echoed += 1
        except CallEnded:
            pass


def report(tx: Any = None) -> dict:
    """What every call's agent heard since the last report (then reset)."""
    global _TX
    _TX = tx
    out = {"calls": len(_ALL), "frames": sum(a.frames for a in _ALL), "real": sum(a.real for a in _ALL),
           "concealed": sum(a.concealed for a in _ALL), "fec": sum(a.fec for a in _ALL),
           "expanded": sum(a.expanded for a in _ALL),
           "longest_gap_ms": round(max((a.longest_gap_s for a in _ALL), default=0.0) * 1000, 1)}
    out["delivered"] = out["frames"] - out["expanded"]
    for a in _ALL:
        a._reset()
    return out
