"""A call's RTCP figures: the RFC 3550 receiver estimate, reports both ways, MOS
samples, and aiortc's own RTCP read through the tap_rtcp hook on a real call."""

from __future__ import annotations

import asyncio
import random

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import AudioStreamTrack

from manager.protocol import rtcp
from manager.protocol.callstate import Reception
from manager.protocol.quality import ntp_middle32
from manager.transceiver import aiortc_hooks as hooks
from manager.transceiver.rtcp_stats import REMOTE_SRS, CallQuality, EndedFigures, ReceiverEstimator
from tests.support.waiting import eventually_async


def feed(est: ReceiverEstimator, n: int, loss: float, rng: random.Random, start: int = 65000) -> int:
    dropped = 0
    for i in range(n):
        if rng.random() < loss:
            dropped += 1
            continue
        est.rtp((start + i) & 0xFFFF, 960 * i, i * 0.02)
    return dropped


def test_estimator_counts_loss_across_a_sequence_wrap():
    est = ReceiverEstimator(ssrc=1)
    dropped = feed(est, 5000, 0.03, random.Random(1))
    fraction, cumulative, highest, jitter_ms = est.interval()
    assert cumulative == dropped or cumulative == dropped - 1  # a loss at the very end is not seen yet
    assert fraction == pytest.approx(0.03, abs=0.006)
    assert highest == 65000 + 4999 or highest == 65000 + 4998
    assert jitter_ms == pytest.approx(0.0, abs=0.01)  # packets arrive exactly on their clock


def test_estimator_jitter_follows_rfc3550():
    est = ReceiverEstimator(ssrc=1)
    for i in range(2000):
        est.rtp(i, 960 * i, i * 0.02 + (0.005 if i % 2 else 0.0))  # every other packet 5 ms late
    # |D| = 5 ms on each packet: the estimate converges to it.
    assert est.interval()[3] == pytest.approx(5.0, rel=0.02)


def client_rr(our_ssrc: int, fraction: float, lsr: int = 0, dlsr: int = 0) -> bytes:
    return rtcp.Report(ssrc=99, blocks=(rtcp.ReportBlock(our_ssrc, int(fraction * 256), 10, 1000, 480, lsr, dlsr),)
                       ).pack()


def test_client_reports_are_the_downlink_with_rtt_and_mos_falls_with_loss():
    now = [1_700_000_000.0]
    q = CallQuality(1, clock=lambda: now[0])
    q.rtp_sent(1234)
    lsr = ntp_middle32(now[0] - 0.1 + 2208988800)  # our SR went out 100 ms ago, held 60 ms: RTT 40 ms
    q.rtcp_received(client_rr(1234, 0.0, lsr, int(0.06 * 65536)))
    assert q.downlink.fraction_lost == 0.0 and q.downlink.jitter_ms == pytest.approx(10.0)
    assert q.rtt_ms == pytest.approx(40.0, abs=0.1)
    first = q.mos.last
    for loss in (0.03, 0.10):
        now[0] += 2
        q.rtcp_received(client_rr(1234, loss))
        assert q.mos.last < first
        first = q.mos.last
    q.rtcp_received(client_rr(5555, 0.5))  # about another stream: not ours
    assert q.downlink.reports == 3
    assert q.figures()["mos"]["min"] == q.mos.last


def test_our_own_reports_are_the_uplink_and_garbage_is_counted():
    q = CallQuality(1)
    q.rtcp_sent(rtcp.Report(ssrc=4, blocks=(rtcp.ReportBlock(77, 13, 5, 900, 96, 0, 0),)).pack())
    assert q.uplink.fraction_lost == pytest.approx(13 / 256) and q.uplink.jitter_ms == pytest.approx(2.0)
    q.rtcp_received(b"\x80\xc9\x00\x09")
    assert q.malformed == 1


