"""A call's record from its account: the relay's counters joined with the transceivers' figures.

- ``path``: the whole path client ⇄ transceiver, from the RTCP figures of each
  transceiver the call lived on (rtcp_stats): the uplink as the transceiver
  measured the client's RTP, the downlink as the client's receiver reports
  say it, the last round-trip time. Losses of several transceivers are
  weighted by their reports; jitter is the worst seen.
- ``client_relay``: the kernel's packets and bytes of the call's flows, each
  way (uplink: from the client; downlink: to it). Where a flow's counters
  carry RTP sequence accounting (``expected``, ``lost`` and jitter each way,
  the XDP per-flow accounting, :func:`kernel_stream`), the relay measures the
  hop before it each way: client → relay (uplink, on ``client_relay``) and
  transceiver → relay (downlink, on ``relay_transceiver``); the rest of the
  path's loss that way is on the other hop: ``1 - (1 - path) / (1 - measured)``
  (losses on two hops in a row compound).
- MOS: the lowest of any transceiver's samples and when, the average over
  all samples.
"""

from __future__ import annotations

from typing import Any

from manager.protocol.call_record import (
    CallRecord,
    ClientInfo,
    HopFigures,
    MosFigures,
    Move,
    StreamFigures,
)
from manager.protocol.call_record import anonymise as anonymise_address

SEQ_SPAN = 1 << 16


def kernel_stream(counts: list[int], direction: str) -> tuple[StreamFigures, StreamFigures | None]:
    """One direction of one flow's kernel counters (call_journal): [packets in,
    bytes in, packets out, bytes out, then, where the kernel accounts RTP
    sequence numbers, expected, lost and jitter (µs) in, the same out, then
    (:func:`sequence_part`) the stream's SSRC, highest extended sequence and
    packets received in, the same out, and when the flow was first seen].
    Returns (packets and bytes, the sequence accounting or None)."""
    up = direction == "uplink"
    fig = StreamFigures(packets=counts[0 if up else 2], bytes=counts[1 if up else 3])
    at = 4 if up else 7
    if len(counts) < at + 3 or not counts[at]:
        return fig, None
    return fig, StreamFigures(expected=counts[at], lost=counts[at + 1], jitter_ms=counts[at + 2] / 1000)


def pack_counts(up: Any, down: Any, seen: float) -> tuple:
    """A flow's counts in the layout :func:`kernel_stream` and :func:`sequence_part`
    read, from its two directions (kernel/media.py DirectionMedia, or an ICE-TCP
    leg's slowpath/stream_media.py RtpCount: packets, bytes, expected, lost,
    jitter_ms, ssrc, highest_seq, received) and when it was first seen."""
    return (up.packets, up.bytes, down.packets, down.bytes, up.expected, up.lost,
            round(up.jitter_ms * 1000), down.expected, down.lost, round(down.jitter_ms * 1000),
            up.ssrc, up.highest_seq, up.received, down.ssrc, down.highest_seq, down.received, seen)


def sequence_part(counts: list[int], direction: str) -> tuple[float, int, int, int, int, float] | None:
    """(first seen, SSRC, first and highest extended sequence, received, jitter
    ms) of one direction of one flow; None where the counters do not say."""
    if len(counts) < 17:
        return None
    up = direction == "uplink"
    at, ex = (10, 4) if up else (13, 7)
    ssrc, highest, received = counts[at:at + 3]
    if not ssrc or not counts[ex]:
        return None
    return counts[16], ssrc, highest - counts[ex] + 1, highest, received, counts[ex + 2] / 1000


def merge_parts(parts: list[tuple]) -> StreamFigures:
    """One RTP stream carried by several flows of a call (a client that moved
    between its pairs, a NAT rebinding): the flows' sequence ranges put on one
    axis (each flow's first sequence unwrapped next to the previous flow's
    highest, in the order they were first seen), expected over the whole range,
    received summed. Per flow, the packets that went by another flow would
    count as lost."""
    lo = hi = None
    received = 0
    jitter = 0.0
    for _, _, first, highest, got, jit in sorted(parts):
        if hi is None:
            shift = 0
        else:  # the wrap count that puts this flow's start nearest the stream so far
            shift = round((hi - first) / SEQ_SPAN) * SEQ_SPAN
        lo = first + shift if lo is None else min(lo, first + shift)
        hi = highest + shift if hi is None else max(hi, highest + shift)
        received += got
        jitter = max(jitter, jit)
    expected = hi - lo + 1
    return StreamFigures(expected=expected, lost=expected - received, jitter_ms=jitter)


def _add(total: StreamFigures, part: StreamFigures) -> None:
    total.packets += part.packets
    total.bytes += part.bytes
    if part.expected is not None:
        total.expected = (total.expected or 0) + part.expected
        total.lost = (total.lost or 0) + (part.lost or 0)
    if part.jitter_ms is not None:
        total.jitter_ms = max(total.jitter_ms or 0.0, part.jitter_ms)


