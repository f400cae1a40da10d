"""RTCP sender and receiver reports, SDES and BYE: written and read back (by aiortc's parser too),
malformed compounds refused."""

from __future__ import annotations

import pytest
from aiortc.rtp import RtcpByePacket, RtcpPacket, RtcpSdesPacket, RtcpSenderInfo, RtcpSourceInfo, RtcpSrPacket

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
    sdes = bytes([0x81, 202, 0, 2]) + bytes(8)  # one chunk (SSRC 0) without items, padded
    bye = bytes([0x81, 203, 0, 1]) + bytes(4)
    app = bytes([0x80, 204, 0, 2]) + bytes(8)
    nack = bytes([0x81, 205, 0, 3]) + bytes(12)
    rr = rtcp.Report(ssrc=5, blocks=(block(),)).pack()
    parsed = rtcp.parse(rr + sdes + bye + app + nack)
    assert [r.ssrc for r in parsed.reports] == [5] and parsed.others == 2
    assert parsed.sdes == [rtcp.Sdes(((0, None),))] and parsed.byes == [rtcp.Bye((0,))]


@pytest.mark.parametrize("cname", ["", "a", "abcd", "0123456789abcdef01234567", "x" * 255])
def test_compound_sr_and_sdes_round_trip_ours_and_aiortcs_parser(cname):
    """What the media engine sends (rtcp_sender): SR with one block, then SDES
    with the CNAME; read back by our parser and by aiortc's, as its peer does."""
    sr = rtcp.Report(ssrc=0xCAFE, blocks=(block(ssrc=0xBEEF, lost=-5),),
                     sender=rtcp.SenderInfo(ntp=rtcp.ntp_timestamp(1_700_000_000.5), rtp_timestamp=123456,
                                            packets=250, octets=20000))
    sdes = rtcp.Sdes(((0xCAFE, cname),))
    data = rtcp.serialize([sr, sdes])
    assert len(data) % 4 == 0
    back = rtcp.parse(data)
    assert back.reports == [sr] and back.sdes == [sdes] and back.others == 0
    theirs_sr, theirs_sdes = RtcpPacket.parse(data)
    assert isinstance(theirs_sr, RtcpSrPacket) and isinstance(theirs_sdes, RtcpSdesPacket)
    assert theirs_sr.ssrc == 0xCAFE and theirs_sr.sender_info.ntp_timestamp == sr.sender.ntp
    assert (theirs_sr.sender_info.rtp_timestamp, theirs_sr.sender_info.packet_count,
            theirs_sr.sender_info.octet_count) == (123456, 250, 20000)
    (theirs_block,) = theirs_sr.reports
    assert (theirs_block.ssrc, theirs_block.fraction_lost, theirs_block.packets_lost, theirs_block.highest_sequence,
            theirs_block.jitter, theirs_block.lsr, theirs_block.dlsr) == (0xBEEF, 26, -5, (2 << 16) | 100, 480,
                                                                         0x12345678, 0x8000)
    assert theirs_sdes.chunks[0].ssrc == 0xCAFE and theirs_sdes.chunks[0].items == [(1, cname.encode())]


def test_aiortcs_compound_reads_back_with_ours():
    theirs = RtcpSrPacket(ssrc=9, sender_info=RtcpSenderInfo(ntp_timestamp=(5 << 32) | 7, rtp_timestamp=11,
                                                               packet_count=12, octet_count=13))
    data = bytes(theirs) + bytes(RtcpSdesPacket(chunks=[RtcpSourceInfo(ssrc=9, items=[(1, b"peer")])]))
    back = rtcp.parse(data)
    assert back.reports[0].sender == rtcp.SenderInfo(ntp=(5 << 32) | 7, rtp_timestamp=11, packets=12, octets=13)
    assert back.sdes == [rtcp.Sdes(((9, "peer"),))]


