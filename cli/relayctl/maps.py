"""Commands on the pinned BPF maps, which work while relayd is down or
restarting: flows, stats, expire."""

from __future__ import annotations

import click

from cli.relayctl.app import Target, json_option, main, pass_target
from cli.relayctl.render import emit_json, table
from manager.protocol.addresses import fmt_ep
from manager.relay.control_client import ControlError, fastpath_view


@main.command()
@json_option
@pass_target
def flows(t: Target, as_json: bool) -> None:
    """Kernel flows, read from the pinned maps (works while relayd is down)."""
    dp = t.datapath()
    try:
        rows = []
        for f in dp.flows():
            d = f.to_dict()
            found = dp.get_owner(f.conn_id)
            if found is None:
                d["owner"], d["owner_generation"] = None, None
            else:
                o, gen = found
                d["owner"] = {"addr4": o.addr4, "port4": o.port4, "addr6": o.addr6, "port6": o.port6}
                d["owner_generation"] = gen
            rows.append(d)
    finally:
        dp.close()
    rows.sort(key=lambda d: (d["conn_id"], d["client"]))
    if as_json:
        emit_json({"pin_dir": str(t.pin_dir), "flows": rows})
        return
    if not rows:
        click.echo(f"no flows in {t.pin_dir}")
        return

    def owner(d: dict) -> str | None:
        o = d["owner"]
        if o is None:
            return None
        ep = (o["addr6"], o["port6"]) if d["client"].startswith("[") else (o["addr4"], o["port4"])
        return fmt_ep(*ep) if ep[0] else None

    click.echo(table(["CLIENT", "VIP", "CONN_ID", "FLOW_PORT", "OWNER", "GEN", "PKTS_IN", "BYTES_IN",
                      "PKTS_OUT", "BYTES_OUT", "IDLE_S"],
                     [[d["client"], d["vip"], d["conn_id"], d["flow_port"], owner(d), d["owner_generation"],
                       d["packets_in"], d["bytes_in"], d["packets_out"], d["bytes_out"], d["idle_s"]] for d in rows]))


@main.command()
@json_option
@pass_target
def stats(t: Target, as_json: bool) -> None:
    """Fast-path counters by verdict/reason (pinned maps), and slow-path
    counters when relayd answers."""
    dp = t.datapath()
    try:
        fast = fastpath_view(dp.counters())
    finally:
        dp.close()
    slow, hops, relayd_error = None, None, None
    try:
        answer = t.client().stats()
        slow, hops = answer["slowpath"], answer.get("next_hops")
    except ControlError as exc:
        relayd_error = str(exc)
    if as_json:
        emit_json({"pin_dir": str(t.pin_dir), "fastpath": fast, "slowpath": slow, "next_hops": hops,
                   "relayd_running": relayd_error is None, "relayd_error": relayd_error})
        return
    click.echo(f"fast path ({t.pin_dir})")
    click.echo(table(["VERDICT", "REASON", "CLASS", "PACKETS", "BYTES"],
                     [[r["verdict"], r["reason"], r["class"], r["packets"], r["bytes"]]
                      for r in fast["counters"] if r["packets"]] or [["-", "(no packets)", "", 0, 0]]))
    click.echo("totals: " + ", ".join(f"{v} {d['packets']} packets" for v, d in sorted(fast["by_verdict"].items())))
    click.echo()
    if slow is None:
        click.echo(f"slow path: relayd not running ({relayd_error})")
        return
    setup = slow["flow_setup"]
    mean = f", mean set-up {setup['sum_s'] / setup['count'] * 1000:.1f} ms" if setup["count"] else ""
    click.echo(f"slow path: {slow['packets']['in']} packets in / {slow['packets']['out']} out "
               f"({slow['bytes']['in']} / {slow['bytes']['out']} bytes), legs {slow['legs']['installed']} installed "
               f"/ {slow['legs']['pending']} pending, queue {slow['queue_bytes']} bytes{mean}")
    if slow["events"]:
        click.echo(table(["EVENT", "COUNT"], [[k, v] for k, v in sorted(slow["events"].items())]))
    if hops:
        click.echo("next hops kept resolved: " + ", ".join(f"{k} {v}" for k, v in hops.items()))


@main.command()
@click.option("--idle", "idle_s", type=click.FloatRange(min=0), default=None,
              help="Remove flows idle this many seconds (default: relayd's slowpath.idle_timeout).")
@json_option
@pass_target
def expire(t: Target, idle_s: float | None, as_json: bool) -> None:
    """Remove idle flows: through relayd when it runs, else on the pinned maps."""
    try:
        res = {"via": "relayd", **t.client().expire(idle_s)}
    except ControlError as exc:
        if exc.status:  # relayd answered: its answer stands
            raise
        res = {"via": "maps", **expire_on_maps(t, t.idle_timeout if idle_s is None else idle_s)}
    if as_json:
        emit_json(res)
        return
    flows_ = res["flows"]
    click.echo(f"expired {len(flows_)} flow(s) idle > {res['idle_s']:g} s (via {res['via']})")
    if flows_:
        click.echo(table(["CLIENT", "VIP", "CONN_ID", "FLOW_PORT", "IDLE_S"],
                         [[f["client"], f["vip"], f["conn_id"], f["flow_port"], f["idle_s"]] for f in flows_]))
    for c in res.get("calls", []):
        click.echo(f"ended call {c['call_id']} (conn_id {c['conn_id']}): {c['reason']}")
    for conn_id in res.get("owners_removed", []):
        click.echo(f"removed owner entry of conn_id {conn_id}")


def expire_on_maps(t: Target, idle_s: float) -> dict:
    """relayd is down: expire on the maps, and drop the owner entries of
    connections whose last flow went (as relayd ends such calls)."""
    dp = t.datapath()
    try:
        expired = dp.expire_idle(idle_s)
        left = {f.conn_id for f in dp.flows()}
        removed = sorted({f.conn_id for f in expired} - left)
        for conn_id in removed:
            dp.remove_owner(conn_id)
    finally:
        dp.close()
    return {"idle_s": idle_s, "flows": [f.to_dict() for f in expired], "calls": [], "owners_removed": removed}
