"""The whole system in network namespaces: `lab up/route/down/list`, and
`demo` (a lab, one real call, a summary, everything removed)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import click

from cli.relayctl.app import Fail, json_option, main, need_root
from cli.relayctl.render import demo_summary, emit_json, table, yes


def progress(enabled: bool) -> Callable[[str], None]:
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
@click.option("--agent", default=None, metavar="SPEC",
              help="Each call's agent on the transceivers: FILE.py:ATTR or MODULE:ATTR, e.g. "
                   "examples/pipecat_bot.py:make_pipeline (default: the echo agent).")
@json_option
def lab_up_cmd(prefix: str | None, n_tx: int, n_relays: int, no_services: bool, client_auth: str,
               agent: str | None, as_json: bool) -> None:
    """Create the lab and start relayd + transceivers in it (left running)."""
    from manager.lab.manage import start_lab

    need_root("lab up")
    if agent:
        agent = resolve_agent(agent)
    info = start_lab(prefix, n_tx, services=not no_services, client_auth=client_auth, relays=n_relays,
                     agent=agent, say=progress(not as_json))
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
                     [[i["prefix"], len(i["namespaces"]["transceivers"]), yes(i["exists"]),
                       ", ".join(i["running"]) or None, i["signaling_url"],
                       time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i["created_at"]))] for i in out]))


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
    r = run_demo(duration, progress(not as_json), hold=_hold_until_enter if hold else None)
    if as_json:
        emit_json(r)
    else:
        click.echo(demo_summary(r))
    if not r["ok"] or r["left_behind"]:
        sys.exit(1)


def resolve_agent(spec: str) -> str:
    """SPEC checked here (one line for a mistake, before a lab is built) and its file made absolute,
    since the transceivers run elsewhere."""
    from manager.transceiver.agent_loader import AgentSpecError, load_agent_factory

    try:
        load_agent_factory(spec)
    except AgentSpecError as exc:
        raise click.ClickException(str(exc)) from None
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py") or "/" in target:
        target = str(Path(target).resolve())
    return f"{target}:{attr}"
