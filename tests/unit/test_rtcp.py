"""RTCP sender and receiver reports: written and read back, malformed compounds refused."""

from __future__ import annotations

import pytest

from manager.protocol import rtcp
from manager.protocol.quality import ntp_middle32, rtt_ms


def block(ssrc: int = 7, lost: int = 3) -> rtcp.ReportBlock:
    return rtcp.ReportBlock(ssrc=ssrc, fraction_lost=26, cumulative_lost=lost, highest_seq=(2 << 16) | 100,
                            jitter=480, lsr=0x12345678, dlsr=0x8000)


def test_receiver_report_round_trips():
    rr = rtcp.Report(ssrc=0xDEADBEEF, blocks=(block(), block(ssrc=8, lost=-2)))
    parsed = rtcp.parse(rr.pack())
    assert parsed.reports == [rr] and parsed.others == 0


def test_sender_report_round_trips_with_its_ntp_time():
    ntp = rtcp.ntp_timestamp(1_700_000_000.25)
    sr = rtcp.Report(ssrc=1, sender=rtcp.SenderInfo(ntp=ntp, rtp_timestamp=960, packets=50, octets=4000),
                     blocks=(block(),))
    (back,) = rtcp.parse(sr.pack()).reports
    assert back == sr and back.packet_type == rtcp.SR
    assert back.sender.middle32 == ntp_middle32(1_700_000_000.25 + 2208988800)


def test_compound_skips_other_packets_by_their_length():
    sdes = bytes([0x81, 202, 0, 2]) + bytes(8)  # one chunk, padded
    bye = bytes([0x81, 203, 0, 1]) + bytes(4)
    rr = rtcp.Report(ssrc=5, blocks=(block(),)).pack()
    parsed = rtcp.parse(rr + sdes + bye)
    assert [r.ssrc for r in parsed.reports] == [5] and parsed.others == 2


@pytest.mark.parametrize("data, why", [
    (b"\x80\xc9", "shorter than an RTCP header"),
    (bytes([0x40, 201, 0, 1]) + bytes(4), "version 1"),
    (bytes([0x81, 201, 0, 9]) + bytes(8), "claims 40 bytes"),
    (bytes([0x82, 201, 0, 1]) + bytes(4), "needs 52 bytes"),
    (rtcp.Report(ssrc=5).pack() + b"\x80", "trailing"),
])
def test_malformed_compounds_are_refused_with_a_reason(data, why):
    with pytest.raises(rtcp.RtcpError, match=why):
        rtcp.parse(data)


def test_too_many_blocks_for_one_report_is_refused():
    with pytest.raises(rtcp.RtcpError, match="at most 31"):
        rtcp.Report(ssrc=1, blocks=(block(),) * 32).pack()


def test_rtt_from_a_block_echoing_our_sender_report():
    sent = 1_700_000_000.0
    sr = rtcp.SenderInfo(ntp=rtcp.ntp_timestamp(sent), rtp_timestamp=0, packets=0, octets=0)
    held = int(0.5 * 65536)  # the peer held it 500 ms
    arrival = ntp_middle32(sent + 0.5 + 0.040 + 2208988800)  # and the round trip took 40 ms
    assert rtt_ms(arrival, sr.middle32, held) == pytest.approx(40.0, abs=0.05)
