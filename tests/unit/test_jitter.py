"""The speech jitter buffer (manager/transceiver/jitter.py): packets in, one
playout decision per 20 ms tick out, without waiting for a packet."""

from __future__ import annotations

import random

import pytest

from manager.transceiver.jitter import (
    MAX_AHEAD,
    MAX_EXPAND,
    RESYNC_FRAMES,
    Playout,
    SpeechJitterBuffer,
)

FRAME = 0.020
TS = 960


def pkt(i: int) -> bytes:
    return b"frame%d" % i


def run(arrivals: dict[int, float], ticks: int, *, start_seq: int = 0, tick_phase: float = 0.015,
        buf: SpeechJitterBuffer | None = None) -> tuple[SpeechJitterBuffer, list[Playout | None]]:
    """Frame i (seq start_seq + i, sent at i * 20 ms) arrives at arrivals[i]
    (absent: lost); the buffer is ticked every 20 ms from tick_phase on."""
    buf = buf or SpeechJitterBuffer()
    events = sorted((t, i) for i, t in arrivals.items())
    out: list[Playout | None] = []
    k = 0
    for tick in range(ticks):
        now = tick_phase + tick * FRAME
        while k < len(events) and events[k][0] <= now:
            t, i = events[k]
            buf.push((start_seq + i) & 0xFFFF, (i * TS) & 0xFFFFFFFF, pkt(i), t)
            k += 1
        out.append(buf.pop())
    return buf, out


def kinds(out: list[Playout | None]) -> str:
    return "".join("-" if p is None else {"packet": "p", "fec": "f", "plc": "l"}[p.kind] for p in out)


def steady(n: int, delay: float = 0.001) -> dict[int, float]:
    return {i: i * FRAME + delay for i in range(n)}


def test_in_order_stream_plays_every_frame_one_frame_deep():
    buf, out = run(steady(50), 50)
    assert kinds(out) == "p" * 50
    assert [p.payload for p in out if p] == [pkt(i) for i in range(50)]
    assert buf.stats.played == 50 and buf.stats.plc == 0 and buf.stats.max_depth == 1
    assert buf.target == 1


def test_nothing_before_the_first_packet():
    buf = SpeechJitterBuffer()
    assert buf.pop() is None
    assert buf.stats.plc == 0


def test_reordered_pair_plays_in_order():
    arr = steady(20)
    arr[5] = 6 * FRAME + 0.003  # 6 before 5, both after 5's slot
    arr[6] = 6 * FRAME + 0.002
    buf, out = run(arr, 21)
    payloads = [p.payload for p in out if p and p.kind == "packet"]
    assert payloads == [pkt(i) for i in range(20)]
    assert buf.stats.lost == 0


def test_single_loss_with_successor_buffered_uses_fec():
    arr = steady(40)
    del arr[10]
    # Two frames deep (a loss seen earlier holds LOSS_DEPTH): frame 11 is in
    # the buffer when 10's slot comes.
    buf = SpeechJitterBuffer()
    buf._ticks_since_loss = 0
    arr = {i: t - FRAME for i, t in arr.items()}  # arrive a frame early: depth 2
    buf, out = run(arr, 40, buf=buf)
    slot = next(p for p in out if p and p.seq == 10)
    assert slot.kind == "fec" and slot.payload == pkt(11)
    assert buf.stats.lost == 1 and buf.stats.fec == 1
    assert buf.stats.longest_plc_run == 0


def test_loss_one_frame_deep_conceals_then_grows_for_fec():
    arr = steady(60)
    del arr[10]
    del arr[30]
    buf, out = run(arr, 62)
    # First loss: nothing after it when its slot comes, so one plc frame, the
    # delay grows by a frame and the next slot rebuilds 10 from 11's FEC.
    first = [p for p in out if p and p.seq == 10]
    assert [p.kind for p in first] == ["plc", "fec"]
    # The second loss finds its successor buffered: FEC only, no gap.
    second = [p for p in out if p and p.seq == 30]
    assert [p.kind for p in second] == ["fec"]
    assert buf.stats.longest_plc_run == 1
    played = [p.payload for p in out if p and p.kind == "packet"]
    assert played == [pkt(i) for i in range(60) if i not in (10, 30)][:len(played)]


def test_burst_loss_is_concealed_and_playback_continues():
    arr = steady(60)
    for i in range(20, 25):
        del arr[i]
    buf, out = run(arr, 61)
    assert buf.stats.lost == 5
    assert buf.stats.fec >= 1  # the last frame of the burst from 25's FEC
    played = [p.payload for p in out if p and p.kind == "packet"]
    assert pkt(25) in played and pkt(59) in played
    # No tick between the burst and the end went silent (None).
    first = next(i for i, p in enumerate(out) if p)
    assert all(p is not None for p in out[first:60])


