"""A call's RTCP figures per direction, and its MOS over time.

Two directions, named as on the whole path between the client and here:

- ``uplink`` (the client's audio to the agent): what this transceiver
  measured of the client's RTP. On aiortc's path aiortc's own receiver
  measures it and says it in the receiver reports it sends (read as they go
  out, aiortc_hooks.tap_rtcp); on the media engine a
  :class:`ReceiverEstimator` (RFC 3550 appendix A.3 and A.8) measures it from
  the RTP the engine decrypts (the figures taken at each of the client's
  reports), and :meth:`CallQuality.reception_block` says it in the engine's
  own reports (rtcp_sender), each over the interval since the last one.
- ``downlink`` (the agent's audio to the client): what the client says in its
  receiver reports about our SSRC, and the round-trip time from each report
  block's LSR and DLSR (RFC 3550 section 6.4.1), the LSR being one of our
  sender reports (aiortc's, or the engine's).

Each report updates a direction's figures and takes a MOS sample
(manager.protocol.quality, G.107 E-model) of the worse direction, at most one
a second. The figures outlive the call for a while (:class:`EndedFigures`),
so relayd can read them after the call has ended.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiortc.rtp import is_rtcp

from manager.protocol import quality, rtcp
from manager.protocol.callstate import LastSenderReport, Reception

logger = logging.getLogger(__name__)

CLOCK_RATE = 48000  # Opus
NTP_EPOCH_OFFSET = 2208988800
MOS_INTERVAL = 1.0  # s between MOS samples
ENDED_KEEP = 1024  # ended calls whose figures are kept for relayd
ENDED_TTL = 600.0
REMOTE_SRS = 8  # client SSRCs whose last sender report is kept (a call has one or two)


@dataclass
class DirectionFigures:
    """One direction's figures, as the latest report says them and averaged over the call."""

    reports: int = 0
    fraction_lost: float | None = None  # the last report's interval
    cumulative_lost: int | None = None
    highest_seq: int | None = None
    first_seq: int | None = None  # extended highest sequence of the first report (for "expected")
    jitter_ms: float | None = None
    loss_sum: float = 0.0
    expected: int | None = None  # where counted here (the media engine's own estimate)

    def update(self, fraction: float, cumulative: int, highest: int, jitter_ms: float) -> None:
        self.reports += 1
        self.fraction_lost, self.cumulative_lost, self.jitter_ms = fraction, cumulative, jitter_ms
        if self.first_seq is None:
            self.first_seq = highest
        self.highest_seq = highest
        self.loss_sum += fraction

    @property
    def loss_fraction(self) -> float | None:
        """Over the call: lost / expected where counted here, else the mean of the
        reports' interval losses (each interval is about as long)."""
        if self.expected:
            return round(max(self.cumulative_lost or 0, 0) / self.expected, 5)
        if self.reports == 0:
            return None
        return round(self.loss_sum / self.reports, 5)

    def to_dict(self) -> dict[str, Any]:
        return {"reports": self.reports, "fraction_lost": self.fraction_lost, "loss_fraction": self.loss_fraction,
                "expected": self.expected,
                "cumulative_lost": self.cumulative_lost, "highest_seq": self.highest_seq,
                "jitter_ms": None if self.jitter_ms is None else round(self.jitter_ms, 3)}