def test_engine_calls_measure_the_uplink_themselves_and_report_it():
    now = [1000.0]
    q = CallQuality(1, clock=lambda: now[0])
    q.rtp_sent(1234)
    assert q.reception_block() is None  # nothing received yet: an SR without a block
    dropped = 0
    for i in range(500):
        if i % 20 == 7:
            dropped += 1
            continue
        q.rtp_received(42, i, 960 * i, i * 0.02)
    q.rtcp_received(client_rr(1234, 0.0))  # the figures are taken at each client report
    assert q.uplink.fraction_lost == pytest.approx(0.05, abs=0.002) and q.uplink.cumulative_lost == dropped
    block = q.reception_block()  # our report has its own interval
    assert block.ssrc == 42 and block.cumulative_lost == dropped and block.highest_seq == 499
    assert block.fraction_lost == int(q.uplink.fraction_lost * 256) and (block.lsr, block.dlsr) == (0, 0)
    assert block.jitter == 0
    assert q.reception_block().fraction_lost == 0  # the next interval saw nothing new


def test_reception_block_cites_the_clients_last_sender_report():
    now = [1_700_000_000.0]
    q = CallQuality(1, clock=lambda: now[0])
    q.rtp_sent(1234)
    q.rtp_received(42, 10, 0, 0.0, roc=3)  # a stream continued after 3 wraps
    ntp = rtcp.ntp_timestamp(now[0] - 2.0)
    q.rtcp_received(rtcp.Report(ssrc=42, sender=rtcp.SenderInfo(ntp=ntp, rtp_timestamp=0, packets=1, octets=9)).pack())
    now[0] += 0.25  # we hold it 250 ms before our report
    block = q.reception_block()
    assert block.lsr == (ntp >> 16) & 0xFFFFFFFF and block.dlsr == int(0.25 * 65536)
    assert block.highest_seq == (3 << 16) | 10
    # our own SR (should the client echo it) is not taken for the client's
    q.rtcp_received(rtcp.Report(ssrc=1234, sender=rtcp.SenderInfo(ntp=ntp + 99, rtp_timestamp=0, packets=1,
                                                                   octets=9)).pack())
    assert q.remote_sr[42][0] == (ntp >> 16) & 0xFFFFFFFF and 1234 not in q.remote_sr


def test_the_clients_last_sender_report_moves_with_the_call_by_its_age():
    """The old owner exports the client's last SR with its age; the new owner
    (another process, another monotonic clock) adds the time since the freeze,
    and its first report block's DLSR counts the SR's whole time held."""
    old_now, new_now = [1_700_000_000.0], [5.0]
    old, new = CallQuality(1, clock=lambda: old_now[0]), CallQuality(1, clock=lambda: new_now[0])
    ntp = rtcp.ntp_timestamp(1_699_999_999.0)
    old.rtcp_received(rtcp.Report(ssrc=42, sender=rtcp.SenderInfo(ntp=ntp, rtp_timestamp=0, packets=1,
                                                                   octets=9)).pack())
    old_now[0] += 0.5  # held 500 ms before the export
    (state,) = old.last_sr_state().values()
    assert state.ntp_middle32 == (ntp >> 16) & 0xFFFFFFFF and state.age == pytest.approx(0.5)
    new.continue_last_sr(old.last_sr_state(), since_export=0.25)  # imported 250 ms after the freeze
    new.rtp_received(42, 10, 0, 0.0)
    new_now[0] += 0.1
    block = new.reception_block()
    assert block.lsr == state.ntp_middle32 and block.dlsr == pytest.approx(0.85 * 65536, abs=2)
    assert new.last_sr_state()["42"].age == pytest.approx(0.85)  # and so on to the next owner



