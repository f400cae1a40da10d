"""The relay's slow path: the userspace side of the public port.

The XDP program passes up STUN from client tuples it does not know (and the
rare known-flow packet it cannot forward, e.g. before a neighbour entry
exists). For a Binding request whose USERNAME carries a valid routing hint,
the slow path gives the client tuple a flow source (a relay-internal pool
address and port), forwards the request to the call's owner from it, and
relays the owner's answers back from the public address. When the owner's
Binding success response for a request from that exact client tuple goes back
through the relay, the flow is installed in the kernel (both directions);
from then on XDP forwards it.

ICE-TCP connections (tcp_bridge.py) become *stream legs* here: the same
admission, flow source and owner check, but the client side is a framed TCP
stream and both directions stay in Python (nothing is installed in the kernel;
migration still works, since every packet is sent to the call's current owner).

A flow source holds no socket: FlowSockets sends from any of them and hears
all of them on one socket per family (kernel/flow_sockets.py), so concurrent
flows are bounded by the address and port plan. Sockets are non-blocking and
driven by loop.add_reader: creating a leg is synchronous, so no packet of a
new leg waits on a coroutine.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from collections.abc import Callable

from manager.observability import tracing
from manager.protocol.addresses import family_of
from manager.protocol.rfc7983 import is_stun
from manager.protocol.sources import SourceKey, Tally, TokenBuckets
from manager.protocol.stun_header import CLASS_ERROR, CLASS_SUCCESS, METHOD_BINDING, parse_header
from manager.protocol.tasks import TaskSet
from manager.protocol.ufrag import HintKeys
from manager.relay.kernel.datapath import Datapath, DatapathError
from manager.relay.kernel.flow_sockets import SO_RCVBUFFORCE, FlowSockets
from manager.relay.registry import Call, Registry
from manager.relay.slowpath.admission import Admission
from manager.relay.slowpath.expiry import Expiry
from manager.relay.slowpath.failover import Failover
from manager.relay.slowpath.flow_sources import FlowSources
from manager.relay.slowpath.legs import Addr, Leg, LegDirectory, MediaCheck, Repoint
from manager.relay.slowpath.rebinding import Rebinding, SeenOnce
from manager.relay.slowpath.stream_legs import StreamLegs

log = logging.getLogger(__name__)

MAX_DATAGRAM = 65535


class SlowPath(Admission, StreamLegs, Failover, Rebinding, Expiry):
    """Slow path for a set of VIPs; see the module docstring."""

    def __init__(self, registry: Registry, datapath: Datapath | None, flow_sockets: FlowSockets, *,
                 hint_key: HintKeys, vips: list[tuple[str, int]], idle_timeout: float = 30.0,
                 pending_timeout: float = 5.0, max_legs_per_call: int = 4, max_pending_per_source: int = 8,
                 on_flow_installed: Callable[[float], None] | None = None,
                 check_media: MediaCheck | None = None, on_rebound: Callable[[float], None] | None = None,
                 fleet: LegDirectory | None = None, repoint: Repoint | None = None,
                 source_key: SourceKey | None = None, source_rate: float = 50.0, source_burst: int = 100,
                 budget_rate: float = 20000.0, budget_burst: int = 2000, rebind_call_rate: float = 5.0,
                 rebind_call_burst: int = 8):
        self.registry = registry
        self.datapath = datapath
        self.flow_sockets = flow_sockets
        self.hint_key = hint_key
        self.vips = [(addr, port) for addr, port in vips]
        fs_cfg = flow_sockets.cfg
        self.sources = {fam: FlowSources(len(pool), fs_cfg.flow_port_min, fs_cfg.flow_port_max)
                        for fam, pool in flow_sockets.pools.items()}
        # (family, flow port, pool index) → leg: what the shared sockets demultiplex by.
        self._by_source: dict[tuple[int, int, int], Leg] = {}
        self.idle_timeout = idle_timeout
        self.pending_timeout = pending_timeout
        # Bounds on what one valid ufrag, replayed from many tuples, can hold:
        # legs (flow ports, sockets) per call, and unconfirmed legs per source address.
        self.max_legs_per_call = max_legs_per_call
        self.max_pending_per_source = max_pending_per_source
        self._legs_per_call = Tally()
        # Keyed by SourceKey (an IPv6 /64 is one source), as every per-source limit.
        self.source_key = source_key or SourceKey()
        self._pending_per_source = Tally()
        # The backstop behind XDP: what reaches the public socket from tuples
        # with no leg, per source and in all.
        # (A rate of 0: unlimited, as XDP's admission takes it.)
        self._source_buckets = TokenBuckets(source_rate, source_burst) if source_rate else None
        self._budget = TokenBuckets(budget_rate, budget_burst, max_keys=1) if budget_rate else None
        # Owner media checks per call (NAT rebinding), and the new tuples seen
        # once (a check waits for a tuple's second packet: see rebinding.py).
        self._rebind_buckets = TokenBuckets(rebind_call_rate, rebind_call_burst)
        self._rebind_seen = SeenOnce()
        self._pending: dict[int, Leg] = {}  # id → leg not yet authenticated by its owner (UDP and TCP)
        self.on_flow_installed = on_flow_installed
        self.check_media = check_media
        self.on_rebound = on_rebound
        self.fleet = fleet
        self.repoint = repoint
        self._taking_over: set[tuple[Addr, Addr]] = set()  # failovers under way
        self._tasks = TaskSet("slow path", log)
        self.stats: collections.Counter[str] = collections.Counter()
        self.bytes: collections.Counter[str] = collections.Counter()
        self.legs: dict[tuple[tuple[str, int], tuple[str, int]], Leg] = {}
        self.stream_legs: dict[tuple[tuple[str, int], tuple[str, int]], Leg] = {}  # ICE-TCP, by (client, listener)
        self.public: dict[tuple[str, int], socket.socket] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._housekeeper: asyncio.Task | None = None
        self._expiry_lock = asyncio.Lock()  # one kernel expiry walk at a time (expiry.py)
        self.queue_bytes = 0  # bytes waiting in the public sockets, as of the last housekeeping
        self._unsubscribe: Callable[[], None] | None = None

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for vip in self.vips:
            sock = _udp_socket(vip)
            self.public[vip] = sock
            self._loop.add_reader(sock.fileno(), self._read_public, vip, sock)
        for fam, sock in self.flow_sockets.receivers.items():
            self._loop.add_reader(sock.fileno(), self._read_flows, fam)
        unsubscribe_ended = self.registry.on_call_ended(self._call_ended)
        unsubscribe_active = self.registry.on_call_active(self._call_active)
        unsubscribe_restart = self.registry.on_ice_restart(self._ice_restarted)

        def unsubscribe() -> None:
            unsubscribe_ended()
            unsubscribe_active()
            unsubscribe_restart()

        self._unsubscribe = unsubscribe
        for call in self.registry.calls():  # active before we listened
            if call.state == "active":
                self._call_active(call)
        await self.adopt_kernel_flows()
        self._housekeeper = asyncio.create_task(self._housekeeping())

    async def adopt_kernel_flows(self) -> int:
        """After a restart: take over the flows the kernel kept forwarding.
        Their flow sources are reserved, so a new call can never be given one.
        The maps are walked in a thread, and the legs made in batches that
        yield to the loop: packets wait one batch, not the whole table."""
        if self.datapath is None:
            return 0
        adopted = 0
        for i, flow in enumerate(await asyncio.to_thread(self.datapath.flows)):
            if i % 500 == 499:
                await asyncio.sleep(0)
            if (flow.client, flow.vip) in self.legs:
                continue
            sources = self.sources.get(family_of(flow.client[0]))
            if sources is None or not sources.reserve((flow.flow_port, flow.flow_addr)):
                # The plan shrank since: the kernel no longer returns its packets.
                log.warning("kernel flow %s: flow source %d/%d lies outside the address and port plan",
                            flow.client, flow.flow_addr, flow.flow_port)
                self.stats["flows_outside_plan"] += 1
                continue
            now = time.monotonic()
            leg = Leg(client=flow.client, vip=flow.vip, conn_id=flow.conn_id, flow_port=flow.flow_port,
                      flow_addr=flow.flow_addr, first_seen=now, installed_at=now, ssrc=flow.ssrc)
            self._add_leg(leg)
            self._publish(leg)
            adopted += 1
        if adopted:
            log.info("adopted %d established flows from the kernel", adopted)
        self.stats["flows_adopted"] += adopted
        return adopted

    async def stop(self) -> None:
        """Stop handling packets. Kernel flows are left as they are: the fast
        path keeps forwarding established calls while the manager is away."""
        if self._housekeeper:
            self._housekeeper.cancel()
            try:
                await self._housekeeper
            except asyncio.CancelledError:
                pass
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._unsubscribe:
            self._unsubscribe()
        self.fleet = None  # the kernel keeps these flows: the fleet keeps knowing them
        for leg in list(self.legs.values()):
            self._close_leg(leg, remove_kernel=False)
        for leg in list(self.stream_legs.values()):
            self._close_leg(leg, reason="relay stopping")
        for sock in self.flow_sockets.receivers.values():
            self._loop.remove_reader(sock.fileno())
        for sock in self.public.values():
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self.public.clear()

    def summary(self) -> dict:
        """Counters and state for metrics and the control API."""
        installed = sum(1 for leg in self.legs.values() if leg.installed_at is not None)
        tcp_installed = sum(1 for leg in self.stream_legs.values() if leg.installed_at is not None)
        return {
            "events": {k: v for k, v in sorted(self.stats.items()) if not k.startswith("forward_")},
            "packets": {d: self.stats.get(f"forward_{d}", 0) for d in ("in", "out")},
            "bytes": {d: self.bytes.get(f"forward_{d}", 0) for d in ("in", "out")},
            "legs": {"installed": installed, "pending": len(self.legs) - installed},
            "tcp_legs": {"installed": tcp_installed, "pending": len(self.stream_legs) - tcp_installed},
            "flow_sources": {str(fam): {"in_use": src.in_use, "total": src.size} for fam, src in self.sources.items()},
            # Read from /proc by the housekeeper (never on a scrape, on the loop).
            "queue_bytes": self.queue_bytes,
        }

    # --- packets from clients ----------------------------------------------------------

    def _read_public(self, vip: tuple[str, int], sock: socket.socket) -> None:
        for _ in range(64):  # bounded batch per wake-up, then yield to the loop
            try:
                data, addr = sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ICMP errors surface here; nothing to do
                self.stats["public_socket_error"] += 1
                log.debug("public socket %s: %s", vip, exc)
                continue
            self.on_client_packet(vip, data, (addr[0], addr[1]))

    def on_client_packet(self, vip: tuple[str, int], data: bytes, client: tuple[str, int]) -> None:
        leg = self.legs.get((client, vip))
        if leg is not None:
            if (leg.installed_at is not None and self.datapath is not None
                    and not self.datapath.has_flow(client, vip)):
                # XDP forwards an installed tuple by itself: a packet reaching us
                # for one the kernel no longer holds means it was evicted (the
                # flows map is an LRU). The owner authenticated this exact tuple
                # before (that is what the leg records): install it again. Its
                # media finds the way here through the SSRC index, a check as
                # any new tuple's would.
                self.stats["flows_evicted_seen"] += 1
                self._install(leg, again=True)
                leg.missing_since = None
            self._note_txid(leg, data)
            self._to_owner(leg, data)
            return
        # Whatever XDP still passes up from tuples with no leg (set-up, and
        # anything it cannot admit) is bounded here too: per source first, so
        # that one source cannot spend the budget of all.
        now = time.monotonic()
        if self._source_buckets is not None and not self._source_buckets.take(self.source_key(client[0]), now):
            self.stats["drop_source_backstop"] += 1
            return
        if self._budget is not None and not self._budget.take(None, now):
            self.stats["drop_budget_backstop"] += 1
            return
        if not is_stun(data):
            if self._maybe_rebinding(vip, data, client):
                return
            # Not STUN: XDP drops these; one only gets here without XDP.
            self.stats["drop_unknown_not_stun"] += 1
            return
        admitted = self._admit(data, client)
        if admitted is None:
            return
        call, msg = admitted
        source = self._take_source(client)
        if source is None:
            return
        leg = Leg(client=client, vip=vip, conn_id=call.conn_id, flow_port=source[0], flow_addr=source[1])
        self._add_leg(leg)
        self.stats["legs_opened"] += 1
        tracing.advance("setup", call.conn_id, "install")  # the call's first STUN check: no-op after
        self._note_txid(leg, data, msg)
        self._to_owner(leg, data)


    def _add_leg(self, leg: Leg) -> None:
        self.legs[(leg.client, leg.vip)] = leg
        self._by_source[(leg.family, *leg.source)] = leg
        self._legs_per_call.add(leg.conn_id)
        if leg.installed_at is None:
            self._pending_per_source.add(self.source_key(leg.client[0]))
            self._pending[id(leg)] = leg


    def _owner_of(self, leg: Leg) -> tuple[str, int] | None:
        call = self.registry.get_call(leg.conn_id)
        if call is not None and call.owner is not None:
            return call.owner.for_family(leg.family)
        if leg.installed_at is not None and self.datapath is not None:
            # A flow adopted after a restart, before its transceiver re-reported
            # the call: the kernel's owner entry is the truth.
            found = self.datapath.get_owner(leg.conn_id)
            if found is not None:
                return found[0].for_family(leg.family)
        return None

    def _to_owner(self, leg: Leg, data: bytes) -> None:
        owner = self._owner_of(leg)
        if owner is None:
            self.stats["drop_no_owner"] += 1
            return
        src = (self.flow_sockets.address(leg.family, leg.flow_addr), leg.flow_port)
        try:
            self.flow_sockets.send(src, owner, data)
        except OSError:
            self.stats["drop_send_error"] += 1
            return
        self.stats["forward_in"] += 1
        self.bytes["forward_in"] += len(data)

    # --- packets from owners -------------------------------------------------------------

    def _read_flows(self, family: int) -> None:
        try:
            for data, sender, dst in self.flow_sockets.receive(family):
                idx = self.flow_sockets.index_of(dst[0])
                leg = self._by_source.get((family, dst[1], idx)) if idx is not None else None
                if leg is None:
                    self.stats["drop_no_leg"] += 1  # to a flow source no leg holds
                    continue
                self.on_owner_packet(leg, data, sender)
        except OSError:
            self.stats["flow_socket_error"] += 1

    def on_owner_packet(self, leg: Leg, data: bytes, sender: tuple[str, int]) -> None:
        if sender != self._owner_of(leg):
            self.stats["drop_not_owner"] += 1
            return
        # Installed, yet its owner's packet came here: the return entry is gone (LRU) or older than the owner.
        if (leg.installed_at is not None and leg.stream is None and self.datapath is not None
                and self.datapath.repair_reverse(sender, leg.flow_port, leg.client, leg.vip, leg.conn_id,
                                                 leg.flow_addr)):
            self.stats["returns_repaired"] += 1
        install = False
        if leg.installed_at is None and is_stun(data):
            # The header says whether the owner authenticated one of the leg's
            # checks (a success with its transaction id); the attributes are
            # the client's to read.
            try:
                h = parse_header(data)
            except ValueError:
                h = None
            if h is not None and h.message_class == CLASS_ERROR:
                # An owner's error reply to a check it did not authenticate:
                # sending it on would make the VIP reflect at a spoofed source.
                self.stats["drop_error_to_pending"] += 1
                return
            install = (h is not None and h.method == METHOD_BINDING and h.message_class == CLASS_SUCCESS
                       and h.transaction_id in leg.txids)
            if install:  # the relay ⇄ transceiver round trip of the check (and the owner's answer)
                leg.owner_rtt_ms = round((time.monotonic() - leg.txids[h.transaction_id]) * 1000, 3)
        if leg.stream is not None:
            leg.last_seen = now = time.monotonic()
            if leg.installed_at is not None and leg.media is not None:
                leg.media.down.count(data, now)
            leg.stream(data)
            self.stats["tcp_out"] += 1
        else:
            sock = self.public.get(leg.vip)
            if sock is None:
                return
            try:
                sock.sendto(data, leg.client)
            except OSError:
                self.stats["drop_send_error"] += 1
                return
        self.stats["forward_out"] += 1
        self.bytes["forward_out"] += len(data)
        if install:
            self._install(leg)

    def _install(self, leg: Leg, *, again: bool = False) -> None:
        """The owner authenticated this exact client tuple: hand it to XDP."""
        call = self.registry.get_call(leg.conn_id)
        if call is None or call.owner is None:
            return
        if leg.stream is not None:
            # Bridged in Python both ways: nothing goes to the kernel.
            leg.installed_at = time.monotonic()
            self._release_pending(leg)
            leg.txids.clear()
            self.stats["tcp_legs_installed"] += 1
            # A new connection for a call that had one (the client reconnected
            # after a relay restart): the owner's replies still go to the old
            # flow source; it moves them here, as it answered this leg's check.
            self._spawn(self._repoint(leg, None))
            tracing.advance("setup", leg.conn_id, None)
            if self.on_flow_installed:
                self.on_flow_installed(leg.installed_at - leg.first_seen)
            return
        if self.datapath is not None:
            try:
                cur = self.datapath.get_owner(leg.conn_id)
                if cur is None or cur[0] != call.owner:
                    self.datapath.set_owner(leg.conn_id, call.owner)
                self.datapath.add_flow(leg.client, leg.vip, leg.conn_id, leg.flow_port, call.owner,
                                       flow_addr=leg.flow_addr)
            except (DatapathError, OSError) as exc:
                self.stats["install_failed"] += 1
                log.error("cannot install flow %s for call %s: %s", leg.client, leg.conn_id, exc)
                return
        if again:
            leg.reinstalled_at = time.monotonic()
            self.stats["flows_reinstalled"] += 1
            return
        leg.installed_at = time.monotonic()
        self._release_pending(leg)
        leg.txids.clear()
        self.stats["flows_installed"] += 1
        remote = self.fleet.remote_leg(leg.client, leg.vip) if self.fleet is not None else None
        if remote is not None and remote.source != self._source_addr(leg):
            # The client's checks now reach this relay for a tuple another
            # relay served (failover): the owner's replies must follow.
            self.fleet.replaced(leg.client, leg.vip, remote.relay)
            self._spawn(self._repoint(leg, remote.source))
        self._publish(leg)
        tracing.advance("setup", leg.conn_id, None)  # installed: the relay's part of the set-up is done
        if self.on_flow_installed:
            self.on_flow_installed(leg.installed_at - leg.first_seen)

    # --- the fleet ------------------------------------------------------------------------


    def _spawn(self, coro) -> None:
        self._tasks.spawn(coro)


    def legs_of(self, conn_id: int) -> list[Leg]:
        return [leg for leg in self.legs.values() if leg.conn_id == conn_id]

    def _release_pending(self, leg: Leg) -> None:
        self._pending.pop(id(leg), None)
        self._pending_per_source.remove(self.source_key(leg.client[0]))

    def _close_leg(self, leg: Leg, *, remove_kernel: bool = True, reason: str = "closed") -> None:
        if leg.stream is not None:
            if self.stream_legs.get((leg.client, leg.vip)) is leg:
                del self.stream_legs[(leg.client, leg.vip)]
                self._forget_source(leg)
            if leg.close_stream is not None:
                close, leg.close_stream = leg.close_stream, None
                close(reason)
            return
        if self.legs.get((leg.client, leg.vip)) is leg:
            del self.legs[(leg.client, leg.vip)]
            if leg.installed_at is not None and self.fleet is not None:
                self.fleet.withdraw_leg(leg.conn_id, leg.client, leg.vip)
            self._forget_source(leg)
        if remove_kernel and self.datapath is not None and leg.installed_at is not None:
            try:
                self.datapath.remove_flow(leg.client, leg.vip)
            except (DatapathError, OSError) as exc:
                log.warning("cannot remove flow %s: %s", leg.client, exc)

    def _forget_source(self, leg: Leg) -> None:
        if self._by_source.get((leg.family, *leg.source)) is leg:
            del self._by_source[(leg.family, *leg.source)]
        self.sources[leg.family].give_back(leg.source)
        if leg.installed_at is None:
            self._release_pending(leg)
        self._legs_per_call.remove(leg.conn_id)

    def _call_active(self, call: Call) -> None:
        """A call's checks may come: let its ufrag through XDP's admission."""
        if self.datapath is None:
            return
        try:
            self.datapath.admit_ufrag(call.server_ufrag)
        except (DatapathError, OSError) as exc:
            self.stats["ufrag_admit_failed"] += 1
            log.error("cannot admit the ufrag of call %s: %s", call.conn_id, exc)

    def _ice_restarted(self, call: Call, old_server_ufrag: str) -> None:
        """The call's checks carry its new server ufrag from now on: XDP lets
        those through (a client at a new address) and no longer the old one."""
        if call.state != "active":
            return  # admitted when it becomes active
        self._call_active(call)
        if self.datapath is not None:
            try:
                self.datapath.forget_ufrag(old_server_ufrag)
            except (DatapathError, OSError) as exc:
                log.warning("cannot forget the old ufrag of call %s: %s", call.conn_id, exc)
        self.stats["ice_restarts"] += 1

    def _call_ended(self, call: Call, reason: str) -> None:
        for leg in self.legs_of(call.conn_id):
            self._close_leg(leg)
        for leg in self.stream_legs_of(call.conn_id):
            self._close_leg(leg, reason=f"call ended ({reason})")
        if self.datapath is not None:
            try:
                self.datapath.remove_owner(call.conn_id)
                self.datapath.forget_ufrag(call.server_ufrag)
            except (DatapathError, OSError) as exc:
                log.warning("cannot remove owner of call %s: %s", call.conn_id, exc)
        self.stats["calls_ended"] += 1


# A public socket takes every new tuple's checks: a queue this deep rides out
# the loop's pauses (a housekeeping round, a garbage collection) under a burst
# of call set-ups instead of dropping checks the clients must then resend.
PUBLIC_RCVBUF = 4 << 20


def _udp_socket(bind: tuple[str, int]) -> socket.socket:
    fam = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        if fam == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:  # beyond net.core.rmem_max: needs CAP_NET_ADMIN, which relayd has
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, PUBLIC_RCVBUF)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PUBLIC_RCVBUF)
        sock.setblocking(False)
        sock.bind(bind)
    except OSError:
        sock.close()
        raise
    return sock
