"""relayctl: operate splitrelay (click over manager APIs).

Commands that need the running relayd talk to its control socket
(manager.relay.control_client); `flows`, `stats` and `expire` read the pinned BPF maps
directly, so they work while relayd is down or restarting. `lab` and `demo`
run the whole system in network namespaces (manager.lab, manager.demo).

Where things are comes from --config (or SPLITRELAY_CONFIG), a lab's config
(--lab PREFIX), or --pin-dir / --socket; the built-in defaults otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from manager.protocol.addresses import fmt_ep
from manager.protocol.api import one_line
from manager.relay.config import ConfigError, DatapathConfig, RelaydConfig, SlowPathConfig, load_config
from manager.relay.control_client import ControlClient, ControlError, fastpath_view

# --- errors and output ---------------------------------------------------------------------

class Fail(click.ClickException):
    """A user-facing failure: one line on stderr, exit status 1."""

    def show(self, file=None) -> None:
        click.echo(f"relayctl: {self.format_message()}", err=True)


def _known_errors() -> tuple[type[BaseException], ...]:
    from manager.lab.netns import LabError
    from manager.lab.services import ServicesError
    from manager.relay.kernel.datapath import DatapathError

    return (ControlError, ConfigError, DatapathError, LabError, ServicesError, OSError)


class _Group(click.Group):
    """Turns the manager's operator-facing errors into one line + exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            msg = "; ".join(str(exc).splitlines())
            path = ctx.obj.config_path if isinstance(ctx.obj, Target) else None
            if path and not msg.startswith(str(path)):
                msg = f"{path}: {msg}"
            raise Fail(f"invalid configuration: {msg}") from None
        except _known_errors() as exc:
            raise Fail(one_line(exc, limit=1000) or type(exc).__name__) from None


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise Fail(f"{what} needs root: run relayctl as root")


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


def _yes(v: bool) -> str:
    return "yes" if v else "no"


def _ms(v: float | None) -> str | None:
    return None if v is None else f"{v:.1f}"


# --- where relayd and its maps are -----------------------------------------------------------

@dataclass
class Target:
    """Resolved lazily: `lab` and `demo` need no relayd configuration at all."""

    config_path: str | None
    lab: str | None
    pin_dir_opt: str | None
    socket_opt: str | None
    _cfg: RelaydConfig | None = field(default=None, repr=False)
    _loaded: bool = False

    def config(self) -> RelaydConfig | None:
        if not self._loaded:
            path = self.config_path
            if self.lab and not path:
                from manager.lab.model import Lab

                Lab.plan(self.lab, 1)  # validates the prefix: it names a path
                from manager.lab.manage import lab_workdir

                path = self.config_path = str(lab_workdir(self.lab) / "relayd.toml")
                if not Path(path).exists():
                    raise Fail(f"no relayd config for lab {self.lab!r} at {path} (started with `relayctl lab up`?)")
            self._cfg = load_config(path) if path else None
            self._loaded = True
        return self._cfg

    @property
    def socket(self) -> Path:
        if self.socket_opt:
            return Path(self.socket_opt)
        cfg = self.config()
        return Path(cfg.control_socket) if cfg else RelaydConfig.model_fields["control_socket"].default

    @property
    def pin_dir(self) -> Path:
        if self.pin_dir_opt:
            return Path(self.pin_dir_opt)
        cfg = self.config()
        return Path(cfg.datapath.pin_dir) if cfg else DatapathConfig.model_fields["pin_dir"].default

    @property
    def idle_timeout(self) -> float:
        cfg = self.config()
        return cfg.slowpath.idle_timeout if cfg else SlowPathConfig().idle_timeout

    def client(self) -> ControlClient:
        return ControlClient(self.socket)

    def datapath(self):
        """The pinned maps, opened read/write without loading anything."""
        from pydantic import ValidationError

        from manager.relay.kernel.datapath import Datapath

        need_root("reading the pinned maps")
        try:
            dcfg = DatapathConfig(pin_dir=self.pin_dir)
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise Fail(f"pin dir {self.pin_dir}: {reason}") from None
        dp = Datapath(dcfg)
        dp.open_maps()
        return dp


