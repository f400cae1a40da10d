"""RTT from report blocks and the E-model MOS (values checked by hand against G.107)."""

from __future__ import annotations

import pytest

from manager.protocol import quality as q


def test_rtt_from_lsr_and_dlsr_rfc3550_example():
    # RFC 3550 6.4.1's worked example: A = 0xb710:8000 (46864.5 s), LSR = 0xb705:2000
    # (46853.125 s), DLSR = 0x0005:4000 (5.25 s): RTT = 6.125 s.
    assert q.rtt_ms(0xB7108000, 0xB7052000, 0x00054000) == pytest.approx(6125.0)


def test_rtt_unknown_without_lsr_and_for_a_block_from_the_future():
    assert q.rtt_ms(0x10000, 0, 0) is None
    assert q.rtt_ms(0x10000, 0x20000, 0) is None


def test_rtt_across_the_32_bit_wrap():
    assert q.rtt_ms(0x00000100, 0xFFFFFF00, 0) == pytest.approx(512 / 65536 * 1000)


def test_ntp_middle32_round_trip():
    assert q.ntp_middle32(46864.5) == 0xB7108000


def test_delay_impairment_is_zero_to_100_ms_then_grows():
    assert q.delay_impairment(100) == 0
    # G.107 eq. 7-28 at Ta = 200 ms: X = 1, Idd = 25 * (2**(1/6) - 3*(1+1/729)**(1/6) + 2)
    assert q.delay_impairment(200) == pytest.approx(25 * (2 ** (1 / 6) - 3 * (1 + 1 / 729) ** (1 / 6) + 2))
    assert q.delay_impairment(400) > q.delay_impairment(200) > 0


def test_loss_impairment_g107_random_loss():
    assert q.loss_impairment(0) == 0
    assert q.loss_impairment(3) == pytest.approx(95 * 3 / (3 + 25.1))


@pytest.mark.parametrize("r, expected", [(-5, 1.0), (0, 1.0), (50, 2.58), (93.2, 4.41), (100, 4.5), (120, 4.5)])
def test_mos_from_r(r, expected):
    assert q.mos_from_r(r) == pytest.approx(expected, abs=0.01)


def test_mos_falls_when_loss_rises():
    clean, some, much = (q.mos(40.0, 5.0, loss) for loss in (0.0, 0.03, 0.10))
    assert clean == pytest.approx(4.41, abs=0.01)
    assert clean > some > much
    assert much < 3.6


def test_mos_falls_when_delay_rises():
    assert q.mos(40.0, 2.0, 0.0) > q.mos(400.0, 2.0, 0.0) > q.mos(800.0, 2.0, 0.0)


def test_mos_track_min_avg_and_when():
    t = q.MosTrack()
    assert t.summary() == {"min": None, "min_at": None, "avg": None, "last": None}
    for at, value in [(1.0, 4.4), (2.0, 3.1), (3.0, 4.0)]:
        t.add(value, at)
    assert t.summary() == {"min": 3.1, "min_at": 2.0, "avg": 3.83, "last": 4.0}
