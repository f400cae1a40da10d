"""A jitter buffer for speech: one RTP stream in, one 20 ms frame out per tick.

The media engine calls :meth:`SpeechJitterBuffer.push` for every packet that
authenticated and :meth:`SpeechJitterBuffer.pop` once per 20 ms playout tick.
``pop`` never waits for a packet: at every tick of a running stream it says
what to play, a packet or a concealment:

* ``packet``: the frame arrived in time; decode it.
* ``fec``: the frame was lost and the next packet is here: decode that
  packet's in-band FEC (Opus LBRR, libopus ``decode_fec=1``).
* ``plc``: nothing to decode; the codec's packet loss concealment fills the
  frame. Played when the frame is lost without a successor in the buffer, or
  when the frame is merely late (an *expansion*: the playout point does not
  move, so a late packet still plays at the next tick; the delay has grown
  by one frame).

Depth is adaptive. The buffer starts one frame deep: a frame plays at the
first tick after it arrives. A late packet grows the delay by the
expansion above. The target depth (frames) follows the RFC 3550
interarrival jitter estimate (``1 + floor(3 J / frame)``) and the loss
history (two frames while losses were seen recently, so the next packet's
FEC is there when a frame is missing; a frame given up as lost that then
arrives was late, not lost, and takes its loss back from that history: its
lateness is in the jitter estimate). When every tick for half a second
found more than the target buffered, one frame is dropped to shrink back
(sooner the further over the target it is: each tick counts its excess).

A gap in sequence numbers is declared lost once the buffer holds a frame
beyond it and is ``target`` frames deep; until then the hole is concealed as an expansion (the
frame may still come). After ``MAX_EXPAND`` expansions in a row with nothing
buffered the stream is taken as paused (DTX, mute, a sender that stopped):
``pop`` returns None until the next packet, and concealment stops.

On arrival: :meth:`SpeechJitterBuffer.pop_ready` is a coming tick's
``pop`` done at once, when that pop would decode a packet that is here (the
frame's own, or its successor's FEC: one frame deep, a hole with a frame
after it is lost) and the target depth is one frame (no jitter measured, no
recent loss); that tick's ``pop`` then returns None (its slot was served). At most ``MAX_AHEAD``
frames are served ahead of the clock: two, so a stream whose packets arrive
close to the tick, a little before or after it, plays each on arrival, and
so does one whose delay grew by an expansion. Every decision the tick makes
(concealment, loss, FEC, shrinking) is made as before, by the tick or by the
pop done early in its place; a buffer that holds frames for jitter or FEC
waits for the tick.

Sequence numbers are extended past their 16-bit wrap (RFC 3550 A.1). A jump
of more than ``RESYNC_FRAMES`` either way (a sender restart, a new stream)
restarts playout at the new packet. A duplicate or a packet whose slot was
already played is dropped and counted. Memory per stream is bounded by
``capacity`` frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

FRAME_SAMPLES = 960  # 20 ms at Opus's 48 kHz RTP clock
CLOCK_RATE = 48000
#: Expansions in a row with nothing buffered before the stream is taken as paused.
MAX_EXPAND = 5
#: A sequence jump larger than this (either way) restarts playout (2 s of 20 ms frames).
RESYNC_FRAMES = 100
#: Frames to hold while losses were seen recently (FEC needs the next packet).
LOSS_DEPTH = 2
#: Ticks without a loss after which the loss depth is given up (30 s: a path
#: that lost a packet is likely to lose more).
LOSS_MEMORY_TICKS = 1500
#: Ticks the buffer must stay over target before one frame is dropped.
SHRINK_TICKS = 25
#: A transit-time difference larger than this is a clock jump, not jitter (s).
MAX_TRANSIT_STEP = 1.0
#: Played frames remembered for duplicate detection.
PLAYED_MEMORY = 64
#: Frames pop_ready may serve ahead of the ticks they stand for.
MAX_AHEAD = 2

Kind = Literal["packet", "fec", "plc"]


@dataclass(slots=True)
class Playout:
    kind: Kind
    seq: int  # extended sequence number of the frame this tick stands for
    payload: bytes | None  # the packet to decode (for fec: the successor's payload)


@dataclass
class JitterStats:
    received: int = 0
    played: int = 0  # frames decoded from their own packet
    fec: int = 0  # frames rebuilt from the next packet's FEC
    plc: int = 0  # frames concealed with nothing to decode
    lost: int = 0  # frames declared lost (each played as fec or plc)
    expanded: int = 0  # plc frames inserted while waiting (delay grew by a frame)
    late: int = 0  # arrived after their slot was played
    duplicates: int = 0
    shrunk: int = 0  # frames dropped to reduce the delay
    resyncs: int = 0  # playout restarted at a sequence jump
    overflow: int = 0  # packets beyond capacity (dropped)
    max_depth: int = 0
    longest_plc_run: int = 0  # plc frames in a row between decoded ones: the longest gap heard


@dataclass
class SpeechJitterBuffer:
    clock_rate: int = CLOCK_RATE
    frame_samples: int = FRAME_SAMPLES
    capacity: int = 50  # frames held at most (1 s)
    stats: JitterStats = field(default_factory=JitterStats)

    def __post_init__(self) -> None:
        self._frames: dict[int, tuple[int, bytes]] = {}  # ext seq -> (timestamp, payload)
        self._next: int | None = None  # ext seq of the frame the next tick plays
        self._newest: int | None = None  # highest ext seq seen
        self._played: dict[int, None] = {}  # recently played ext seqs (ordered, bounded)
        self._jitter = 0.0  # RFC 3550 J, seconds
        self._transit: float | None = None
        self._idle = 0  # concealed ticks in a row with nothing buffered
        self._slot_waits = 0  # expansions spent waiting for the current slot
        self._plc_run = 0
        self._over_ticks = 0
        self._ticks_since_loss = LOSS_MEMORY_TICKS
        self._paused = True
        self._ahead = 0  # coming ticks whose pop was done early (pop_ready)
        self._loss_undo: tuple[int, int] | None = None  # (ext seq of the last loss, ticks since the one before)

    # -- state ---------------------------------------------------------------------

    @property
    def jitter_s(self) -> float:
        return self._jitter

    @property
    def jitter_depth(self) -> int:
        """Frames of delay the measured jitter calls for: one, and one more
        for each whole frame in 3 J."""
        frame = self.frame_samples / self.clock_rate
        return min(1 + math.floor(3 * self._jitter / frame), self.capacity // 2)

    @property
    def target(self) -> int:
        """Frames of delay the buffer aims for: the jitter's, at least two
        while losses were seen recently (FEC needs the next packet)."""
        depth = self.jitter_depth
        if self._ticks_since_loss < LOSS_MEMORY_TICKS:
            depth = max(depth, LOSS_DEPTH)
        return min(depth, self.capacity // 2)

    @property
    def depth(self) -> int:
        """Frames from the playout point to the newest packet, holes included."""
        if self._next is None or self._newest is None or self._newest < self._next:
            return 0
        return self._newest - self._next + 1

    def _extend(self, seq: int) -> int:
        if self._newest is None:
            return seq
        ref = self._newest
        delta = ((seq - (ref & 0xFFFF) + 0x8000) & 0xFFFF) - 0x8000
        return ref + delta

    # -- input ---------------------------------------------------------------------

    def push(self, seq: int, timestamp: int, payload: bytes, arrival: float) -> str:
        """Take one packet (``arrival``: monotonic seconds); returns what was
        done with it: stored, duplicate, late, resync or overflow."""
        self.stats.received += 1
        ext = self._extend(seq & 0xFFFF)
        self._update_jitter(timestamp, arrival)
        outcome = "stored"
        if self._next is not None and (ext - self._next >= RESYNC_FRAMES or self._next - ext >= RESYNC_FRAMES):
            self._restart()
            outcome = "resync"
        if self._newest is None or self._next is None:
            self._newest = self._next = ext
            self._paused = False
        if self._paused and ext not in self._played and ext != self._next:
            # Resuming after a pause: start at this packet (what was missed
            # then was concealed or silent, and is not played late).
            if ext > self._next:
                self.stats.lost += ext - self._next
            self._next = ext
        if ext in self._frames or ext in self._played:
            self.stats.duplicates += 1
            return "duplicate"
        if ext < self._next:
            self.stats.late += 1
            if self._loss_undo is not None and self._loss_undo[0] == ext:
                # It was given up, and came: late, not lost (the loss memory it started goes).
                self._ticks_since_loss += self._loss_undo[1]
                self._loss_undo = None
            return "late"
        if ext - self._next >= self.capacity:
            self.stats.overflow += 1
            return "overflow"
        self._frames[ext] = (timestamp & 0xFFFFFFFF, payload)
        self._newest = max(self._newest, ext)
        self._paused = False
        self.stats.max_depth = max(self.stats.max_depth, self.depth)
        return outcome

    def _restart(self) -> None:
        self.stats.resyncs += 1
        self._frames.clear()
        self._played.clear()
        self._next = self._newest = None
        self._transit = None
        self._idle = self._slot_waits = 0

    def _update_jitter(self, timestamp: int, arrival: float) -> None:
        transit = arrival - (timestamp & 0xFFFFFFFF) / self.clock_rate
        if self._transit is not None:
            d = transit - self._transit
            # The RTP clock wraps every 2^32 / clock seconds (~25 h at 48 kHz).
            period = 2**32 / self.clock_rate
            d = (d + period / 2) % period - period / 2
            if abs(d) <= MAX_TRANSIT_STEP:
                self._jitter += (abs(d) - self._jitter) / 16
        self._transit = transit

    # -- output --------------------------------------------------------------------

    def pop_ready(self) -> Playout | None:
        """A coming tick's pop now, if the buffer is one frame deep and that
        frame is here (see the module docstring); else None."""
        if self._ahead >= MAX_AHEAD or self._paused or self._next is None or self.target != 1:
            return None
        if self._next not in self._frames and self._next + 1 not in self._frames:
            return None  # the tick's pop would conceal: that stays the tick's
        self._ahead += 1
        return self._pop()

    def pop(self) -> Playout | None:
        """What to play for this 20 ms tick; None while the stream is paused,
        or when :meth:`pop_ready` played this tick's frame already."""
        if self._ahead:
            self._ahead -= 1
            return None
        return self._pop()

    def _pop(self) -> Playout | None:
        if self._paused or self._next is None:
            return None
        self._ticks_since_loss += 1
        self._maybe_shrink()
        seq = self._next
        entry = self._frames.pop(seq, None)
        if entry is not None:
            return self._advance(Playout("packet", seq, entry[1]))
        beyond = self.depth - 1  # frames buffered past the missing one
        if beyond > 0:
            if beyond >= self.target - 1:
                return self._lose(seq)  # enough has arrived past it: stop waiting
            self._ticks_since_loss = 0  # a hole is waiting: hold frames for FEC
            self._loss_undo = None
            return self._expand(seq)
        # Nothing after it: late or lost, or the stream paused.
        self._idle += 1
        if self._idle > MAX_EXPAND:
            self._paused = True  # nothing is coming: stop concealing
            self._plc_run = 0
            return None
        # Wait out the jitter's depth; while losses hold a frame extra for FEC
        # that frame is the margin, so a missing pair is lost one tick sooner.
        if self._slot_waits < 2 * self.jitter_depth - self.target:
            return self._expand(seq)
        return self._lose(seq)

    def _expand(self, seq: int) -> Playout:
        """Conceal without moving the playout point: the frame may still come."""
        self._slot_waits += 1
        self.stats.expanded += 1
        return self._conceal(Playout("plc", seq, None))

    def _lose(self, seq: int) -> Playout:
        self.stats.lost += 1
        self._loss_undo = (seq, self._ticks_since_loss)
        self._ticks_since_loss = 0
        successor = self._frames.get(seq + 1)
        if successor is not None:
            return self._advance(Playout("fec", seq, successor[1]))
        return self._advance(Playout("plc", seq, None))

    def _advance(self, out: Playout) -> Playout:
        if out.kind == "packet":  # a packet for a concealed slot is late, not a duplicate
            self._remember(out.seq)
        self._next = out.seq + 1
        self._slot_waits = 0
        if out.kind == "plc":
            return self._conceal(out)
        self._idle = 0
        self._close_gap()
        if out.kind == "fec":
            self.stats.fec += 1
        else:
            self.stats.played += 1
        return out

    def _remember(self, seq: int) -> None:
        self._played[seq] = None
        if len(self._played) > PLAYED_MEMORY:
            del self._played[next(iter(self._played))]

    def _conceal(self, out: Playout) -> Playout:
        self.stats.plc += 1
        self._plc_run += 1
        return out

    def _close_gap(self) -> None:
        # A gap is what the agent hears between two decoded frames; concealment
        # at the end of a stream (it stopped) is not one.
        self.stats.longest_plc_run = max(self.stats.longest_plc_run, self._plc_run)
        self._plc_run = 0

    def _maybe_shrink(self) -> None:
        # Every tick of the last SHRINK_TICKS found more than the target
        # buffered: the delay can lose a frame without risking the next one.
        # Each tick counts its excess, so a delay far over the target (a
        # stall of the process, a burst after a network freeze) drains in
        # proportion: 5 frames over lose one every 5 ticks, not every 25.
        excess = self.depth - self.target
        if excess > 0:
            self._over_ticks += excess
            if self._over_ticks >= SHRINK_TICKS:
                self._over_ticks = 0
                assert self._next is not None
                dropped = self._next
                if self._frames.pop(dropped, None) is not None:
                    self._remember(dropped)
                self._next = dropped + 1
                self.stats.shrunk += 1
        else:
            self._over_ticks = 0

    def info(self) -> dict[str, int | float]:
        return {**vars(self.stats), "depth": self.depth, "target": self.target,
                "jitter_ms": round(self._jitter * 1000, 2)}