pass_target = click.make_pass_decorator(Target)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable keys).")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, readable=False),
              envvar="SPLITRELAY_CONFIG",
              help="relayd's config file: where its pinned maps and control socket are.")
@click.option("--lab", "lab", metavar="PREFIX", help="Use the relayd of a lab started by `relayctl lab up`.")
@click.option("--pin-dir", type=click.Path(file_okay=False, readable=False), help="bpffs directory of the pinned maps.")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False, readable=False),
              help="relayd's control socket.")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, lab: str | None, pin_dir: str | None,
         socket_path: str | None) -> None:
    """Inspect and operate the splitrelay relay (relayd and its XDP fast path)."""
    ctx.obj = Target(config_path, lab, pin_dir, socket_path)


# --- relayd (control socket) ------------------------------------------------------------------

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
        ["transceivers", f"{c['transceivers']} ({c['transceivers_healthy']} healthy)"],
        ["registry", _registry_line(st.get("registry") or {"backend": "memory"})],
    ]))
    click.echo()
    click.echo(table(["INTERFACE", "XDP", "PROG_ID", "OURS", "ADOPTED"],
                     [[i["name"], i["xdp_mode"] or i["error"] or "none", i["prog_id"], _yes(i["attached"]),
                       _yes(i["adopted"])] for i in st["interfaces"]]))


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
            rows.append(head + _leg_cells(leg))
    for leg in data.get("orphan_legs", []):
        rows.append(["(no call)", (leg.get("kernel") or {}).get("conn_id"), None, None, None] + _leg_cells(leg))
    if not rows:
        click.echo("no sessions")
        return
    click.echo(table(["CALL_ID", "CONN_ID", "TX", "STATE", "OWNER", "CLIENT", "FLOW_PORT", "INSTALLED",
                      "SETUP_MS", "PKTS_IN", "PKTS_OUT", "IDLE_S"], rows))


def _leg_cells(leg: dict | None) -> list[Any]:
    if leg is None:
        return [None] * 7
    k = leg.get("kernel") or {}
    return [leg["client"], leg["flow_port"], _yes(leg["installed"]), _ms(leg["setup_ms"]),
            k.get("packets_in"), k.get("packets_out"), k.get("idle_s")]


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
    click.echo(_migration_line(res))


def _migration_line(res: dict) -> str:
    if res["outcome"] != "moved":
        return f"call {res['call_id']}: not moved from transceiver {res['source']}: {res['error']}"
    first = _ms(res["switch_s"] * 1000) if res["switch_s"] is not None else None
    return (f"call {res['call_id']} moved from transceiver {res['source']} to {res['target']}: "
            f"flip after {_ms(res['flip_s'] * 1000)} ms, first packet from the new owner after "
            f"{first if first is not None else '(none yet)'} ms")


@main.command()
@click.argument("transceiver_id", type=click.IntRange(1, 65535))
@click.option("--undo", is_flag=True, help="Take new calls on this transceiver again.")
@json_option
@pass_target
def drain(t: Target, transceiver_id: int, undo: bool, as_json: bool) -> None:
    """Stop new placements on a transceiver and move every call away from it."""
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
            click.echo("  " + _migration_line(r))
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
                     [[x["id"], x["control_url"], x["calls"], x["capacity"], _yes(x["healthy"]), _yes(x["draining"]),
                       x.get("heartbeat_age_s")] for x in data["transceivers"]]))


