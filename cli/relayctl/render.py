"""relayctl's output: JSON, aligned tables and the one-line summaries the
commands print. Formatting only: nothing here talks to relayd or the kernel."""

from __future__ import annotations

import json
from typing import Any

import click


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def table(headers: list[str] | None, rows: list[list[Any]]) -> str:
    """Left-aligned columns, two spaces apart; None prints as '-'. Without
    headers: a key/value listing."""
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    lines = ([headers] if headers else []) + cells
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))] if lines else []
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in lines)


def yes(v: bool) -> str:
    return "yes" if v else "no"


def ms(v: float | None) -> str | None:
    return None if v is None else f"{v:.1f}"


def leg_cells(leg: dict | None) -> list[Any]:
    if leg is None:
        return [None] * 7
    k = leg.get("kernel") or {}
    return [leg["client"], leg["flow_port"], yes(leg["installed"]), ms(leg["setup_ms"]),
            k.get("packets_in"), k.get("packets_out"), k.get("idle_s")]


def migration_line(res: dict) -> str:
    if res["outcome"] != "moved":
        return f"call {res['call_id']}: not moved from transceiver {res['source']}: {res['error']}"
    first = ms(res["switch_s"] * 1000) if res["switch_s"] is not None else None
    return (f"call {res['call_id']} moved from transceiver {res['source']} to {res['target']}: "
            f"flip after {ms(res['flip_s'] * 1000)} ms, first packet from the new owner after "
            f"{first if first is not None else '(none yet)'} ms")


def registry_line(reg: dict) -> str:
    if reg["backend"] != "redis":
        return "in memory (this relay alone)"
    state = "connected" if reg["available"] else f"UNAVAILABLE ({reg.get('last_error') or 'connecting'})"
    others = ", ".join(reg.get("relays") or []) or "none seen"
    return (f"Redis as {reg['relay_id']}: {state}; other relays: {others}; {reg['queued']} changes queued"
            + (f"; propagation p50 {reg['propagation_ms']['p50']} ms" if reg.get("propagation_ms") else ""))


def demo_summary(r: dict) -> str:
    """What `relayctl demo` prints: where the call's packets went, and the verdict."""
    c = r["call"]
    fp, sp = r["fastpath"], r["slowpath"]
    by = fp["by_reason"]
    states = " → ".join(dict.fromkeys(c["connection_states"]))
    rows = [
        ["call", ("connected" if c["connected"] else "NOT connected")
         + (f" in {c['connected_after_s'] * 1000:.0f} ms" if c["connected_after_s"] is not None else "")
         + f" ({states})" + (f"; error: {c['error']}" if c["error"] else "")],
        ["media", f"RTP sent {c['rtp_packets_sent']}, received {c['rtp_packets_received']}, "
                  f"lost {c['rtp_packets_lost']}; {c['audio_frames_received']} audio frames back"],
        ["fast path (XDP)", f"{fp['forwarded']} packets: SRTP/SRTCP {by.get('fwd_in_rtp', 0)} in / "
                            f"{by.get('fwd_out_rtp', 0)} out, DTLS {by.get('fwd_in_dtls', 0)} / "
                            f"{by.get('fwd_out_dtls', 0)}, STUN {by.get('fwd_in_stun', 0)} / "
                            f"{by.get('fwd_out_stun', 0)}"],
        ["slow path", f"{sp['packets']} packets (call set-up), {sp['flows_installed']} flows installed"
                      + (f", set-up {sp['setup_ms_mean']:.1f} ms mean" if sp["setup_ms_mean"] is not None else "")],
        ["fast-path share", f"{r['fast_share'] * 100:.2f}% of relayed packets" if r["fast_share"] is not None else "-"],
        ["round trip", f"data channel p50 {c['dc_rtt_ms_p50']} ms ({c['dc_echoed']}/{c['dc_sent']} echoed), "
                       f"RTCP RTT {c['rtcp_rtt_ms']} ms"],
        ["echo", ("440 Hz tone detected" if r["tone_detected"] else "tone NOT detected")
         + f" in the returned audio (tone/off-tone power {c['tone_ratio']})"],
        ["this machine", host_line(r.get("host") or {})],
        ["cleanup", "nothing left behind" if not r["left_behind"] else "LEFT: " + ", ".join(r["left_behind"])],
    ]
    return table(None, rows) + "\n" + ("demo OK" if r["ok"] else "demo FAILED")


def host_line(h: dict) -> str:
    if not h:
        return "-"
    if not h.get("page"):
        return f"page NOT reachable at {h.get('url')}: {h.get('error')}"
    return (f"page at {h['url']}; a call from this machine through it "
            + ("connected and echoed" if h.get("call") else f"FAILED ({h.get('call_error')})"))


def _pct(v: float | None) -> str | None:
    return None if v is None else f"{v * 100:.2f}"


def record_row(r) -> list[Any]:
    """One call record (manager.protocol.call_record.CallRecord) as a table row."""
    from datetime import datetime

    return [datetime.fromtimestamp(r.ended_at).isoformat(timespec="seconds"), r.call_id, r.end_reason,
            f"{r.ended_at - r.created_at:.1f}", ",".join(map(str, r.transceivers)) or None, len(r.moves) or None,
            r.mos.min, _pct(r.path.uplink.loss_fraction), _pct(r.path.downlink.loss_fraction), ms(r.path.rtt_ms),
            ms(r.connect_ms)]


def _stream(s) -> str:
    parts = [f"{s.packets} pkts", f"{s.bytes} B"]
    if s.loss_fraction is not None:
        parts.append(f"loss {s.loss_fraction * 100:.2f} %")
    if s.lost is not None:
        parts.append(f"lost {s.lost}")
    if s.jitter_ms is not None:
        parts.append(f"jitter {s.jitter_ms:.1f} ms")
    return ", ".join(parts)


def _or_dash(v: Any) -> Any:
    return "-" if v is None else v


def record_lines(r) -> list[str]:
    """A call record as a few labelled lines (`relayctl calls show`)."""
    c = r.client
    lines = [f"client: {c.family or '-'} {c.transport or '-'} {c.address or '-'}",
             f"transceivers: {', '.join(map(str, r.transceivers)) or '-'}; relays: {', '.join(r.relays) or '-'}",
             f"connect: {ms(r.connect_ms) or '-'} ms, first audio: {ms(r.first_audio_ms) or '-'} ms",
             f"MOS: min {_or_dash(r.mos.min)}, avg {_or_dash(r.mos.avg)}"]
    for name, hop in (("client-relay", r.client_relay), ("relay-transceiver", r.relay_transceiver),
                      ("path", r.path)):
        rtt = f", RTT {hop.rtt_ms:.1f} ms" if hop.rtt_ms is not None else ""
        lines.append(f"{name}: up {_stream(hop.uplink)}; down {_stream(hop.downlink)}{rtt}")
    for m in r.moves:
        src = m.from_transceiver if m.from_transceiver is not None else m.from_relay
        dst = m.to_transceiver if m.to_transceiver is not None else m.to_relay
        lines.append(f"{m.kind}: {src} -> {dst}, gap {ms(m.gap_ms) or '-'} ms")
    return lines
