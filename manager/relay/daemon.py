"""relayd: the relay manager as one asyncio program.

Relay.start() loads (or adopts) the XDP fast path, then serves the slow path
on the public port and the signaling API. Relay.stop() leaves the fast path
attached unless asked to detach, so established calls keep flowing while the
manager restarts or is upgraded.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import signal
import time

from aiohttp import web

from manager import pki
from manager.observability import tracing
from manager.relay import call_journal
from manager.relay.call_desk import SignalingCounters
from manager.relay.config import RelaydConfig
from manager.relay.control import ControlDeps, Runtime, start_control, stop_control
from manager.relay.credentials import ClientAuth
from manager.relay.drain import Drains
from manager.relay.fleet import RedisFleet, redact_url
from manager.relay.graceful import Placements, finish_placements
from manager.relay.kernel.datapath import Datapath, xdp_attachment
from manager.relay.kernel.flow_sockets import FlowSockets
from manager.relay.kernel.next_hops import NextHops
from manager.relay.metrics import Metrics
from manager.relay.migration import Migrator
from manager.relay.port_ranges import check_this_namespace
from manager.relay.readiness import Readiness, started, transceivers_healthy, xdp_attached
from manager.relay.registration import make_internal_app
from manager.relay.registry import Registry
from manager.relay.reload import Reloader, ReloadTargets
from manager.relay.signaling import make_app
from manager.relay.slowpath import SlowPath
from manager.relay.tcp_bridge import TcpBridge
from manager.relay.transceiver_client import TransceiverClient

log = logging.getLogger(__name__)


async def _serve(app: web.Application, host: str | list[str], port: int, **site: object) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    for h in [host] if isinstance(host, str) else host:
        try:
            await web.TCPSite(runner, h, port, **site).start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(exc.errno, f"cannot listen on {h}:{port}: {exc.strerror}") from None
    return runner


class Relay:
    """relayd's wiring: builds each component from an explicit RelaydConfig and
    hands every consumer the components it uses (nothing receives this object)."""

    def __init__(self, cfg: RelaydConfig, config_path: str | None = None):
        self.cfg = cfg
        self.config_path = config_path  # what a reload reads again
        self.hint_keys = cfg.hint_ring  # changed in place by a reload
        self.reloader: Reloader | None = None
        self.datapath = Datapath(cfg.datapath,
                                 source_prefix=(cfg.limits.source_prefix_v4, cfg.limits.source_prefix_v6),
                                 tcp=cfg.tcp if cfg.tcp.enabled else None)
        self.flow_sockets = FlowSockets(cfg.datapath)
        self.next_hops = NextHops()
        self.registry = Registry(heartbeat_timeout=cfg.signaling.heartbeat_timeout)
        # A fleet shares the registry through Redis; alone, it is in memory only.
        self.fleet = (RedisFleet(cfg.registry, self.registry, on_owner_moved=self._owner_moved,
                                 on_remote_leg=self._remote_leg, allows_owner=cfg.internal.allows)
                      if cfg.registry.backend == "redis" else None)
        self.metrics = Metrics(self.registry, self.datapath)
        self.placements = Placements(self.registry)  # for a graceful stop
        self.runtime = Runtime()
        self.slowpath: SlowPath | None = None
        self.tcp: TcpBridge | None = None
        self.migrator: Migrator | None = None
        self.drains: Drains | None = None
        self.journal: call_journal.CallJournal | None = None
        self._runner: web.AppRunner | None = None
        self._client: TransceiverClient | None = None
        self._internal_runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._control = None

    async def start(self) -> None:
        cfg = self.cfg
        for warning in cfg.start_warnings():
            log.warning("%s", warning)
        # Flow ports the kernel may hand out as ephemeral ports would take the host's replies.
        check_this_namespace((cfg.datapath.flow_port_min, cfg.datapath.flow_port_max))
        # Off the loop: bcc compiles for a second or two, and pyroute2's
        # synchronous netlink API refuses to run inside a running loop.
        self.runtime.adopted = await asyncio.to_thread(self.datapath.load)
        if self.datapath.takeover is not None:
            log.info("%s", self.datapath.takeover.summary())
        self.runtime.attach_results = await asyncio.to_thread(self.datapath.attach)
        # Every next hop a flow forwards through stays resolved, also while relayd is down.
        self.next_hops.start()
        self.datapath.on_next_hop = self.next_hops.want
        for r in self.runtime.attach_results:
            log.info("XDP on %s: %s mode%s", r.interface, r.mode, " (adopted)" if r.adopted else "")
        dp = cfg.datapath
        await asyncio.to_thread(self.flow_sockets.open)
        if self.fleet is not None:
            # The fleet's calls before the slow path starts: their ufrags are
            # admitted and their kernel flows adopted as known calls.
            synced = await self.fleet.start()
            log.info("registry: Redis at %s as relay %s (%s)", redact_url(cfg.registry.url), self.fleet.relay_id,
                     f"{len(self.registry.calls())} calls, {len(self.registry.transceivers())} transceivers"
                     if synced else "not reachable yet")
        self.slowpath = SlowPath(
            self.registry, self.datapath, self.flow_sockets, hint_key=self.hint_keys,
            vips=[v.as_tuple() for v in dp.vips], idle_timeout=cfg.slowpath.idle_timeout,
            pending_timeout=cfg.slowpath.pending_timeout, max_legs_per_call=cfg.slowpath.max_legs_per_call,
            max_pending_per_source=cfg.slowpath.max_pending_per_source,
            on_flow_installed=self.metrics.flow_setup.observe,
            check_media=self._check_media, on_rebound=self.metrics.rebind.observe,
            fleet=self.fleet, repoint=self._repoint, source_key=cfg.limits.source_key(),
            source_rate=cfg.slowpath.source_rate, source_burst=cfg.slowpath.source_burst,
            rebind_call_rate=cfg.slowpath.rebind_call_rate, rebind_call_burst=cfg.slowpath.rebind_call_burst,
        )
        self.metrics.watch_slowpath(self.slowpath)
        await self.slowpath.start()
        if cfg.tcp.enabled:
            # ICE-TCP on every VIP address (each once: several VIPs may share one).
            hosts = list(dict.fromkeys(v.addr for v in dp.vips))
            private = [h for h in hosts if ipaddress.ip_address(h).is_private]
            if cfg.tcp.port < 1024 and private:
                log.warning("tcp.port %d on private address(es) %s: Chrome refuses remote candidates below "
                            "port 1024 at private addresses; ICE-TCP will work for it only on public ones",
                            cfg.tcp.port, ", ".join(private))
            self.tcp = TcpBridge(self.slowpath, cfg.tcp, hosts, source_key=cfg.limits.source_key())
            await self.tcp.start()
        tls = pki.paths(cfg.internal.pki_dir, pki.RELAYD)
        self._client = TransceiverClient(timeout=cfg.signaling.transceiver_timeout, tls=pki.client_context(tls))
        self.migrator = Migrator(self.registry, self.datapath, self.slowpath, self._client,
                                 metrics_registry=self.metrics.prometheus, allows_owner=cfg.internal.allows)
        self.drains = Drains(self.registry, self.migrator, self._client, metrics_registry=self.metrics.prometheus,
                             can_move=self._fleet_problem)
        self.journal = call_journal.for_relay(cfg, self.registry, self.slowpath, self.datapath, self._client,
                                              self.fleet, self.metrics.calls.observe)
        await self.journal.start()
        self.migrator.on_moved, self.slowpath.on_failover = self.journal.migrated, self.journal.failed_over
        auth = ClientAuth.from_config(cfg.client_auth)
        public = make_app(self.registry, hint_key=self.hint_keys, public_addrs=[v.as_tuple() for v in dp.vips],
                          transceiver_client=self._client, auth=auth,
                          limits=cfg.limits, allowed_origins=cfg.signaling.allowed_origins,
                          trusted_proxies=cfg.signaling.trusted_proxies,
                          allows_owner=cfg.internal.allows,
                          claim_conn_id=self.fleet.claim_conn_id if self.fleet is not None else None,
                          shared_restarts=self.fleet.take_restart if self.fleet is not None else None,
                          tcp_addrs=self.tcp.listening if self.tcp is not None else (),
                          counters=SignalingCounters(self.metrics.prometheus),
                          page=cfg.signaling.page)
        self._runner = await _serve(public, [cfg.signaling.host, *cfg.signaling.extra_hosts], cfg.signaling.port)
        internal = make_internal_app(self.registry, allows=cfg.internal.allows, on_register=self.drains.registered)
        self.drains.add_internal_routes(internal)
        self._internal_runner = await _serve(internal, cfg.internal.host, cfg.internal.port,
                                             ssl_context=pki.server_context(tls))
        if cfg.metrics.port:
            self._metrics_runner = await _serve(self.metrics.app(readiness=self.readiness()), cfg.metrics_host,
                                                cfg.metrics.port)
        self.runtime.started_at = time.time()
        deps = ControlDeps(
            config=cfg, registry=self.registry, datapath=self.datapath, slowpath=self.slowpath,
            migrator=self.migrator, transceivers=self._client, flow_setup=self.metrics.flow_setup,
            runtime=self.runtime, fleet=self.fleet, tcp=self.tcp, next_hops=self.next_hops,
            drains=self.drains, journal=self.journal)

        def applied(new: RelaydConfig) -> None:
            self.cfg = deps.config = new

        self.reloader = deps.reloader = Reloader(
            self.config_path, cfg, ReloadTargets(public, auth, self.hint_keys, self.datapath), on_applied=applied)
        self._control = await start_control(deps)
        log.info("relayd ready: signaling on %s:%d, transceivers on %s:%d (mutual TLS), VIPs %s",
                 cfg.signaling.host, cfg.signaling.port, cfg.internal.host, cfg.internal.port,
                 ", ".join(f"{v.addr}:{v.port}" for v in dp.vips))

    def readiness(self) -> Readiness:
        """/readyz's parts: started, XDP attached, maps open, registry reachable, a healthy transceiver.
        Liveness (/livez) stays the event loop alone: a Redis blip makes relayd
        not ready (it refuses new calls then), never restarted."""
        dp = self.datapath

        def maps() -> tuple[bool, str]:
            return (dp.maps is not None, f"pinned under {dp.pin_dir}" if dp.maps is not None else "not open")

        def registry() -> tuple[bool, str]:
            if self.fleet is None:
                return True, "memory"
            return self.fleet.available, "redis reachable" if self.fleet.available else "redis unreachable"

        return Readiness([
            ("started", started(lambda: self.runtime.started_at)),
            ("xdp", xdp_attached(list(self.cfg.datapath.interfaces), xdp_attachment, dp.program_id)),
            ("maps", maps),
            ("registry", registry),
            ("transceivers", transceivers_healthy(lambda: sum(t.healthy for t in self.registry.transceivers()))),
        ])

    def _owner_moved(self, call, previous) -> None:
        if self.slowpath is not None:
            self.slowpath.owner_moved(call, previous)

    def _remote_leg(self, leg) -> None:
        if self.slowpath is not None:
            self.slowpath.remote_leg_known(leg)

    async def _check_media(self, conn_id: int, packet: bytes, path=None) -> bool:
        """Ask a call's transceiver whether a packet from a client's new
        address authenticates as the call's (NAT rebinding); with `path`
        (old flow source, new flow source) it also sends its replies to the
        new one (this relay took the call over)."""
        call = self.registry.get_call(conn_id)
        tx = self.registry.get_transceiver(call.transceiver_id) if call is not None else None
        if tx is None or self._client is None:
            return False
        body: dict = {"packet": base64.b64encode(packet).decode()}
        if path is not None:
            body["path"] = {"old": list(path[0]), "new": list(path[1])}
        reply = await self._client.call_op(tx, "POST", f"/calls/{conn_id}/media-check", body)
        return reply.get("authentic") is True

    async def _repoint(self, conn_id: int, old, new) -> bool:
        """The owner authenticated a check from this relay's flow source for
        a tuple another relay served: its replies go here from now on."""
        call = self.registry.get_call(conn_id)
        tx = self.registry.get_transceiver(call.transceiver_id) if call is not None else None
        if tx is None or self._client is None:
            return False
        reply = await self._client.call_op(tx, "POST", f"/calls/{conn_id}/path",
                                           {"old": None if old is None else list(old), "new": list(new)})
        return reply.get("repointed") is True

    def _fleet_problem(self) -> str | None:
        if self.fleet is not None and not self.fleet.available:
            return f"the fleet registry (Redis) is unavailable ({self.fleet.last_error or 'connecting'})"
        return None

    async def finish_placements(self) -> None:
        """SIGTERM's first step: accept nothing new, let the placements in
        flight reach the kernel (bounded; manager.relay.graceful)."""
        await finish_placements(self._runner, self.tcp, self.registry, self.slowpath, self.placements,
                                self.cfg.signaling.stop_deadline, self.cfg.slowpath.pending_timeout)

    async def stop(self, *, detach: bool | None = None) -> None:
        detach = self.cfg.detach_on_exit if detach is None else detach
        if self.drains is not None:
            await self.drains.close()
        await stop_control(self._control)
        self._control = None
        for runner in (self._runner, self._internal_runner, self._metrics_runner):
            if runner is not None:
                await runner.cleanup()
        self._runner = self._internal_runner = self._metrics_runner = None
        if self.migrator is not None:
            await self.migrator.close()
        if self.journal is not None:
            await self.journal.stop()  # before the client: its last fetches use it
            self.journal = None
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self.tcp is not None:
            await self.tcp.stop()
            self.tcp = None
        if self.slowpath is not None:
            await self.slowpath.stop()
        if self.fleet is not None:
            await self.fleet.stop()
        self.flow_sockets.close()
        self.datapath.on_next_hop = None
        await asyncio.to_thread(self.next_hops.stop)
        if detach:
            removed = await asyncio.to_thread(self.datapath.detach, purge=True)
            log.info("fast path removed from %s", ", ".join(removed) or "no interface")
        else:
            log.info("fast path left running (pinned under %s)", self.cfg.datapath.pin_dir)
        self.datapath.close()


async def run(cfg: RelaydConfig, stop: asyncio.Event | None = None, *, config_path: str | None = None) -> None:
    """Run relayd until SIGTERM/SIGINT (or `stop` is set), then stop
    gracefully (Relay.finish_placements). A second signal stops at once
    without the graceful steps. SIGHUP reloads `config_path`
    (manager.relay.reload)."""
    relay = Relay(cfg, config_path)
    tracing.configure("relayd", cfg.telemetry.otlp_endpoint, instance=cfg.registry.relay_id)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: exiting now")
            raise SystemExit(1)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    # Until relayd has started, a SIGHUP has nothing to reload: ignored.
    loop.add_signal_handler(signal.SIGHUP, lambda: relay.reloader and relay.reloader.on_sighup())
    try:
        await relay.start()
        await stop.wait()
        await relay.finish_placements()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await relay.stop()
        await asyncio.to_thread(tracing.shutdown)  # what is still buffered goes out