# --- pinned maps ---------------------------------------------------------------------------------

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
    slow, relayd_error = None, None
    try:
        slow = t.client().stats()["slowpath"]
    except ControlError as exc:
        relayd_error = str(exc)
    if as_json:
        emit_json({"pin_dir": str(t.pin_dir), "fastpath": fast, "slowpath": slow,
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


# --- keys and certificates ------------------------------------------------------------------

DEFAULT_PKI_DIR = "/etc/splitrelay/pki"


@main.group()
def pki() -> None:
    """The private CA for mutual TLS between relayd and transceivers."""


@pki.command("init")
@click.option("--dir", "pki_dir", type=click.Path(file_okay=False), default=DEFAULT_PKI_DIR, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing CA (every certificate it issued stops working).")
@json_option
def pki_init(pki_dir: str, force: bool, as_json: bool) -> None:
    """Create the CA (ca.pem, ca.key 0600) and relayd's certificate."""
    from manager import pki as pkimod

    existed = (Path(pki_dir) / "ca.pem").exists() and not force
    ca = pkimod.init_ca(pki_dir, force=force)
    relayd = pkimod.issue(pki_dir, pkimod.relayd_name())
    out = {"ca": str(ca), "ca_reused": existed, "relayd_cert": str(relayd.cert), "relayd_key": str(relayd.key)}
    if as_json:
        emit_json(out)
        return
    click.echo(f"CA {'kept' if existed else 'created'}: {ca}")
    click.echo(f"relayd: {relayd.cert} (key {relayd.key}, mode 0600)")


@pki.command("issue")
@click.option("--dir", "pki_dir", type=click.Path(file_okay=False), default=DEFAULT_PKI_DIR, show_default=True)
@click.option("--transceiver", "transceiver_id", type=click.IntRange(1, 65535), default=None,
              help="Issue transceiver N's certificate (its identity: it can register only as N).")
@click.option("--relayd", "for_relayd", is_flag=True, help="Issue relayd's certificate again.")
@json_option
def pki_issue(pki_dir: str, transceiver_id: int | None, for_relayd: bool, as_json: bool) -> None:
    """Issue (or renew) a certificate from the CA in --dir."""
    from manager import pki as pkimod

    if (transceiver_id is None) == (not for_relayd):
        raise Fail("give exactly one of --transceiver N and --relayd")
    name = pkimod.relayd_name() if for_relayd else pkimod.transceiver_name(transceiver_id)
    try:
        paths = pkimod.issue(pki_dir, name)
    except pkimod.PkiError as exc:
        raise Fail(str(exc)) from None
    out = {"name": name, "cert": str(paths.cert), "key": str(paths.key), "ca": str(paths.ca)}
    if as_json:
        emit_json(out)
        return
    click.echo(f"{name}: {paths.cert} (key {paths.key}, mode 0600); trust {paths.ca}")


@main.command()
@click.option("--ttl", type=click.FloatRange(1, 86400), default=300.0, show_default=True,
              help="Seconds the token is valid.")
@click.option("--subject", default="", help="Who the token is for (shown in logs).")
@click.option("--key-file", type=click.Path(dir_okay=False), default=None,
              help="The token key (hex, mode 0600); default: client_auth.token_key_file of the config.")
@json_option
@pass_target
def token(t: Target, ttl: float, subject: str, key_file: str | None, as_json: bool) -> None:
    """Mint a short-lived client token (for `Authorization: Bearer`)."""
    from manager.pki import read_secret_file
    from manager.protocol.client_auth import mint_token

    if key_file is None:
        cfg = t.config()
        if cfg is None or cfg.client_auth.token_key_file is None:
            raise Fail("no token key: give --key-file, or a config whose client_auth.token_key_file is set")
        key_file = str(cfg.client_auth.token_key_file)
    try:
        key = bytes.fromhex(read_secret_file(Path(key_file)).decode("ascii", "replace").strip())
        tok = mint_token(key, ttl=ttl, subject=subject)
    except ValueError as exc:
        raise Fail(str(exc) if key_file in str(exc) else f"{key_file}: {exc}") from None
    if as_json:
        emit_json({"token": tok, "ttl_s": ttl, "subject": subject})
    else:
        click.echo(tok)


def _registry_line(reg: dict) -> str:
    if reg["backend"] != "redis":
        return "in memory (this relay alone)"
    state = "connected" if reg["available"] else f"UNAVAILABLE ({reg.get('last_error') or 'connecting'})"
    others = ", ".join(reg.get("relays") or []) or "none seen"
    return (f"Redis as {reg['relay_id']}: {state}; other relays: {others}; {reg['queued']} changes queued"
            + (f"; propagation p50 {reg['propagation_ms']['p50']} ms" if reg.get("propagation_ms") else ""))


# --- lab ------------------------------------------------------------------------------------------

def _progress(enabled: bool) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if enabled:
            click.echo(f"  {msg}", err=True)
    return say


@main.group()
def lab() -> None:
    """Network-namespace lab: client, relay and transceivers on veths."""


@lab.command("up")
@click.option("--prefix", default=None, help="Namespace prefix (default: random).")
@click.option("--transceivers", "n_tx", type=click.IntRange(1, 16), default=2, show_default=True)
@click.option("--relays", "n_relays", type=click.IntRange(1, 4), default=1, show_default=True,
              help="2+: a fleet sharing the VIP behind an edge router, with a redis-server.")
@click.option("--no-services", is_flag=True, help="Only the topology: no relayd, no transceivers.")
@click.option("--client-auth", type=click.Choice(["off", "tokens"]), default="off", show_default=True,
              help="Client credentials on the public listener (tokens: --json reports one).")
@json_option
def lab_up_cmd(prefix: str | None, n_tx: int, n_relays: int, no_services: bool, client_auth: str,
               as_json: bool) -> None:
    """Create the lab and start relayd + transceivers in it (left running)."""
    from manager.lab.manage import start_lab

    need_root("lab up")
    info = start_lab(prefix, n_tx, services=not no_services, client_auth=client_auth, relays=n_relays,
                     say=_progress(not as_json))
    services = info["services"]
    if as_json:
        emit_json(info)
        return
    click.echo(f"lab {info['prefix']} is up")
    click.echo(table(None, [
        ["client ns", info["namespaces"]["client"]],
        ["relay ns", info["namespaces"]["relay"]],
        ["transceiver ns", ", ".join(info["namespaces"]["transceivers"])],
        ["signaling", f"{info['signaling_url']} (from the client namespace)"],
        ["VIPs", ", ".join(info["vips"])],
        *([[f"relay {r['index']}", f"{r['namespace']}, {r['signaling_url']}, control {r['control_socket']}"]
           for r in info["relays"]] + [["edge ns", info["edge_namespace"]], ["redis", info["redis_url"]]]
          if len(info["relays"]) > 1 else []),
        ["services", ", ".join(f"{k} (pid {v})" for k, v in info["services"].items()) or "none (--no-services)"],
        ["control socket", info["control_socket"] if services else "-"],
        ["config", info["config_path"] or "-"],
    ]))
    if services:
        click.echo(f"\ntry: relayctl --lab {info['prefix']} status    (then: relayctl lab down {info['prefix']})")


@lab.command("route")
@click.argument("prefix")
@click.option("--relay", "relay", type=int, required=True, help="The relay the VIP goes to (1-based).")
@json_option
def lab_route_cmd(prefix: str, relay: int, as_json: bool) -> None:
    """Move a fleet lab's VIP route to relay N (as anycast or ECMP would)."""
    need_root("lab route")
    from manager.lab.routing import route_vip, vip_route
    from manager.lab.state import load_lab

    lab_ = load_lab(prefix)
    before = vip_route(lab_)
    route_vip(lab_, relay)
    after = vip_route(lab_)
    if as_json:
        emit_json({"prefix": prefix, "from": before, "to": after})
        return
    click.echo(f"lab {prefix}: VIP {lab_.vip4}, {lab_.vip6} now routed to relay {after} (was relay {before})")


@lab.command("down")
@click.argument("prefix", required=False)
@click.option("--all", "all_", is_flag=True, help="Every lab recorded in /run/splitrelay.")
@json_option
def lab_down_cmd(prefix: str | None, all_: bool, as_json: bool) -> None:
    """Stop a lab's services and remove it, its pinned state and its files."""
    need_root("lab down")
    from manager.lab.manage import known_prefixes, take_lab_down

    labs, ours = known_prefixes()
    if all_:
        prefixes = sorted({*labs, *ours})
    elif prefix:
        prefixes = [prefix]
    elif len(ours) == 1 or (not ours and len(labs) == 1):
        prefixes = ours or labs
    elif not labs and not ours:
        raise Fail("no lab is up")
    else:
        raise Fail(f"several labs are up ({', '.join(sorted({*labs, *ours}))}): name one or use --all")
    results = [take_lab_down(p) for p in prefixes]
    if as_json:
        emit_json({"labs": results})
        return
    for r in results:
        what = [f"stopped {', '.join(r['services_stopped'])}" if r["services_stopped"] else None,
                "unpinned the fast path" if r["pin_dir_removed"] else None,
                f"removed {len(r['namespaces_removed'])} namespaces" if r["namespaces_removed"] else None]
        click.echo(f"lab {r['prefix']}: " + ("; ".join(w for w in what if w) or "nothing was left"))


@lab.command("list")
@json_option
def lab_list_cmd(as_json: bool) -> None:
    """Labs recorded in /run/splitrelay."""
    from manager.lab.manage import list_lab_infos

    out = list_lab_infos()
    if as_json:
        emit_json({"labs": out})
        return
    if not out:
        click.echo("no labs")
        return
    click.echo(table(["PREFIX", "TRANSCEIVERS", "UP", "SERVICES", "SIGNALING", "CREATED"],
                     [[i["prefix"], len(i["namespaces"]["transceivers"]), _yes(i["exists"]),
                       ", ".join(i["running"]) or None, i["signaling_url"],
                       time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i["created_at"]))] for i in out]))


# --- demo -----------------------------------------------------------------------------------------

def print_demo(r: dict) -> None:
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
        ["this machine", _host_line(r.get("host") or {})],
        ["cleanup", "nothing left behind" if not r["left_behind"] else "LEFT: " + ", ".join(r["left_behind"])],
    ]
    click.echo(table(None, rows))
    click.echo("demo OK" if r["ok"] else "demo FAILED")


