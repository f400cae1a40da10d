"""An ICE-TCP leg's media counts (manager/relay/slowpath/stream_media.py):
the kernel's per-flow accounting (bpf/relay.bpf.c rtp_account) in userspace."""

from __future__ import annotations

import struct

import pytest

from manager.relay.record_build import pack_counts
from manager.relay.slowpath.stream_media import RtpCount, StreamMedia

SSRC = 0x11223344
FRAME_S = 0.02
FRAME_TICKS = 960  # 20 ms at 48 kHz


def rtp(seq: int, ts: int | None = None, ssrc: int = SSRC, pt: int = 111, size: int = 80) -> bytes:
    ts = seq * FRAME_TICKS if ts is None else ts
    return struct.pack("!BBHII", 0x80, pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + bytes(size - 12)


def feed(seqs: list[int], **kw) -> RtpCount:
    c = RtpCount()
    for i, seq in enumerate(seqs):
        c.count(rtp(seq, **kw), 100.0 + i * FRAME_S)
    return c


# (description, sequence numbers in arrival order, expected, received, lost, reordered)
SEQUENCES = [
    ("in order", [10, 11, 12, 13], 4, 4, 0, 0),
    ("two lost", [10, 11, 14, 15], 6, 4, 2, 0),
    ("one reordered", [10, 12, 11, 13], 4, 4, 0, 1),
    ("across the wrap", [65534, 65535, 0, 1], 4, 4, 0, 0),
    ("lost across the wrap", [65534, 1, 2], 5, 3, 2, 0),
    ("a duplicate", [10, 11, 11, 12], 3, 4, -1, 0),  # neither ahead nor behind
]


@pytest.mark.parametrize(("seqs", "expected", "received", "lost", "reordered"),
                         [s[1:] for s in SEQUENCES], ids=[s[0] for s in SEQUENCES])
def test_sequence_accounting(seqs, expected, received, lost, reordered):
    c = feed(seqs)
    assert (c.expected, c.received, c.lost, c.reordered) == (expected, received, lost, reordered)
    assert c.packets == len(seqs) and c.bytes == 80 * len(seqs) and c.ssrc == SSRC


def test_rtcp_stun_dtls_and_other_ssrcs_count_as_packets_only():
    c = RtpCount()
    c.count(rtp(5), 1.0)
    c.count(struct.pack("!BBH", 0x81, 200, 6) + bytes(24), 1.01)  # an SR
    c.count(b"\x00\x01" + bytes(18), 1.02)  # STUN
    c.count(b"\x17\xfe\xfd" + bytes(20), 1.03)  # DTLS
    c.count(rtp(6, ssrc=0x99), 1.04)  # a second stream
    c.count(rtp(6)[:8], 1.05)  # a short packet
    assert c.packets == 6 and (c.received, c.expected) == (1, 1)


def test_jitter_is_zero_on_the_media_clock_and_rfc3550_when_late():
    assert feed(list(range(50))).jitter == 0  # every packet on time: no jitter
    c = RtpCount()
    arrivals = [0.0, 0.02, 0.05, 0.06]  # the third 10 ms late, the fourth on time
    for i, t in enumerate(arrivals):
        c.count(rtp(i), 10.0 + t)
    # RFC 3550 A.8 in 16 J: J += |D| - J/16, D the transit change in ticks: 480, then 480.
    j = 0
    for d in (0, 480, 480):
        j += d - ((j + 8) >> 4)
    assert c.jitter == j and c.jitter_ms == pytest.approx(j / 16 / 48, abs=1e-3)


def test_counts_are_in_the_order_of_a_udp_flows():
    m = StreamMedia()
    for seq in (1, 2, 4):
        m.up.count(rtp(seq), seq * FRAME_S)
    m.down.count(rtp(7, ssrc=5), 0.0)
    assert pack_counts(m.up, m.down, 9.5) == (3, 240, 1, 80, 4, 1, 0, 1, 0, 0, SSRC, 4, 3, 5, 7, 1, 9.5)