def test_stream_end_stops_concealing_after_max_expand():
    buf, out = run(steady(10), 30)
    assert kinds(out) == "p" * 10 + "l" * MAX_EXPAND + "-" * (30 - 10 - MAX_EXPAND)
    assert buf.stats.plc == MAX_EXPAND


def test_pause_then_resume_plays_without_resync():
    arr = steady(10)
    arr.update({i: i * FRAME + 1.0 + 0.001 for i in range(10, 20)})  # 1 s later, same seq run (DTX)
    buf, out = run(arr, 100)
    assert [p.payload for p in out if p and p.kind == "packet"] == [pkt(i) for i in range(20)]
    assert buf.stats.resyncs == 0 and buf.stats.late == 0


def test_late_packet_after_expansion_still_plays():
    arr = steady(30)
    arr[10] += 0.030  # 30 ms late: its first slot is an expansion
    buf, out = run(arr, 31)
    assert [p.payload for p in out if p and p.kind == "packet"] == [pkt(i) for i in range(30)]
    assert kinds(out) == "p" * 10 + "l" + "p" * 20
    assert buf.stats.lost == 0 and buf.stats.late == 0


def test_packet_after_its_slot_was_declared_lost_is_late():
    buf = SpeechJitterBuffer()
    buf.push(0, 0, pkt(0), 0.0)
    assert buf.pop().kind == "packet"
    buf.push(2, 2 * TS, pkt(2), 0.040)
    buf.push(3, 3 * TS, pkt(3), 0.041)
    assert buf.pop().kind == "fec"  # 1 is lost: 2 and 3 are past it
    assert buf.push(1, TS, pkt(1), 0.045) == "late"
    assert buf.stats.late == 1


def test_duplicates_are_dropped_buffered_or_played():
    buf = SpeechJitterBuffer()
    assert buf.push(7, 0, pkt(0), 0.0) == "stored"
    assert buf.push(7, 0, pkt(0), 0.001) == "duplicate"
    assert buf.pop().payload == pkt(0)
    assert buf.push(7, 0, pkt(0), 0.002) == "duplicate"
    assert buf.stats.duplicates == 2 and buf.stats.played == 1


def test_sequence_wrap_plays_straight_through():
    buf, out = run(steady(40), 40, start_seq=0xFFFF - 20)
    assert kinds(out) == "p" * 40
    seqs = [p.seq for p in out]
    assert seqs == list(range(seqs[0], seqs[0] + 40))
    assert buf.stats.resyncs == 0


def test_sequence_jump_resyncs_at_the_new_stream():
    buf = SpeechJitterBuffer()
    for i in range(5):
        buf.push(100 + i, i * TS, pkt(i), i * FRAME)
        buf.pop()
    assert buf.push(100 + 5 + RESYNC_FRAMES + 3, 5 * TS, b"new", 0.1) == "resync"
    assert buf.pop().payload == b"new"
    # A sender restart far behind is a new stream too, not 2 s of late packets.
    assert buf.push(10, 6 * TS, b"older", 0.12) == "resync"
    assert buf.pop().payload == b"older"
    assert buf.stats.resyncs == 2


def test_timestamp_jump_does_not_inflate_jitter():
    buf = SpeechJitterBuffer()
    for i in range(50):
        ts = i * TS + (10 * 48000 if i >= 25 else 0)  # a 10 s timestamp jump, no time gap
        buf.push(i, ts, pkt(i), i * FRAME)
        buf.pop()
    assert buf.jitter_s < 0.001
    assert buf.target == 1


def test_depth_grows_with_jitter_and_shrinks_back():
    rng = random.Random(7)
    arr = {i: i * FRAME + rng.uniform(0, 0.060) for i in range(300)}  # up to 60 ms of jitter
    arr.update({i: i * FRAME + 0.001 for i in range(300, 1200)})  # then a calm network
    buf = SpeechJitterBuffer()
    events = sorted((t, i) for i, t in arr.items())
    k = 0
    depths: list[int] = []
    targets: list[int] = []
    for tick in range(1200):
        while k < len(events) and events[k][0] <= 0.015 + tick * FRAME:
            t, i = events[k]
            buf.push(i, i * TS, pkt(i), t)
            k += 1
        depths.append(buf.depth)
        targets.append(buf.target)
        buf.pop()
        if tick == 299:
            jittery = (buf.stats.lost, buf.stats.late)
    assert max(targets[:300]) >= 3 and max(depths[:300]) >= 3  # grew with the jitter
    assert sum(jittery) <= 6  # 2 % of the jittery frames at most missed their slot
    assert buf.target <= 2 and buf.jitter_s < 0.001
    assert max(depths[-100:]) <= buf.target  # shrunk back to the target
    assert buf.stats.shrunk >= 1