def test_the_clients_stream_counts_move_with_the_call():
    """The new owner's report blocks go on from the old owner's counts: one
    cumulative loss and one highest sequence number for the whole call, and
    its first interval starts at the import."""
    old, new = CallQuality(1), CallQuality(1)
    for q in (old, new):
        q.rtp_sent(1234)
    lost_old = 0
    for i in range(300):  # across a wrap (65400 + 300), every 10th lost
        if i % 10 == 3:
            lost_old += 1
            continue
        old.rtp_received(42, (65400 + i) & 0xFFFF, 960 * i, i * 0.02, roc=2)
    assert old.reception_block().cumulative_lost == lost_old
    counts = old.reception_state()
    highest = {"42": ((65400 + 299) & 0xFFFF, 3)}  # the export's RTP state: wrapped once more
    new.continue_reception(counts, highest)
    lost_new = 0
    for i in range(300, 400):  # every 5th lost here
        if i % 5 == 0:
            lost_new += 1
            continue
        new.rtp_received(42, (65400 + i) & 0xFFFF, 960 * i, i * 0.02, roc=3)
    block = new.reception_block()
    assert block.cumulative_lost == lost_old + lost_new
    assert block.highest_seq == (3 << 16) + ((65400 + 399) & 0xFFFF)
    assert block.fraction_lost == int(lost_new / 100 * 256)  # the interval since the import only
    assert block.jitter == int(counts["42"].jitter)  # steady arrivals: the estimate carried on
    # Without the counts the new owner would count from its first packet.
    fresh = CallQuality(1)
    fresh.rtp_sent(1234)
    for i in range(300, 400):
        if i % 5:
            fresh.rtp_received(42, (65400 + i) & 0xFFFF, 960 * i, i * 0.02, roc=3)
    assert fresh.reception_block().cumulative_lost == lost_new - 1  # its first packet is its base


def test_reception_counts_that_do_not_fit_the_stream_are_not_taken():
    q = CallQuality(1)
    bad = {"42": Reception(base_seq=(5 << 16) + 10, received=3, jitter=0.0)}
    q.continue_reception(bad, {"42": (9, 0)})  # base beyond the highest: counted anew
    q.continue_reception(bad, {})  # no position for the stream: counted anew
    q.rtp_sent(1)
    q.rtp_received(42, 7, 0, 0.0)
    assert q.reception_block().cumulative_lost == 0 and q.reception_block().highest_seq == 7

def test_the_last_sender_reports_kept_are_bounded():
    q = CallQuality(1)
    for ssrc in range(100):
        q.rtcp_received(rtcp.Report(ssrc=ssrc, sender=rtcp.SenderInfo(ntp=ssrc, rtp_timestamp=0, packets=1,
                                                                       octets=9)).pack())
    assert list(q.remote_sr) == list(range(100 - REMOTE_SRS, 100))


def test_hand_over_keeps_the_history():
    old, new = CallQuality(1), CallQuality(1)
    old.rtp_sent(9)
    old.rtcp_received(client_rr(9, 0.1))
    new.carry_on(old)
    assert new.downlink.reports == 1 and new.first_rtp_sent_at == old.first_rtp_sent_at


def test_ended_figures_are_kept_for_a_while_and_bounded():
    ended = EndedFigures(keep=2, ttl=10)
    for i in range(3):
        ended.add(i, {"x": i}, "bye", now=0.0)
    assert ended.get(0, now=1.0) is None and ended.get(2, now=1.0)["end_reason"] == "bye"
    assert ended.get(2, now=11.0) is None


def test_tap_rtcp_reads_a_real_aiortc_calls_reports_both_ways():
    """Two aiortc peers with audio: the answerer's reports go out through the
    hook (uplink), the offerer's come in (downlink, with an RTT: aiortc sends
    sender reports and echoes LSR/DLSR)."""

    async def run() -> CallQuality:
        a, b = RTCPeerConnection(RTCConfiguration(iceServers=[])), RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            a.addTrack(AudioStreamTrack())
            b.addTrack(AudioStreamTrack())
            q = CallQuality(1)
            await a.setLocalDescription(await a.createOffer())
            await b.setRemoteDescription(a.localDescription)
            dtls = b.getTransceivers()[0].receiver.transport
            hooks.tap_rtcp(dtls, sent=q.sent, received=q.rtcp_received)
            await b.setLocalDescription(await b.createAnswer())
            await a.setRemoteDescription(b.localDescription)
            await eventually_async(lambda: q.uplink.reports and q.downlink.reports and q.rtt_ms is not None, 20,
                                   what="RTCP both ways and an RTT")
            return q
        finally:
            await a.close()
            await b.close()

    q = asyncio.run(run())
    assert q.downlink.fraction_lost == 0.0 and q.uplink.fraction_lost == 0.0
    assert 0 <= q.rtt_ms < 100  # loopback
    assert q.mos.samples >= 1 and q.mos.last > 4.0
    assert q.first_rtp_sent_at is not None