def _path_direction(figures: list[dict], name: str) -> StreamFigures:
    out = StreamFigures()
    weighted = reports = 0.0
    for f in figures:
        d = f.get(name) or {}
        n = d.get("reports") or 0
        if d.get("loss_fraction") is not None and n:
            weighted += d["loss_fraction"] * n
            reports += n
        if d.get("cumulative_lost") is not None:
            out.lost = (out.lost or 0) + max(d["cumulative_lost"], 0)
        if d.get("expected"):
            out.expected = (out.expected or 0) + d["expected"]
        if d.get("jitter_ms") is not None:
            out.jitter_ms = max(out.jitter_ms or 0.0, d["jitter_ms"])
    if reports:
        out.loss_fraction = round(weighted / reports, 5)
    return out


def _remaining(path: float | None, first_hop: float | None) -> float | None:
    if path is None or first_hop is None or first_hop >= 1:
        return None
    return round(max(0.0, 1 - (1 - path) / (1 - first_hop)), 5)


def _mos(figures: list[dict]) -> MosFigures:
    out = MosFigures()
    total = samples = 0.0
    for f in figures:
        m = f.get("mos") or {}
        if m.get("min") is not None and (out.min is None or m["min"] < out.min):
            out.min, out.min_at = m["min"], m.get("min_at")
        n = m.get("samples") or 0
        if m.get("avg") is not None and n:
            total += m["avg"] * n
            samples += n
    if samples:
        out.avg = round(total / samples, 2)
    return out


def _first(figures: list[dict], key: str) -> float | None:
    values = [f[key] for f in figures if f.get(key) is not None]
    return min(values) if values else None


def build_record(acc: Any, reason: str, ended_at: float, *, anonymise: str = "full") -> CallRecord:
    """The record of an account (call_journal.Account) closed at `ended_at` for `reason`."""
    figures = [acc.figures[str(t)] for t in acc.transceivers if str(t) in acc.figures]
    record = CallRecord(call_id=acc.call_id, conn_id=acc.conn_id, created_at=acc.created_at, ended_at=ended_at,
                        end_reason=reason, transceivers=list(acc.transceivers), relays=list(acc.relays),
                        moves=[Move(**m) for m in acc.moves])
    client = acc.client or {}
    record.client = ClientInfo(family=client.get("family"), transport=client.get("transport"),
                               address=anonymise_address(client.get("address"), anonymise))
    hop, after = HopFigures(), HopFigures()  # client ⇄ relay, relay ⇄ transceiver
    measured = {"uplink": hop, "downlink": after}
    streams: dict[tuple[str, int], list[tuple]] = {}
    for counts in acc.flows.values():
        for direction, measured_hop in measured.items():
            total, seq = kernel_stream(counts, direction)
            _add(getattr(hop, direction), total)
            part = sequence_part(counts, direction)
            if part is not None:
                streams.setdefault((direction, part[1]), []).append(part)
            elif seq is not None:
                _add(getattr(measured_hop, direction), seq)
    for (direction, _), parts in streams.items():
        _add(getattr(measured[direction], direction), merge_parts(parts))
    for stream in (hop.uplink, after.downlink):
        if stream.expected:
            stream.loss_fraction = round(max(stream.lost or 0, 0) / stream.expected, 5)
    record.client_relay, record.relay_transceiver = hop, after
    path = HopFigures(uplink=_path_direction(figures, "uplink"), downlink=_path_direction(figures, "downlink"))
    rtts = [f["rtt_ms"] for f in figures if f.get("rtt_ms") is not None]
    path.rtt_ms = rtts[-1] if rtts else None
    # The relay timed its hop to the transceiver on an ICE check it forwarded;
    # the client's hop is the rest of the path's (RTTs of hops in a row add).
    after.rtt_ms = acc.owner_rtt_ms
    if path.rtt_ms is not None and after.rtt_ms is not None:
        hop.rtt_ms = round(max(path.rtt_ms - after.rtt_ms, 0.0), 3)
    record.path = path
    after.uplink.loss_fraction = _remaining(path.uplink.loss_fraction, hop.uplink.loss_fraction)
    hop.downlink.loss_fraction = _remaining(path.downlink.loss_fraction, after.downlink.loss_fraction)
    record.mos = _mos(figures)
    record.connected_at = _first(figures, "connected_at")
    if record.connected_at is not None:
        record.connect_ms = round((record.connected_at - acc.created_at) * 1000, 3)
    first_audio = _first(figures, "first_rtp_sent_at")
    if first_audio is not None:
        record.first_audio_ms = round((first_audio - acc.created_at) * 1000, 3)
    return record