def _host_line(h: dict) -> str:
    if not h:
        return "-"
    if not h.get("page"):
        return f"page NOT reachable at {h.get('url')}: {h.get('error')}"
    return (f"page at {h['url']}; a call from this machine through it "
            + ("connected and echoed" if h.get("call") else f"FAILED ({h.get('call_error')})"))


def _hold_until_enter(url: str) -> None:
    click.echo(f"\nTalk to the agent from this machine's browser: {url}\n"
               "(the lab stays up until you press Enter or Ctrl-C)", err=True)
    try:
        sys.stdin.readline()
    except KeyboardInterrupt:
        pass


@main.command()
@click.option("--duration", type=click.FloatRange(1, 600), default=5.0, show_default=True,
              help="Seconds of media in the call.")
@click.option("--hold/--no-hold", default=None,
              help="Keep the lab up for this machine's browser until Enter (default: when on a terminal).")
@json_option
def demo(duration: float, hold: bool | None, as_json: bool) -> None:
    """Lab + relayd + 2 transceivers, one real WebRTC call through the XDP
    relay, a summary, and the "talk to the agent" page on this machine's
    loopback (a browser here can call the agent); everything is removed afterwards."""
    need_root("demo")
    from manager.lab.demo import run_demo

    if hold is None:
        hold = sys.stdin.isatty() and not as_json
    r = run_demo(duration, _progress(not as_json), hold=_hold_until_enter if hold else None)
    if as_json:
        emit_json(r)
    else:
        print_demo(r)
    if not r["ok"] or r["left_behind"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