def test_a_stall_drains_in_proportion_to_the_delay_it_left():
    """The playout stalls 200 ms (a starved process) while packets keep
    coming: 10 frames over the target drain within a second, not in 5 s at
    one frame per 0.5 s."""
    buf = SpeechJitterBuffer()
    for i in range(50):
        buf.push(i, i * TS, pkt(i), i * FRAME)
        buf.pop()
    for i in range(50, 60):  # ten packets arrive while no tick runs
        buf.push(i, i * TS, pkt(i), i * FRAME)
    assert buf.depth >= 10
    drained_at = None
    for tick, i in enumerate(range(60, 160)):
        buf.push(i, i * TS, pkt(i), i * FRAME)
        buf.pop()
        if drained_at is None and buf.depth <= buf.target + 1:
            drained_at = tick
    assert drained_at is not None and drained_at <= 50, drained_at
    assert buf.stats.plc == 0 and buf.stats.lost == 0


def test_memory_is_bounded_by_capacity():
    buf = SpeechJitterBuffer(capacity=50)
    buf.push(0, 0, pkt(0), 0.0)
    for i in range(1, 99):  # never ticked: a stalled consumer
        buf.push(i, i * TS, pkt(i), i * FRAME)
    assert len(buf._frames) <= 50
    assert buf.stats.overflow == 49


def _simulate_loss(loss: float, frames: int, seed: int) -> SpeechJitterBuffer:
    rng = random.Random(seed)
    arr = {i: i * FRAME + rng.uniform(0.0005, 0.004) for i in range(frames) if rng.random() >= loss}
    buf, _ = run(arr, frames)
    return buf


def test_two_percent_random_loss_longest_gap_is_two_frames():
    """The loss figure the issue targets (≤ 40 ms gap, ≥ 99 % of frames
    delivered real or concealed): 2 % iid loss over 50,000 frames (1000 s)."""
    buf = _simulate_loss(0.02, 50_000, seed=1)
    s = buf.stats
    delivered = s.played + s.fec + s.plc
    print(f"\n2% loss: lost {s.lost}, fec {s.fec}, plc {s.plc}, longest gap {s.longest_plc_run * 20} ms, "
          f"delivered {delivered}/{50_000}")
    assert s.longest_plc_run * 20 <= 40
    assert delivered >= 0.99 * 50_000
    assert s.fec >= 0.8 * s.lost  # most single losses come back through FEC


# -- on arrival (pop_ready) --------------------------------------------------------


def run_on_arrival(arrivals: dict[int, float], ticks: int, *, tick_phase: float = 0.015,
                   buf: SpeechJitterBuffer | None = None) -> tuple[SpeechJitterBuffer, list[tuple[float, Playout]]]:
    """As run(), the media engine's way: each packet is offered to pop_ready
    as it arrives, the tick pops what is still due. Returns what was played
    and when (the arrival time for a frame served on arrival)."""
    buf = buf or SpeechJitterBuffer()
    events = sorted((t, i) for i, t in arrivals.items())
    played: list[tuple[float, Playout]] = []
    k = 0
    for tick in range(ticks):
        now = tick_phase + tick * FRAME
        while k < len(events) and events[k][0] <= now:
            t, i = events[k]
            if buf.push(i & 0xFFFF, (i * TS) & 0xFFFFFFFF, pkt(i), t) not in ("late", "duplicate"):
                early = buf.pop_ready()
                if early is not None:
                    played.append((t, early))
            k += 1
        out = buf.pop()
        if out is not None:
            played.append((now, out))
    return buf, played


def test_a_frame_in_order_is_served_on_arrival_and_its_tick_skips():
    buf = SpeechJitterBuffer()
    assert buf.push(0, 0, pkt(0), 0.001) == "stored"
    first = buf.pop_ready()
    assert first is not None and (first.kind, first.seq, first.payload) == ("packet", 0, pkt(0))
    assert buf.pop() is None  # the tick this frame stood for: served already
    for i in (1, 2, 3):  # three before the next tick: at most MAX_AHEAD served ahead
        buf.push(i, i * TS, pkt(i), 0.020 + i * 0.001)
    assert buf.pop_ready().seq == 1 and buf.pop_ready().seq == 2 and buf.pop_ready() is None
    assert MAX_AHEAD == 2 and buf.pop() is None and buf.pop() is None
    assert buf.pop().seq == 3  # the tick plays the held one
    # A steady stream: every frame played on arrival, none concealed, no tick plays.
    buf, played = run_on_arrival(steady(100), 100)
    assert [p.seq for _, p in played] == list(range(100))
    assert all(at == pytest.approx(p.seq * FRAME + 0.001) for at, p in played)
    assert buf.stats.plc == 0 and buf.stats.played == 100