class ReceiverEstimator:
    """RFC 3550 A.1, A.3 and A.8 for one received SSRC: expected, lost, interval loss, jitter."""

    def __init__(self, ssrc: int, clock_rate: int = CLOCK_RATE, cycles: int = 0) -> None:
        self.ssrc, self.clock_rate = ssrc, clock_rate
        self.base_seq: int | None = None  # extended
        self.max_seq = 0
        self.cycles = cycles << 16  # a stream continued from another owner: its rollover counter
        self.received = 0
        #: (expected, received) at the last interval, per reader: the call's
        #: figures and our reports each take their own intervals.
        self._prior: dict[str, tuple[int, int]] = {}
        self._start = (0, 0)  # (expected, received) where a reader's first interval starts
        self.transit: float | None = None
        self.jitter = 0.0  # in RTP timestamp units, as a report carries it

    def rtp(self, seq: int, timestamp: int, arrival: float) -> None:
        if self.base_seq is None:
            self.max_seq = seq
            self.base_seq = self.cycles + seq
        else:
            delta = (seq - self.max_seq) & 0xFFFF
            if 0 < delta < 0x8000:  # in order (a jump forward is still in order)
                if seq < self.max_seq:
                    self.cycles += 1 << 16
                self.max_seq = seq
        self.received += 1
        transit = arrival * self.clock_rate - timestamp
        if self.transit is not None:
            d = abs(transit - self.transit)
            if d < self.clock_rate * 10:  # a timestamp jump (new talk spurt source) is no jitter
                self.jitter += (d - self.jitter) / 16
        self.transit = transit

    @property
    def extended_max(self) -> int:
        return self.cycles + self.max_seq

    @property
    def expected(self) -> int:
        return 0 if self.base_seq is None else self.extended_max - self.base_seq + 1

    @property
    def lost(self) -> int:
        return self.expected - self.received

    def restart_intervals(self) -> None:
        """Every reader's next interval starts now (a stream continued from another owner)."""
        self._start = (self.expected, self.received)
        self._prior.clear()

    def interval(self, reader: str = "figures") -> tuple[float, int, int, float]:
        """(fraction lost since `reader`'s last call, cumulative lost, extended highest, jitter in ms)."""
        expected, received = self.expected, self.received
        expected_prior, received_prior = self._prior.get(reader, self._start)
        exp_i, rec_i = expected - expected_prior, received - received_prior
        self._prior[reader] = (expected, received)
        lost_i = exp_i - rec_i
        fraction = lost_i / exp_i if exp_i > 0 and lost_i > 0 else 0.0
        return fraction, self.lost, self.extended_max, self.jitter / self.clock_rate * 1000


