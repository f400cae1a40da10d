"""relayd's local control API: JSON over HTTP on a Unix socket.

Only local root may use it (the socket is mode 0600): it can end calls and
expire flows. relayctl is its client; anything that only needs the kernel's
view (flows, fast-path counters) reads the pinned maps instead, so it also
works while relayd is down.

    GET    /status               pid, uptime, XDP attachments, VIPs, counts
    GET    /sessions             calls with their client tuples and flows
    GET    /transceivers         registered transceivers
    GET    /stats                fast-path counters + slow-path counters
    GET    /calls/{call}         a live call's figures, as its record would say them now (call id or conn id)
    POST   /expire               {"idle_s": float} optional -> what was removed
    DELETE /sessions/{call_id}   end a call (404 when unknown)
    POST   /sessions/{call_id}/migrate      {"to": transceiver id} -> the migration's result
    POST   /transceivers/{id}/drain         stop placements, move every call away -> results
    POST   /transceivers/{id}/undrain       take new calls again
    POST   /reload               re-read the config file -> what changed (409: refused, nothing changed)
    POST   /drains, GET /drains/{id}        a drain with a deadline, and its progress (manager.relay.drain)

Errors are JSON `{"error": "one line"}` with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import Histogram

from manager.protocol.addresses import fmt_ep
from manager.protocol.http import error_middleware, json_body, json_error
from manager.relay.config import RelaydConfig
from manager.relay.control_client import fastpath_view
from manager.relay.kernel import libbpf
from manager.relay.kernel.datapath import Datapath, DatapathError, Flow, xdp_attachment
from manager.relay.migration import MigrationError, Migrator
from manager.relay.registry import Registry, UnknownTransceiverError
from manager.relay.reload import post_reload
from manager.relay.slowpath import SlowPath
from manager.relay.transceiver_client import TransceiverClient, TransceiverError

log = logging.getLogger(__name__)

END_REASON = "operator"


@dataclass
class Runtime:
    """What relayd learnt when it started: shown by /status."""

    started_at: float = 0.0
    adopted: bool = False
    attach_results: list = field(default_factory=list)


@dataclass
class ControlDeps:
    """The components the control API works on, passed in by the daemon."""

    config: RelaydConfig
    registry: Registry
    datapath: Datapath
    slowpath: SlowPath
    migrator: Migrator
    transceivers: TransceiverClient
    flow_setup: Histogram
    runtime: Runtime
    fleet: Any = None  # manager.relay.fleet.RedisFleet of a fleet; None: in-memory registry
    tcp: Any = None  # manager.relay.tcp_bridge.TcpBridge; None: ICE-TCP off
    next_hops: Any = None  # manager.relay.kernel.next_hops.NextHops
    reloader: Any = None  # manager.relay.reload.Reloader
    drains: Any = None  # manager.relay.drain.Drains: drains with a deadline
    journal: Any = None  # manager.relay.call_journal.CallJournal: call records


DEPS_KEY = web.AppKey("deps", ControlDeps)


def _translate(request: web.Request, exc: Exception) -> tuple[int, str] | None:
    # The control API never answers with a traceback: one line, logged here.
    if isinstance(exc, web.HTTPException):
        return (exc.status, exc.reason) if exc.status >= 400 else None
    if isinstance(exc, (DatapathError, OSError)):
        log.warning("control %s %s: %s", request.method, request.path, exc)
        return 503, str(exc)
    log.exception("control %s %s failed", request.method, request.path)
    return 500, f"{type(exc).__name__}: {exc}"



# --- views of the relay ------------------------------------------------------------------

def _kernel_flows(deps: ControlDeps) -> list[Flow]:
    if deps.datapath.maps is None:
        return []
    return deps.datapath.flows()


def _count_flows(deps: ControlDeps) -> int:
    # Batch counts only: nothing decoded, no reverse-map walk (the maps may be large).
    maps = deps.datapath.maps
    return 0 if maps is None else len(maps.flows)


def _interfaces(deps: ControlDeps) -> list[dict[str, Any]]:
    """The configured interfaces with their live XDP attachment (read here,
    in relayd's network namespace, not remembered from start-up)."""
    ours = libbpf.prog_info(deps.datapath.prog_fd).id if deps.datapath.prog_fd >= 0 else None
    at_start = {r.interface: r for r in deps.runtime.attach_results}
    out = []
    for ifname in deps.config.datapath.interfaces:
        try:
            prog_id, mode = xdp_attachment(ifname)
            problem = None
        except DatapathError as exc:
            prog_id, mode, problem = None, None, str(exc)
        r = at_start.get(ifname)
        out.append({"name": ifname, "xdp_mode": mode, "prog_id": prog_id,
                    "attached": prog_id is not None and prog_id == ours,
                    "adopted": bool(r and r.adopted), "error": problem})
    return out


def status_view(deps: ControlDeps, interfaces: list[dict[str, Any]], n_flows: int) -> dict[str, Any]:
    cfg = deps.config
    calls = deps.registry.calls()
    ts = deps.registry.transceivers()
    sp = deps.slowpath
    installed = sum(1 for leg in sp.legs.values() if leg.installed_at is not None) if sp else 0
    by_state: dict[str, int] = {}
    for c in calls:
        by_state[c.state] = by_state.get(c.state, 0) + 1
    return {
        "pid": os.getpid(),
        "started_at": deps.runtime.started_at,
        "uptime_s": round(time.time() - deps.runtime.started_at, 3) if deps.runtime.started_at else 0.0,
        "adopted": deps.runtime.adopted,
        "pin_dir": str(cfg.datapath.pin_dir),
        "control_socket": str(cfg.control_socket),
        "interfaces": interfaces,
        "vips": [{"addr": v.addr, "port": v.port} for v in cfg.datapath.vips],
        "internal_addr4": cfg.datapath.internal_addr4,
        "internal_addr6": cfg.datapath.internal_addr6,
        "signaling": ", ".join(fmt_ep(h, cfg.signaling.port) for h in [cfg.signaling.host,
                                                                          *cfg.signaling.extra_hosts]),
        "metrics": fmt_ep(cfg.metrics_host, cfg.metrics.port) if cfg.metrics.port else None,
        "internal": fmt_ep(cfg.internal.host, cfg.internal.port),
        "registry": deps.fleet.status() if deps.fleet is not None else {"backend": "memory"},
        "counts": {
            "calls": len(calls),
            "calls_by_state": by_state,
            "flows": n_flows,
            "legs_installed": installed,
            "legs_pending": (len(sp.legs) - installed) if sp else 0,
            "transceivers": len(ts),
            "transceivers_healthy": sum(1 for t in ts if t.healthy),
            "transceivers_draining": sum(1 for t in ts if t.draining),
        },
    }


def sessions_view(deps: ControlDeps, flows: list[Flow]) -> dict[str, Any]:
    """Calls with their legs; a leg merges the slow path's record of a client
    tuple with the kernel's flow entry for it (either may exist alone: a
    pending leg has no kernel entry, an adopted flow may have no call)."""
    kernel = {(f.client, f.vip): f for f in flows}
    sp = deps.slowpath
    legs_by_conn: dict[int, dict[tuple, dict[str, Any]]] = {}
    for leg in (sp.legs.values() if sp else []):
        legs_by_conn.setdefault(leg.conn_id, {})[(leg.client, leg.vip)] = {
            "client": fmt_ep(*leg.client), "vip": fmt_ep(*leg.vip), "flow_port": leg.flow_port,
            "flow_addr": leg.flow_addr, "installed": leg.installed_at is not None,
            "setup_ms": round((leg.installed_at - leg.first_seen) * 1000, 3) if leg.installed_at else None,
            "kernel": None,
        }
    for key, f in kernel.items():
        entry = legs_by_conn.setdefault(f.conn_id, {}).setdefault(key, {
            "client": fmt_ep(*f.client), "vip": fmt_ep(*f.vip), "flow_port": f.flow_port,
            "flow_addr": f.flow_addr, "installed": True, "setup_ms": None, "kernel": None})
        entry["kernel"] = f.to_dict()
    now = time.time()
    sessions = []
    for call in deps.registry.calls():
        legs = legs_by_conn.pop(call.conn_id, {})
        sessions.append({
            "call_id": call.call_id, "conn_id": call.conn_id, "transceiver": call.transceiver_id,
            "owner": call.owner.to_dict() if call.owner else None, "state": call.state,
            "created": call.created, "age_s": round(now - call.created, 3),
            "server_ufrag": call.server_ufrag, "legs": list(legs.values()),
        })
    # Kernel flows (or legs) whose call the registry does not know, e.g.
    # adopted after a restart before the owner re-reported it.
    orphans = [leg for legs in legs_by_conn.values() for leg in legs.values()]
    return {"sessions": sessions, "orphan_legs": orphans}


def slowpath_view(deps: ControlDeps) -> dict[str, Any] | None:
    sp = deps.slowpath
    if sp is None:
        return None
    setup = {"count": 0, "sum_s": 0.0}
    for metric in deps.flow_setup.collect():
        for s in metric.samples:
            if s.name.endswith("_count"):
                setup["count"] = int(s.value)
            elif s.name.endswith("_sum"):
                setup["sum_s"] = round(s.value, 6)
    return {**sp.summary(), "flow_setup": setup, "tcp": deps.tcp.summary() if deps.tcp is not None else None}


# --- handlers -----------------------------------------------------------------------------

def _deps(request: web.Request) -> ControlDeps:
    return request.app[DEPS_KEY]


async def get_status(request: web.Request) -> web.Response:
    deps = _deps(request)
    # Netlink and map walks off the loop: the slow path keeps running meanwhile.
    interfaces = await asyncio.to_thread(_interfaces, deps)
    n_flows = await asyncio.to_thread(_count_flows, deps)
    return web.json_response(status_view(deps, interfaces, n_flows))


async def get_sessions(request: web.Request) -> web.Response:
    deps = _deps(request)
    flows = await asyncio.to_thread(_kernel_flows, deps)
    return web.json_response(sessions_view(deps, flows))


async def get_transceivers(request: web.Request) -> web.Response:
    deps = _deps(request)
    now = time.monotonic()
    out = []
    for t in deps.registry.transceivers():
        d = t.to_dict()
        d["heartbeat_age_s"] = round(now - t.last_heartbeat, 3) if t.last_heartbeat else None
        out.append(d)
    return web.json_response({"transceivers": out})


async def get_stats(request: web.Request) -> web.Response:
    deps = _deps(request)
    counters = await asyncio.to_thread(deps.datapath.counters) if deps.datapath.maps is not None else {}
    return web.json_response({"fastpath": fastpath_view(counters), "slowpath": slowpath_view(deps),
                              "next_hops": dict(deps.next_hops.stats) if deps.next_hops is not None else None})


async def post_expire(request: web.Request) -> web.Response:
    deps = _deps(request)
    idle_s: float | None = None
    body = await json_body(request, optional=True)
    if body:
        if set(body) - {"idle_s"}:
            return json_error(400, 'body must be {"idle_s": seconds} or empty')
        idle_s = body.get("idle_s")
        if idle_s is not None and (isinstance(idle_s, bool) or not isinstance(idle_s, (int, float)) or idle_s < 0):
            return json_error(400, f"idle_s: {idle_s!r}: must be a number of seconds >= 0")
    sp = deps.slowpath
    if sp is None:
        return json_error(503, "the slow path is not running")
    idle = float(idle_s) if idle_s is not None else sp.idle_timeout
    legs_before = {k: leg for k, leg in sp.legs.items() if leg.installed_at is None}
    calls_before = {c.call_id: c for c in deps.registry.calls()}
    now = time.monotonic()
    if idle_s is not None:  # an explicit idle time applies to pending legs too
        now += sp.pending_timeout - idle
    sp.expire_pending(now)
    # The kernel walk runs off the loop, never beside the housekeeper's;
    # what it removed is what it returns.
    expired = (await sp.expire_kernel(idle))[0] if deps.datapath.maps is not None else []
    calls_after = {c.call_id for c in deps.registry.calls()}
    return web.json_response({
        "idle_s": idle,
        "flows": [f.to_dict() for f in expired],
        "pending_legs": [{"client": fmt_ep(*leg.client), "vip": fmt_ep(*leg.vip), "conn_id": leg.conn_id}
                         for k, leg in legs_before.items() if k not in sp.legs],
        "calls": [{"call_id": cid, "conn_id": c.conn_id, "reason": c.ended_reason}
                  for cid, c in calls_before.items() if cid not in calls_after],
    })


async def delete_session(request: web.Request) -> web.Response:
    deps = _deps(request)
    call_id = request.match_info["call_id"]
    call = deps.registry.get_call_by_id(call_id)
    if call is None:
        return json_error(404, f"no session {call_id!r}")
    # Ended in the relay first (kernel entries go at once), then the owner is
    # told, best effort: an unreachable transceiver must not keep it alive here.
    deps.registry.end_call(call.conn_id, END_REASON)
    warning = None
    try:
        t = deps.registry.get_transceiver(call.transceiver_id)
        await deps.transceivers.delete_call(t, call.conn_id)
    except (TransceiverError, UnknownTransceiverError) as exc:
        warning = str(exc)
        log.warning("ending conn_id %d on transceiver %d: %s", call.conn_id, call.transceiver_id, exc)
    return web.json_response({"ended": call.to_dict(), "transceiver_warning": warning})


def _store_problem(deps: ControlDeps) -> web.Response | None:
    """A fleet moves calls only with its shared registry reachable: a move
    the other relays never hear of would split the fleet's view."""
    if deps.fleet is not None and not deps.fleet.available:
        return json_error(503, f"the fleet registry (Redis) is unavailable ({deps.fleet.last_error or 'connecting'}); "
                           "calls cannot be moved until it is back")
    return None


async def post_migrate(request: web.Request) -> web.Response:
    deps = _deps(request)
    if (problem := _store_problem(deps)) is not None:
        return problem
    body = await json_body(request, optional=True)
    target = body.get("to")
    if isinstance(target, bool) or not isinstance(target, int):
        return json_error(400, "'to' must be a transceiver id (integer)")
    try:
        result = await deps.migrator.migrate(request.match_info["call_id"], target)
    except MigrationError as exc:
        return json_error(exc.status, str(exc))
    return web.json_response(result.to_dict())


def _transceiver_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not raw.isdigit():
        raise web.HTTPBadRequest(reason=f"transceiver id must be an integer, got {raw!r}")
    return int(raw)


async def post_drain(request: web.Request) -> web.Response:
    deps = _deps(request)
    if (problem := _store_problem(deps)) is not None:
        return problem
    try:
        results = await deps.migrator.drain(_transceiver_id(request))
    except MigrationError as exc:
        return json_error(exc.status, str(exc))
    return web.json_response({"transceiver": _transceiver_id(request), "results": [r.to_dict() for r in results]})


async def post_undrain(request: web.Request) -> web.Response:
    deps = _deps(request)
    if (problem := _store_problem(deps)) is not None:
        return problem
    try:
        t = deps.registry.set_draining(_transceiver_id(request), False)
    except UnknownTransceiverError:
        return json_error(404, f"unknown transceiver {request.match_info['id']}")
    return web.json_response(t.to_dict())


async def post_reload_config(request: web.Request) -> web.Response:
    return await post_reload(_deps(request).reloader)


async def get_call_figures(request: web.Request) -> web.Response:
    deps = _deps(request)
    ref = request.match_info["call"]
    call = deps.registry.get_call_by_id(ref)
    if call is None and ref.isdigit() and len(ref) < 11:
        call = deps.registry.get_call(int(ref))
    if call is None:
        return json_error(404, f"unknown call {ref}: not live on this relay")
    if deps.journal is None:
        return json_error(503, "call records are not running")
    record = await deps.journal.live_record(call)
    return web.json_response({"state": call.state, "record": record.model_dump(by_alias=True)})


def make_control_app(deps: ControlDeps) -> web.Application:
    app = web.Application(middlewares=[error_middleware(json_error, _translate)], client_max_size=64 * 1024)
    app[DEPS_KEY] = deps
    app.router.add_get("/status", get_status)
    app.router.add_get("/sessions", get_sessions)
    app.router.add_get("/transceivers", get_transceivers)
    app.router.add_get("/stats", get_stats)
    app.router.add_get("/calls/{call}", get_call_figures)
    app.router.add_post("/expire", post_expire)
    app.router.add_delete("/sessions/{call_id}", delete_session)
    app.router.add_post("/sessions/{call_id}/migrate", post_migrate)
    app.router.add_post("/transceivers/{id}/drain", post_drain)
    app.router.add_post("/transceivers/{id}/undrain", post_undrain)
    app.router.add_post("/reload", post_reload_config)
    if deps.drains is not None:
        deps.drains.add_control_routes(app)
    return app


# --- serving on the Unix socket ----------------------------------------------------------

@dataclass
class ControlServer:
    """A running control API: its runner and the socket file it owns."""

    runner: web.AppRunner
    path: Path
    inode: int


def _socket_in_use(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def bind_control_socket(path: Path) -> socket.socket:
    """A listening AF_UNIX socket at `path`, mode 0600. Bound under a temporary
    name, chmod'ed, then renamed over `path`: nobody can connect before the
    mode is right, and a stale socket from a killed relayd is replaced
    atomically. A live one (another relayd) or a non-socket file is refused."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    try:
        st = path.lstat()
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"control socket path {path} exists and is not a socket")
        if _socket_in_use(path):
            raise OSError(errno.EADDRINUSE, f"control socket {path} is in use (is another relayd running?)")
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        tmp.unlink(missing_ok=True)
        sock.bind(str(tmp))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        tmp.unlink(missing_ok=True)
        raise
    return sock


async def start_control(deps: ControlDeps) -> ControlServer:
    """Serve the control API on the configured control socket."""
    path = Path(deps.config.control_socket)
    sock = bind_control_socket(path)
    runner = web.AppRunner(make_control_app(deps), access_log=None)
    try:
        await runner.setup()
        await web.SockSite(runner, sock).start()
    except BaseException:
        await runner.cleanup()
        sock.close()
        raise
    log.info("control API on %s", path)
    return ControlServer(runner, path, path.stat().st_ino)


async def stop_control(server: ControlServer | None) -> None:
    """Stop serving and remove the socket file, unless another process has
    replaced it since (then it is theirs)."""
    if server is None:
        return
    await server.runner.cleanup()
    try:
        if server.path.stat().st_ino == server.inode:
            server.path.unlink()
    except FileNotFoundError:
        pass
