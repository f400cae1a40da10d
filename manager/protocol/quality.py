"""Call quality from RTCP figures: round-trip time (RFC 3550) and an E-model MOS (ITU-T G.107).

RTT (RFC 3550 section 6.4.1): a receiver report carries LSR (the middle 32
bits of the NTP time of the last sender report it got) and DLSR (how long it
held it, in 1/65536 s). At the report's arrival A (middle 32 bits of NTP),
``RTT = A - LSR - DLSR``.

MOS: the E-model of ITU-T G.107 (06/2015), with its default values for
everything but delay and packet loss, so ``R = R0 - Is - Id - Ie_eff + A``
reduces to ``R = 93.2 - Id - Ie_eff`` (G.107 section 7 with the table 3
defaults: R0 - Is = 93.2, A = 0):

- ``Id``: the delay impairment. With the default echo loss (TELR 65 dB) the
  talker-echo terms are negligible, so ``Id = Idd``, where for an absolute
  delay ``Ta`` over 100 ms ``Idd = 25 * ((1 + X**6) ** (1/6) - 3 * (1 + (X/3)**6) ** (1/6) + 2)``
  with ``X = log2(Ta / 100)`` (G.107 eq. 7-28), and 0 below.
- ``Ie_eff = Ie + (95 - Ie) * Ppl / (Ppl / BurstR + Bpl)`` (G.107 eq. 7-29),
  ``Ppl`` the loss in percent, ``BurstR`` 1 for random loss.
- ``MOS = 1 + 0.035 R + R (R - 60)(100 - R) 7e-6`` for 0 < R < 100
  (G.107 annex B), 1 below and 4.5 above.

G.113 lists no Opus values; the codec is taken as G.711 with packet loss
concealment (G.113 appendix I: ``Ie = 0``, ``Bpl = 25.1``), which rates a
loss as Opus's PLC and FEC would at worst. The absolute delay is the one-way
network delay (half the RTT) plus the jitter buffer (taken as twice the
interarrival jitter) plus one 20 ms packet: the estimate used by
Cole and Rosenbluth, "Voice over IP performance monitoring" (2001).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

NTP_UNITS = 65536.0  # LSR, DLSR and the middle 32 bits of NTP time: 1/65536 s
R_DEFAULT = 93.2  # R0 - Is with G.107's default values
IE_PCM_PLC = 0.0  # G.113 appendix I, G.711 with PLC
BPL_PCM_PLC = 25.1
PACKET_MS = 20.0


def ntp_middle32(ntp_seconds: float) -> int:
    """The middle 32 bits of an NTP timestamp (16 bits of seconds, 16 of fraction)."""
    return int(round(ntp_seconds * NTP_UNITS)) & 0xFFFFFFFF


def rtt_ms(arrival_middle32: int, lsr: int, dlsr: int) -> float | None:
    """RFC 3550 RTT in ms from a report block's LSR and DLSR; None when the block has no LSR."""
    if lsr == 0:
        return None  # no sender report received yet by the peer
    rtt = (arrival_middle32 - lsr - dlsr) & 0xFFFFFFFF
    if rtt > 0x80000000:  # negative: clocks or a stale block; not a measurement
        return None
    return rtt / NTP_UNITS * 1000.0


def delay_impairment(ta_ms: float) -> float:
    """G.107 Idd for an absolute one-way delay in ms (0 up to 100 ms)."""
    if ta_ms <= 100.0:
        return 0.0
    x = math.log2(ta_ms / 100.0)
    return 25.0 * ((1 + x**6) ** (1 / 6) - 3 * (1 + (x / 3) ** 6) ** (1 / 6) + 2)


def loss_impairment(loss_percent: float, ie: float = IE_PCM_PLC, bpl: float = BPL_PCM_PLC,
                    burst_ratio: float = 1.0) -> float:
    """G.107 Ie_eff for a packet loss in percent."""
    ppl = min(max(loss_percent, 0.0), 100.0)
    return ie + (95.0 - ie) * ppl / (ppl / burst_ratio + bpl)


def mos_from_r(r: float) -> float:
    """G.107 annex B: R to the estimated MOS (conversational quality)."""
    if r <= 0:
        return 1.0
    if r >= 100:
        return 4.5
    return 1 + 0.035 * r + r * (r - 60) * (100 - r) * 7e-6


def absolute_delay_ms(rtt: float | None, jitter_ms: float) -> float:
    """One-way delay + a jitter buffer of twice the jitter + one packet (Cole and Rosenbluth)."""
    return (rtt or 0.0) / 2 + 2 * jitter_ms + PACKET_MS


def r_factor(rtt: float | None, jitter_ms: float, loss_fraction: float) -> float:
    return R_DEFAULT - delay_impairment(absolute_delay_ms(rtt, jitter_ms)) - loss_impairment(100 * loss_fraction)


def mos(rtt: float | None, jitter_ms: float, loss_fraction: float) -> float:
    """The E-model MOS estimate for an RTT (ms, None if unknown), a jitter (ms) and a loss fraction."""
    return round(mos_from_r(r_factor(rtt, jitter_ms, loss_fraction)), 2)


@dataclass
class MosTrack:
    """MOS over a call: minimum (and when), average, the last value."""

    samples: int = 0
    total: float = 0.0
    minimum: float | None = None
    minimum_at: float | None = None
    last: float | None = None

    def add(self, value: float, at: float) -> None:
        self.samples += 1
        self.total += value
        self.last = value
        if self.minimum is None or value < self.minimum:
            self.minimum, self.minimum_at = value, at

    @property
    def average(self) -> float | None:
        return round(self.total / self.samples, 2) if self.samples else None

    def summary(self) -> dict[str, float | None]:
        return {"min": self.minimum, "min_at": self.minimum_at, "avg": self.average, "last": self.last}