class CallQuality:
    """The RTCP figures of one call (see the module docstring)."""

    def __init__(self, conn_id: int, clock=time.time) -> None:
        self.conn_id = conn_id
        self.clock = clock
        self.uplink = DirectionFigures()
        self.downlink = DirectionFigures()
        self.rtt_ms: float | None = None
        self.mos = quality.MosTrack()
        self.malformed = 0  # RTCP compounds that did not parse
        self.first_rtp_sent_at: float | None = None
        self.first_rtp_received_at: float | None = None
        self.local_ssrcs: set[int] = set()
        #: The client's last sender report per SSRC: (its NTP middle 32 bits, our clock at arrival).
        self.remote_sr: dict[int, tuple[int, float]] = {}
        self._estimator: ReceiverEstimator | None = None
        self._base_lost = self._base_expected = 0
        self._last_sample = 0.0

    # -- what the hooks feed ------------------------------------------------------------

    def sent(self, plain: bytes) -> None:
        """A packet aiortc sends: RTP (the first one is the call's first audio) or RTCP."""
        if is_rtcp(plain):
            self.rtcp_sent(plain)
        elif len(plain) >= 12 and self.first_rtp_sent_at is None:
            self.rtp_sent(int.from_bytes(plain[8:12], "big"))

    def rtcp_sent(self, plain: bytes) -> None:
        """A compound aiortc sends: its report blocks are our reception of the client (uplink)."""
        compound = self._parse(plain)
        if compound is None:
            return
        for report in compound.reports:
            self.local_ssrcs.add(report.ssrc)
            for block in report.blocks:
                self.uplink.update(block.fraction_lost / 256, block.cumulative_lost, block.highest_seq,
                                   block.jitter / CLOCK_RATE * 1000)
        if compound.reports:
            self._sample()

    def rtcp_received(self, plain: bytes) -> None:
        """A compound from the client: blocks about our stream are the downlink,
        and give the RTT; its sender reports are what our next report's LSR cites."""
        now = self.clock()
        arrival = quality.ntp_middle32(now + NTP_EPOCH_OFFSET)
        compound = self._parse(plain)
        if compound is None:
            return
        seen = False
        for report in compound.reports:
            if report.sender is not None and report.ssrc not in self.local_ssrcs:
                self._remember_sr(report.ssrc, report.sender.middle32, now)
            for block in report.blocks:
                if self.local_ssrcs and block.ssrc not in self.local_ssrcs:
                    continue  # a block about another stream (e.g. our RTX)
                seen = True
                self.downlink.update(block.fraction_lost / 256, block.cumulative_lost, block.highest_seq,
                                     block.jitter / CLOCK_RATE * 1000)
                rtt = quality.rtt_ms(arrival, block.lsr, block.dlsr)
                if rtt is not None:
                    self.rtt_ms = round(rtt, 3)
        if seen:
            if self._estimator is not None:
                self._estimated(*self._estimator.interval())
            self._sample()

    def _remember_sr(self, ssrc: int, lsr: int, at: float) -> None:
        self.remote_sr.pop(ssrc, None)  # newest last
        self.remote_sr[ssrc] = (lsr, at)
        while len(self.remote_sr) > REMOTE_SRS:
            del self.remote_sr[next(iter(self.remote_sr))]

    def last_sr_state(self) -> dict[str, LastSenderReport]:
        """The client's last sender reports for an export: each one's LSR and its age now."""
        now = self.clock()
        return {str(ssrc): LastSenderReport(ntp_middle32=lsr, age=max(now - at, 0.0))
                for ssrc, (lsr, at) in self.remote_sr.items()}

    def continue_last_sr(self, exported: dict[str, LastSenderReport], since_export: float) -> None:
        """An imported call's: the old owner's last SRs, as if they had arrived
        here (their age at the export plus `since_export`), so our first report
        cites one (LSR/DLSR) and the client gets an RTT from it."""
        now = self.clock()
        for ssrc, sr in exported.items():
            self._remember_sr(int(ssrc), sr.ntp_middle32, now - sr.age - since_export)

    def reception_state(self) -> dict[str, Reception]:
        """The client stream's RFC 3550 counts for an export (none before its first RTP)."""
        est = self._estimator
        if est is None or est.base_seq is None:
            return {}
        return {str(est.ssrc): Reception(base_seq=est.base_seq, received=est.received, jitter=est.jitter,
                                         lost_before=self._base_lost, expected_before=self._base_expected)}

    def continue_reception(self, exported: dict[str, Reception], highest: dict[str, tuple[int, int]]) -> None:
        """An imported call's: the old owner's counts of the client's stream go
        on here. `highest` is each received stream's (highest sequence number,
        rollover counter) from the export's RTP state."""
        for ssrc, counts in exported.items():
            if ssrc not in highest:
                continue  # counts without the stream's position: counted anew
            seq, roc = highest[ssrc]
            est = ReceiverEstimator(int(ssrc), cycles=roc)
            est.base_seq, est.max_seq, est.received, est.jitter = counts.base_seq, seq, counts.received, counts.jitter
            if est.expected < 0:
                continue  # inconsistent with the stream's position: counted anew
            est.restart_intervals()  # each reader's next interval starts at the import
            self._estimator = est
            self._base_lost, self._base_expected = counts.lost_before, counts.expected_before

    def _estimated(self, fraction: float, lost: int, highest: int, jitter_ms: float) -> None:
        est = self._estimator
        assert est is not None
        self.uplink.update(fraction, self._base_lost + lost, highest, jitter_ms)
        self.uplink.expected = self._base_expected + est.expected

    def reception_block(self) -> rtcp.ReportBlock | None:
        """The media engine's report block about the client's stream, for the
        report it sends now (rtcp_sender): loss over the interval since its
        last report, and LSR and DLSR citing the client's last sender report.
        None before the client's first RTP."""
        est = self._estimator
        if est is None or est.base_seq is None:
            return None
        fraction, lost, highest, _ = est.interval("report")
        cumulative = self._base_lost + lost
        lsr = dlsr = 0
        if est.ssrc in self.remote_sr:
            lsr, at = self.remote_sr[est.ssrc]
            dlsr = min(max(round((self.clock() - at) * quality.NTP_UNITS), 0), 0xFFFFFFFF)
        return rtcp.ReportBlock(ssrc=est.ssrc, fraction_lost=min(int(fraction * 256), 255),
                                cumulative_lost=min(max(cumulative, -(1 << 23)), (1 << 23) - 1),
                                highest_seq=highest & 0xFFFFFFFF, jitter=int(est.jitter), lsr=lsr, dlsr=dlsr)

    def rtp_received(self, ssrc: int, seq: int, timestamp: int, arrival: float, roc: int = 0) -> None:
        """The media engine's decrypted RTP from the client (``roc``: its stream's
        rollover counter, so a continued stream's extended sequence numbers go on)."""
        if self.first_rtp_received_at is None:
            self.first_rtp_received_at = self.clock()
        est = self._estimator
        if est is None or est.ssrc != ssrc:
            # Counted on from what was measured before (aiortc's reports, or another SSRC).
            # aiortc's reports say no "expected": the engine counts from the hand-over then.
            self._base_expected = self.uplink.expected or 0
            self._base_lost = max(self.uplink.cumulative_lost or 0, 0) if self._base_expected else 0
            est = self._estimator = ReceiverEstimator(ssrc, cycles=roc)
        est.rtp(seq, timestamp, arrival)

    def rtp_sent(self, ssrc: int) -> None:
        self.local_ssrcs.add(ssrc)
        if self.first_rtp_sent_at is None:
            self.first_rtp_sent_at = self.clock()

    def _parse(self, plain: bytes) -> rtcp.Compound | None:
        try:
            return rtcp.parse(plain)
        except rtcp.RtcpError as exc:
            self.malformed += 1
            logger.debug("call %d: RTCP dropped: %s", self.conn_id, exc)
            return None

    def _sample(self) -> None:
        now = self.clock()
        if now - self._last_sample < MOS_INTERVAL:
            return
        values = [quality.mos(self.rtt_ms, d.jitter_ms or 0.0, d.fraction_lost or 0.0)
                  for d in (self.uplink, self.downlink) if d.reports]
        if values:
            self._last_sample = now
            self.mos.add(min(values), now)

    # -- what relayd reads ------------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        est = self._estimator
        if est is not None and est.expected:  # the engine's count is live between reports
            self.uplink.cumulative_lost = self._base_lost + est.lost
            self.uplink.expected = self._base_expected + est.expected
        return {"uplink": self.uplink.to_dict(), "downlink": self.downlink.to_dict(), "rtt_ms": self.rtt_ms,
                "mos": {**self.mos.summary(), "samples": self.mos.samples}, "rtcp_malformed": self.malformed,
                "first_rtp_sent_at": self.first_rtp_sent_at, "first_rtp_received_at": self.first_rtp_received_at}

    def carry_on(self, previous: CallQuality) -> None:
        """The same call moved from aiortc to the media engine here: keep its history."""
        self.uplink, self.downlink, self.rtt_ms, self.mos = (previous.uplink, previous.downlink, previous.rtt_ms,
                                                             previous.mos)
        self.first_rtp_sent_at = previous.first_rtp_sent_at
        self.first_rtp_received_at = previous.first_rtp_received_at
        self.local_ssrcs |= previous.local_ssrcs
        self.remote_sr.update(previous.remote_sr)


@dataclass
class EndedFigures:
    """The figures of calls that ended here, kept ``ttl`` seconds (at most ``keep`` calls)."""

    keep: int = ENDED_KEEP
    ttl: float = ENDED_TTL
    _calls: collections.OrderedDict = field(default_factory=collections.OrderedDict)

    def add(self, conn_id: int, figures: dict[str, Any], reason: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._calls[conn_id] = (now, {**figures, "ended": True, "end_reason": reason})
        self._calls.move_to_end(conn_id)
        while len(self._calls) > self.keep:
            self._calls.popitem(last=False)

    def get(self, conn_id: int, now: float | None = None) -> dict[str, Any] | None:
        now = time.monotonic() if now is None else now
        while self._calls:
            first = next(iter(self._calls.values()))
            if now - first[0] <= self.ttl:
                break
            self._calls.popitem(last=False)
        entry = self._calls.get(conn_id)
        return None if entry is None else entry[1]
