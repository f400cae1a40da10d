"""The media engine's RTCP (manager/transceiver/rtcp_sender.py): RFC 3550's
interval, the compound it sends, RTT from a report that cites it, and the
SRTCP index continued past a previous owner's."""

from __future__ import annotations

import os
import random

import pylibsrtp
import pytest
from aiortc.rtp import RtcpByePacket, RtcpPacket, RtcpSdesPacket, RtcpSrPacket

from manager.protocol import rtcp
from manager.protocol.quality import ntp_middle32
from manager.transceiver.rtcp_sender import COMPENSATION, T_MIN, RtcpSender, cname_for, skip_srtcp_indices
from manager.transceiver.rtcp_stats import NTP_EPOCH_OFFSET, CallQuality

PROFILE = pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80


def test_interval_is_rfc3550s_for_a_two_party_call():
    sender = RtcpSender(1, "c", CallQuality(1), rng=random.Random(3).random)
    assert not sender.due(100.0)  # the first ask schedules the first report
    first = sender.next_at - 100.0
    assert T_MIN / 2 * 0.5 / COMPENSATION <= first <= T_MIN / 2 * 1.5 / COMPENSATION
    gaps = []
    now = sender.next_at
    for _ in range(2000):
        assert sender.due(now)
        sender.report(now, rtp_timestamp=lambda t: 0, packets=0, octets=0)
        gaps.append(sender.next_at - now)
        assert not sender.due(now + gaps[-1] - 1e-6)
        now = sender.next_at
    assert min(gaps) >= T_MIN * 0.5 / COMPENSATION and max(gaps) <= T_MIN * 1.5 / COMPENSATION
    assert sum(gaps) / len(gaps) == pytest.approx(T_MIN / COMPENSATION, rel=0.03)


def test_report_is_sr_with_our_figures_a_block_and_the_cname_and_gives_the_rtt():
    now = [1_700_000_000.0]
    ours = CallQuality(1, clock=lambda: now[0])
    ours.rtp_sent(777)
    for i in range(50):
        ours.rtp_received(4444, 100 + i, 960 * i, i * 0.02)
    sender = RtcpSender(777, cname_for(b"k" * 60, 777), ours)
    data = sender.report(5.0, rtp_timestamp=lambda t: int(t * 48000), packets=50, octets=4000)
    sr, sdes = RtcpPacket.parse(data)  # as the client reads it
    assert isinstance(sr, RtcpSrPacket) and isinstance(sdes, RtcpSdesPacket)
    assert sr.ssrc == 777 and sr.sender_info.rtp_timestamp == 240000
    assert (sr.sender_info.packet_count, sr.sender_info.octet_count) == (50, 4000)
    assert sr.sender_info.ntp_timestamp == rtcp.ntp_timestamp(now[0])
    assert sr.reports[0].ssrc == 4444 and sr.reports[0].highest_sequence == 149
    assert sdes.chunks[0].items == [(1, cname_for(b"k" * 60, 777).encode())]
    # The client holds it 300 ms and the network takes 30 ms back and forth.
    now[0] += 0.315
    lsr = (sr.sender_info.ntp_timestamp >> 16) & 0xFFFFFFFF
    rr = rtcp.Report(ssrc=4444, blocks=(rtcp.ReportBlock(777, 0, 0, 1, 0, lsr, int(0.3 * 65536)),))
    ours.rtcp_received(rr.pack())
    assert ours.rtt_ms == pytest.approx(15.0, abs=0.1)
    assert ntp_middle32(now[0] + NTP_EPOCH_OFFSET) - lsr == pytest.approx(0.315 * 65536, abs=2)


def test_cname_is_stable_per_call_and_says_nothing():
    km = os.urandom(60)
    assert cname_for(km, 5) == cname_for(km, 5) != cname_for(os.urandom(60), 5)
    assert len(cname_for(km, 5)) == 24 and km.hex()[:8] not in cname_for(km, 5)


def _session(key: bytes, inbound: bool) -> pylibsrtp.Session:
    kind = pylibsrtp.Policy.SSRC_ANY_INBOUND if inbound else pylibsrtp.Policy.SSRC_ANY_OUTBOUND
    return pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=kind, srtp_profile=PROFILE))


@pytest.mark.parametrize("skip", [True, False])
def test_a_new_owners_srtcp_goes_on_past_the_old_owners_indices(skip):
    """The client's replay window has seen the old owner's SRTCP indices: a
    fresh libsrtp session would reuse them (refused, and a reused keystream)."""
    key = os.urandom(30)
    old, client = _session(key, inbound=False), _session(key, inbound=True)
    rr = rtcp.Report(ssrc=777).pack()
    for _ in range(40):
        client.unprotect_rtcp(old.protect_rtcp(rr))
    new = _session(key, inbound=False)
    if skip:
        skip_srtcp_indices(new, 777, 40)
    sr = rtcp.Report(ssrc=777, sender=rtcp.SenderInfo(ntp=1, rtp_timestamp=2, packets=3, octets=4)).pack()
    if skip:
        assert rtcp.parse(client.unprotect_rtcp(new.protect_rtcp(sr))).reports[0].sender.packets == 3
    else:
        with pytest.raises(pylibsrtp.Error, match="replay"):
            client.unprotect_rtcp(new.protect_rtcp(sr))


def test_bye_is_the_last_report_with_a_goodbye():
    sender = RtcpSender(777, "me", CallQuality(1))
    data = sender.bye(5.0, rtp_timestamp=lambda t: 960, packets=3, octets=240, reason="done")
    back = rtcp.parse(data)
    assert back.reports[0].sender.packets == 3 and back.sdes == [rtcp.Sdes(((777, "me"),))]
    assert back.byes == [rtcp.Bye((777,), "done")] and sender.srtcp_used == 1
    assert isinstance(RtcpPacket.parse(data)[-1], RtcpByePacket)  # as the client reads it
