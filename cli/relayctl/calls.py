"""Commands that ask the running relayd (its control socket): status,
sessions, end, migrate, drain, transceivers, reload."""

from __future__ import annotations

import click

from cli.relayctl.app import Fail, Target, json_option, main, pass_target
from cli.relayctl.drain_wait import wait_for_drain
from cli.relayctl.render import emit_json, leg_cells, migration_line, registry_line, table, yes
from manager.protocol.addresses import fmt_ep
from manager.relay.control_client import ControlError


@main.command()
@json_option
@pass_target
def status(t: Target, as_json: bool) -> None:
    """relayd's process, XDP attachments, VIPs and counts."""
    st = t.client().status()
    if as_json:
        emit_json(st)
        return
    c = st["counts"]
    by_state = ", ".join(f"{k} {v}" for k, v in sorted(c["calls_by_state"].items()))
    click.echo(f"relayd pid {st['pid']}, up {st['uptime_s']:.1f} s"
               f"{' (adopted a running fast path)' if st['adopted'] else ''}")
    click.echo(table(None, [
        ["pin dir", st["pin_dir"]],
        ["control", st["control_socket"]],
        ["signaling", st["signaling"]],
        ["metrics", st["metrics"] or "off"],
        ["VIPs", ", ".join(fmt_ep(v["addr"], v["port"]) for v in st["vips"])],
        ["internal", ", ".join(a for a in (st["internal_addr4"], st["internal_addr6"]) if a)],
        ["calls", f"{c['calls']}" + (f" ({by_state})" if by_state else "")],
        ["flows", f"{c['flows']} in the kernel, {c['legs_pending']} pending in the slow path"],
        ["transceivers", f"{c['transceivers']} ({c['transceivers_healthy']} healthy"
                         + (f", {c['transceivers_draining']} draining)" if c.get("transceivers_draining") else ")")],
        ["registry", registry_line(st.get("registry") or {"backend": "memory"})],
    ]))
    click.echo()
    click.echo(table(["INTERFACE", "XDP", "PROG_ID", "OURS", "ADOPTED"],
                     [[i["name"], i["xdp_mode"] or i["error"] or "none", i["prog_id"], yes(i["attached"]),
                       yes(i["adopted"])] for i in st["interfaces"]]))


@main.command()
@json_option
@pass_target
def sessions(t: Target, as_json: bool) -> None:
    """Calls with their client tuples and kernel flows."""
    data = t.client().sessions()
    if as_json:
        emit_json(data)
        return
    rows = []
    for s in data["sessions"]:
        owner = s["owner"] or {}
        head = [s["call_id"], s["conn_id"], s["transceiver"], s["state"],
                " ".join(fmt_ep(owner[a], owner[p]) for a, p in (("addr4", "port4"), ("addr6", "port6"))
                         if owner.get(a)) or None]
        for leg in s["legs"] or [None]:
            rows.append(head + leg_cells(leg))
    for leg in data.get("orphan_legs", []):
        rows.append(["(no call)", (leg.get("kernel") or {}).get("conn_id"), None, None, None] + leg_cells(leg))
    if not rows:
        click.echo("no sessions")
        return
    click.echo(table(["CALL_ID", "CONN_ID", "TX", "STATE", "OWNER", "CLIENT", "FLOW_PORT", "INSTALLED",
                      "SETUP_MS", "PKTS_IN", "PKTS_OUT", "IDLE_S"], rows))


@main.command()
@click.argument("call_id")
@json_option
@pass_target
def end(t: Target, call_id: str, as_json: bool) -> None:
    """End a call (its kernel flows go at once; its transceiver is told)."""
    try:
        res = t.client().end_session(call_id)
    except ControlError as exc:
        if exc.status == 404:
            raise Fail(f"unknown session {call_id!r} (see `relayctl sessions`)") from None
        raise
    if as_json:
        emit_json(res)
        return
    call = res["ended"]
    click.echo(f"ended call {call['call_id']} (conn_id {call['conn_id']}, transceiver {call['transceiver_id']})")
    if res.get("transceiver_warning"):
        click.echo(f"warning: {res['transceiver_warning']}", err=True)


@main.command()
@click.argument("call_id")
@click.option("--to", "target", type=click.IntRange(1, 65535), required=True,
              help="Transceiver id to move the call to.")
@json_option
@pass_target
def migrate(t: Target, call_id: str, target: int, as_json: bool) -> None:
    """Move a live call to another transceiver, without renegotiation."""
    res = t.client().request("POST", f"/sessions/{call_id}/migrate", {"to": target})
    if as_json:
        emit_json(res)
        return
    click.echo(migration_line(res))


@main.command()
@click.argument("transceiver_id", type=click.IntRange(1, 65535))
@click.option("--undo", is_flag=True, help="Take new calls on this transceiver again.")
@click.option("--wait", is_flag=True, help="Keep moving until none is left or the deadline, showing progress; "
              "the calls left at the deadline end (reason drain-deadline).")
@click.option("--deadline", type=click.FloatRange(0, 3600, min_open=True), default=25.0, show_default=True,
              help="Seconds a --wait drain may take.")
@json_option
@pass_target
def drain(t: Target, transceiver_id: int, undo: bool, wait: bool, deadline: float, as_json: bool) -> None:
    """Stop new placements on a transceiver and move every call away from it."""
    if wait and not undo:
        wait_for_drain(t, transceiver_id, deadline, as_json)
        return
    if undo:
        res = t.client().request("POST", f"/transceivers/{transceiver_id}/undrain", {})
        if as_json:
            emit_json(res)
        else:
            click.echo(f"transceiver {transceiver_id} takes new calls again")
        return
    res = t.client().request("POST", f"/transceivers/{transceiver_id}/drain", {})
    if as_json:
        emit_json(res)
    else:
        moved = sum(1 for r in res["results"] if r["outcome"] == "moved")
        click.echo(f"transceiver {transceiver_id} drained: {moved} of {len(res['results'])} calls moved; "
                   "it takes no new calls (`relayctl drain --undo` to reopen)")
        for r in res["results"]:
            click.echo("  " + migration_line(r))
    if any(r["outcome"] != "moved" for r in res["results"]):
        raise Fail(f"{sum(1 for r in res['results'] if r['outcome'] != 'moved')} calls could not be moved")


@main.command()
@json_option
@pass_target
def transceivers(t: Target, as_json: bool) -> None:
    """Registered transceivers, their load and health."""
    data = t.client().transceivers()
    if as_json:
        emit_json(data)
        return
    if not data["transceivers"]:
        click.echo("no transceivers registered")
        return
    click.echo(table(["ID", "CONTROL_URL", "CALLS", "CAPACITY", "HEALTHY", "DRAINING", "HEARTBEAT_AGE_S"],
                     [[x["id"], x["control_url"], x["calls"], x["capacity"], yes(x["healthy"]), yes(x["draining"]),
                       x.get("heartbeat_age_s")] for x in data["transceivers"]]))


@main.command()
@json_option
@pass_target
def reload(t: Target, as_json: bool) -> None:
    """Have relayd re-read its config file (as SIGHUP does) and say what changed.
    A field that needs a restart, or a file that does not validate, is refused
    and the running configuration stays."""
    result = t.client().reload()  # a refusal: ControlError, one line and exit status 1
    if as_json:
        emit_json(result)
        return
    for line in result["changed"] or ["nothing changed"]:
        click.echo(line)