def test_sdes_with_several_chunks_and_items_round_trips():
    sdes = rtcp.Sdes(((1, "one"), (2, None), (3, "three")))
    assert rtcp.parse(sdes.pack()).sdes == [sdes]
    # a NAME item (type 2) before the CNAME is skipped by its length
    chunk = (7).to_bytes(4, "big") + bytes([2, 3]) + b"bob" + bytes([1, 2]) + b"me" + bytes(3)  # end + pad
    data = bytes([0x81, 202, 0, len(chunk) // 4]) + chunk
    assert rtcp.parse(data).sdes == [rtcp.Sdes(((7, "me"),))]


@pytest.mark.parametrize("reason", [None, "", "a", "abc", "call ended", "x" * 255])
def test_bye_round_trips_ours_and_aiortcs_parser(reason):
    """What an engine call sends when it ends (rtcp_sender.RtcpSender.bye):
    SR, SDES, then BYE with a reason; read back by ours and by aiortc's."""
    sr = rtcp.Report(ssrc=0xCAFE, sender=rtcp.SenderInfo(ntp=rtcp.ntp_timestamp(1_700_000_000.5),
                                                         rtp_timestamp=1, packets=2, octets=3))
    bye = rtcp.Bye((0xCAFE,), reason)
    data = rtcp.serialize([sr, rtcp.Sdes(((0xCAFE, "me"),)), bye])
    assert len(data) % 4 == 0
    back = rtcp.parse(data)
    # An empty reason is as good as none (a length octet of 0 is padding).
    assert back.byes == [rtcp.Bye((0xCAFE,), reason or None)] and back.others == 0
    *_, theirs = RtcpPacket.parse(data)
    assert isinstance(theirs, RtcpByePacket) and theirs.sources == [0xCAFE]
    # aiortc's BYE (no reason), with several sources, reads back with ours
    assert rtcp.parse(bytes(RtcpByePacket(sources=[1, 2, 3]))).byes == [rtcp.Bye((1, 2, 3))]


@pytest.mark.parametrize("data, why", [
    (b"\x80\xc9", "shorter than an RTCP header"),
    (bytes([0x40, 201, 0, 1]) + bytes(4), "version 1"),
    (bytes([0x81, 201, 0, 9]) + bytes(8), "claims 40 bytes"),
    (bytes([0x82, 201, 0, 1]) + bytes(4), "needs 52 bytes"),
    (rtcp.Report(ssrc=5).pack() + b"\x80", "trailing"),
    (bytes([0x82, 202, 0, 2]) + bytes(8), "chunk 2 of 2 starts past"),
    (bytes([0x81, 202, 0, 1]) + bytes(4), "has no end item"),
    (bytes([0x81, 202, 0, 2]) + bytes(4) + bytes([1, 9, 0, 0]), "runs past"),
    (bytes([0x82, 203, 0, 1]) + bytes(4), "BYE with 2 sources needs 8 bytes"),
    (bytes([0x81, 203, 0, 2]) + bytes(4) + bytes([9, 0, 0, 0]), "BYE reason at byte 8 runs past"),
])
def test_malformed_compounds_are_refused_with_a_reason(data, why):
    with pytest.raises(rtcp.RtcpError, match=why):
        rtcp.parse(data)


def test_too_many_blocks_for_one_report_is_refused():
    with pytest.raises(rtcp.RtcpError, match="at most 31"):
        rtcp.Report(ssrc=1, blocks=(block(),) * 32).pack()
    with pytest.raises(rtcp.RtcpError, match="at most 255"):
        rtcp.Sdes(((1, "x" * 256),)).pack()
    with pytest.raises(rtcp.RtcpError, match="at most 255"):
        rtcp.Bye((1,), "x" * 256).pack()
    with pytest.raises(rtcp.RtcpError, match="at most 31"):
        rtcp.Bye(tuple(range(32))).pack()


def test_rtt_from_a_block_echoing_our_sender_report():
    sent = 1_700_000_000.0
    sr = rtcp.SenderInfo(ntp=rtcp.ntp_timestamp(sent), rtp_timestamp=0, packets=0, octets=0)
    held = int(0.5 * 65536)  # the peer held it 500 ms
    arrival = ntp_middle32(sent + 0.5 + 0.040 + 2208988800)  # and the round trip took 40 ms
    assert rtt_ms(arrival, sr.middle32, held) == pytest.approx(40.0, abs=0.05)