def test_on_arrival_the_tick_still_conceals_a_frame_that_did_not_come():
    arr = steady(60)
    del arr[10]
    buf, played = run_on_arrival(arr, 62)
    by_seq = [(p.seq, p.kind) for _, p in played]
    # 10 is concealed by the tick (an expansion), then lost: FEC from 11 once it is here;
    # 11 and on go on being played, each once.
    assert (10, "plc") in by_seq and (10, "fec") in by_seq
    # The FEC is decoded as soon as 11 (which carries it) arrives, not at the next tick.
    assert next(at for at, p in played if p.kind == "fec") == pytest.approx(11 * FRAME + 0.001)
    assert [s for s, k in by_seq if k == "packet"] == [i for i in range(60) if i != 10]
    assert buf.stats.longest_plc_run == 1


def test_a_late_frame_after_its_concealment_is_not_played_twice():
    buf = SpeechJitterBuffer()
    for i in range(3):
        buf.push(i, i * TS, pkt(i), i * FRAME)
        assert buf.pop_ready().seq == i and buf.pop() is None
    # 3 does not come: the tick conceals it twice (an expansion, then lost).
    assert buf.pop().kind == "plc" and buf.pop().kind == "plc"
    assert buf.push(3, 3 * TS, pkt(3), 0.1) == "late" and buf.pop_ready() is None
    buf.push(4, 4 * TS, pkt(4), 0.101)
    assert buf.pop_ready().seq == 4  # 3 was late, not lost: still one frame deep
    assert buf.stats.played == 4 and buf.stats.late == 1
    # After a mere expansion the late frame plays, once: on arrival, and its tick skips.
    buf = SpeechJitterBuffer()
    buf.push(0, 0, pkt(0), 0.0)
    buf.pop_ready()
    buf.pop()
    assert buf.pop().kind == "plc"  # 1 is not here at its tick: an expansion
    buf.push(1, TS, pkt(1), 0.045)
    assert buf.pop_ready().seq == 1 and buf.pop() is None and buf.pop_ready() is None
    assert buf.stats.played == 2


def test_with_jitter_measured_or_losses_seen_frames_wait_for_the_tick():
    rng = random.Random(3)
    arr = {i: i * FRAME + rng.uniform(0, 0.060) for i in range(200)}
    buf, played = run_on_arrival(arr, 205)
    assert buf.target >= 2
    late_half = [(at, p) for at, p in played if p.seq >= 100]
    # Held for the jitter: played at ticks (on the 20 ms grid), not as they came.
    assert all(abs((at - 0.015) / FRAME - round((at - 0.015) / FRAME)) < 1e-6 for at, _ in late_half)
    # After a loss the buffer holds two frames (FEC needs the next packet): no early play.
    buf = SpeechJitterBuffer()
    arr = steady(40)
    del arr[5]
    buf, played = run_on_arrival(arr, 42, buf=buf)
    after = [(at, p) for at, p in played if p.seq > 8]
    assert buf.target == 2 and all(abs((at - 0.015) / FRAME - round((at - 0.015) / FRAME)) < 1e-6
                                   for at, _ in after)


def test_a_frame_given_up_that_comes_late_takes_its_loss_back():
    """A packet 45 ms late is given up (concealed, then lost) and played from
    its successor's FEC; when it comes after all, it was late, not lost: the
    buffer goes back to one frame deep, and once the frame of delay the
    expansion added is shrunk away, frames play on arrival again (a real
    loss would have held two frames for 30 s)."""
    arr = steady(80)
    arr[10] += 0.045
    buf, played = run_on_arrival(arr, 80)
    assert buf.stats.lost == 1 and buf.stats.late == 1 and buf.stats.shrunk == 1
    assert buf.target == 1
    after = [(at, p) for at, p in played if p.seq >= 40]
    assert len(after) == 40 and all(at == pytest.approx(p.seq * FRAME + 0.001) for at, p in after)
    # A real loss (the frame never comes) keeps the buffer two frames deep for FEC.
    arr = steady(80)
    del arr[10]
    buf, _ = run_on_arrival(arr, 80)
    assert buf.stats.lost == 1 and buf.stats.late == 0 and buf.target == 2
