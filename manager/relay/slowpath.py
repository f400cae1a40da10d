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
import errno
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from aioice import stun

from manager.protocol.addresses import family_of
from manager.protocol.rfc7983 import is_stun
from manager.protocol.stun_header import CLASS_ERROR, CLASS_REQUEST, CLASS_SUCCESS, METHOD_BINDING, parse_header
from manager.protocol.tasks import TaskSet
from manager.protocol.ufrag import UfragError, decode_ufrag, parse_stun_username
from manager.relay.kernel.datapath import Datapath, DatapathError
from manager.relay.kernel.flow_sockets import SO_RCVBUFFORCE, FlowSockets
from manager.relay.kernel.structs import flow_key
from manager.relay.registry import Call, Registry

log = logging.getLogger(__name__)

MAX_DATAGRAM = 65535
MAX_PENDING_TXIDS = 32
# Packets of one leg's client held for the owner to authenticate at once (a
# NAT rebinding): the first one proves it; the rest only wait for the answer.
MAX_REBIND_CHECKS = 4

# The owner's check of a held packet: (connection id, SRTP packet) → authentic?
Addr = tuple[str, int]
# (conn_id, packet, path): does the owner take this packet as the call's media?
# With path = (old source, new source) it also re-points the call's replies.
MediaCheck = Callable[..., Awaitable[bool]]
Repoint = Callable[[int, Addr | None, Addr], Awaitable[bool]]


class LegDirectory(Protocol):
    """The fleet's view of client tuples (manager.relay.fleet.RedisFleet)."""

    def publish_leg(self, conn_id: int, client: Addr, vip: Addr, source: Addr, ssrc: int = 0) -> None: ...
    def withdraw_leg(self, conn_id: int, client: Addr, vip: Addr) -> None: ...
    def remote_leg(self, client: Addr, vip: Addr): ...
    def others_serve(self, conn_id: int) -> bool: ...
    def replaced(self, client: Addr, vip: Addr, relay: str) -> None: ...


@dataclass
class Leg:
    """One client tuple of a call, as seen on the public address."""

    client: tuple[str, int]
    vip: tuple[str, int]
    conn_id: int
    flow_port: int
    flow_addr: int = 0  # index into the family's pool of internal addresses
    first_seen: float = field(default_factory=time.monotonic)
    installed_at: float | None = None
    # When the housekeeper first found the kernel without this installed
    # tuple (evicted from the LRU); None while the kernel holds it.
    missing_since: float | None = None
    # Binding request transaction ids forwarded to the owner for this tuple.
    txids: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    # Media checks of a new client tuple under way (NAT rebinding).
    rebind_checks: int = 0
    ssrc: int = 0  # first RTP SSRC the kernel saw, once published to the fleet
    # A stream leg (ICE-TCP): how the owner's packets reach the client, and how
    # the slow path closes the connection (call ended, never authenticated).
    stream: Callable[[bytes], None] | None = None
    close_stream: Callable[[str], None] | None = None
    last_seen: float = field(default_factory=time.monotonic)
    # The flows-map key of (client, vip), kept until either changes (a rebinding).
    _key_for: tuple | None = field(default=None, repr=False, compare=False)
    _key_bytes: bytes = field(default=b"", repr=False, compare=False)

    @property
    def kernel_key(self) -> bytes:
        """This tuple's flows-map key, as the housekeeper's walk reports it."""
        tup = (self.client, self.vip)
        if self._key_for != tup:
            self._key_bytes, self._key_for = bytes(flow_key(*tup)), tup
        return self._key_bytes

    @property
    def family(self) -> int:
        return family_of(self.client[0])

    @property
    def source(self) -> tuple[int, int]:
        """The flow source as the datapath takes it: (flow port, pool index)."""
        return self.flow_port, self.flow_addr

    @property
    def transport(self) -> str:
        return "udp" if self.stream is None else "tcp"

    def to_dict(self) -> dict:
        return {"client": list(self.client), "vip": list(self.vip), "transport": self.transport,
                "conn_id": self.conn_id,
                "flow_port": self.flow_port, "flow_addr": self.flow_addr, "installed": self.installed_at is not None,
                "setup_ms": round((self.installed_at - self.first_seen) * 1000, 3) if self.installed_at else None}


class FlowSources:
    """The flow sources of one family: `addresses` pool addresses x the ports
    lo..hi. Never-used sources go first (spread over the addresses), then
    freed ones in the order they were freed, so a source is reused as late as
    possible (late packets of an old call find no entry rather than a new
    call). Nothing is materialised up front: a million sources cost nothing
    until used."""

    def __init__(self, addresses: int, lo: int, hi: int):
        self.addresses = addresses
        self.lo = lo
        self.size = addresses * (hi - lo + 1)
        self._next = 0                       # ids from here on were never handed out
        self._freed: collections.deque[int] = collections.deque()
        self._in_use: set[int] = set()

    def _id(self, source: tuple[int, int]) -> int:
        port, addr = source
        return (port - self.lo) * self.addresses + addr

    def take(self) -> tuple[int, int]:
        """A free (port, pool index)."""
        while True:
            if self._next < self.size:
                sid = self._next
                self._next += 1
            elif self._freed:
                sid = self._freed.popleft()
            else:
                raise OSError(errno.EADDRNOTAVAIL, f"all {self.size} flow sources are in use")
            if sid not in self._in_use:  # a reserved id, or a duplicate after reserve+free
                self._in_use.add(sid)
                return self.lo + sid // self.addresses, sid % self.addresses

    def give_back(self, source: tuple[int, int]) -> None:
        sid = self._id(source)
        if sid in self._in_use:
            self._in_use.discard(sid)
            self._freed.append(sid)

    def reserve(self, source: tuple[int, int]) -> bool:
        """Mark a source in use (a flow adopted from the kernel); False if it lies outside."""
        port, addr = source
        if not (0 <= addr < self.addresses and 0 <= port - self.lo < self.size // self.addresses):
            return False
        self._in_use.add(self._id(source))
        return True

    @property
    def in_use(self) -> int:
        return len(self._in_use)


class SlowPath:
    """Slow path for a set of VIPs; see the module docstring."""

    def __init__(self, registry: Registry, datapath: Datapath | None, flow_sockets: FlowSockets, *,
                 hint_key: bytes, vips: list[tuple[str, int]], idle_timeout: float = 30.0,
                 pending_timeout: float = 5.0, max_legs_per_call: int = 4, max_pending_per_source: int = 8,
                 on_flow_installed: Callable[[float], None] | None = None,
                 check_media: MediaCheck | None = None, on_rebound: Callable[[float], None] | None = None,
                 fleet: LegDirectory | None = None, repoint: Repoint | None = None):
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
        self._legs_per_call: collections.Counter[int] = collections.Counter()
        self._pending_per_source: collections.Counter[str] = collections.Counter()
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

        def unsubscribe() -> None:
            unsubscribe_ended()
            unsubscribe_active()

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
        self._note_txid(leg, data, msg)
        self._to_owner(leg, data)

    def _admit(self, data: bytes, client: Addr) -> tuple[Call, stun.Message] | None:
        """A new client tuple's first packet: a Binding request whose USERNAME
        carries a valid routing hint, for a live call with an owner in the
        client's family, within the per-call and per-source bounds; None
        (counted) otherwise."""
        try:
            msg = stun.parse_message(data)
        except ValueError:
            self.stats["drop_malformed_stun"] += 1
            return None
        if msg.message_method != stun.Method.BINDING or msg.message_class != stun.Class.REQUEST:
            self.stats["drop_not_binding_request"] += 1
            return None
        username = msg.attributes.get("USERNAME")
        if not username:
            self.stats["drop_no_username"] += 1
            return None
        try:
            server_ufrag, _ = parse_stun_username(username)
            hint = decode_ufrag(self.hint_key, server_ufrag)
        except UfragError:
            self.stats["drop_forged_hint"] += 1
            return None
        call = self.registry.get_call(hint.conn_id)
        if call is None or call.state != "active":
            self.stats["drop_unknown_call"] += 1
            return None
        if call.server_ufrag != server_ufrag:
            # A valid MAC for a connection id that now belongs to another call.
            self.stats["drop_stale_hint"] += 1
            return None
        owner = call.owner.for_family(family_of(client[0])) if call.owner else None
        if owner is None or self.sources.get(family_of(client[0])) is None:
            self.stats["drop_no_owner_in_family"] += 1
            return None
        if self._legs_per_call[call.conn_id] >= self.max_legs_per_call:
            self.stats["drop_leg_cap"] += 1
            return None
        if self._pending_per_source[client[0]] >= self.max_pending_per_source:
            self.stats["drop_source_pending_cap"] += 1
            return None
        return call, msg

    def _take_source(self, client: Addr) -> tuple[int, int] | None:
        try:
            return self.sources[family_of(client[0])].take()
        except OSError as exc:
            self.stats["drop_no_flow_port"] += 1
            log.warning("no flow source for %s: %s", client, exc)
            return None

    # --- ICE-TCP stream legs (tcp_bridge.py) ---------------------------------------------

    def open_stream_leg(self, listener: Addr, data: bytes, client: Addr, *, send: Callable[[bytes], None],
                        close: Callable[[str], None]) -> Leg | None:
        """The first frame of an ICE-TCP connection: admitted as a new UDP
        tuple's first packet is, then sent to the owner from a flow source of
        its own. None (counted) if refused: the bridge closes the connection."""
        if not is_stun(data):
            self.stats["tcp_drop_not_stun"] += 1
            return None
        admitted = self._admit(data, client)
        if admitted is None:
            return None
        call, msg = admitted
        source = self._take_source(client)
        if source is None:
            return None
        leg = Leg(client=client, vip=listener, conn_id=call.conn_id, flow_port=source[0], flow_addr=source[1],
                  stream=send, close_stream=close)
        self.stream_legs[(client, listener)] = leg
        self._by_source[(leg.family, *leg.source)] = leg
        self._legs_per_call[leg.conn_id] += 1
        self._pending_per_source[client[0]] += 1
        self._pending[id(leg)] = leg
        self.stats["tcp_legs_opened"] += 1
        self._note_txid(leg, data, msg)
        self._to_owner(leg, data)
        return leg

    def stream_packet(self, leg: Leg, data: bytes) -> None:
        """A later frame of a stream leg: to the call's current owner. Until the
        owner's success only Binding requests pass (on UDP, XDP drops the rest)."""
        leg.last_seen = time.monotonic()
        if leg.installed_at is None:
            if not is_stun(data):
                self.stats["tcp_drop_before_success"] += 1
                return
            self._note_txid(leg, data)
        self.stats["tcp_in"] += 1
        self._to_owner(leg, data)

    def close_stream_leg(self, leg: Leg, *, settle: bool = True) -> None:
        """The connection is gone: free the leg, and (`settle`) end the call if
        nothing else carries it. A relay stopping does not settle: its calls
        are not over (the registry may be shared, the client may reconnect)."""
        if self.stream_legs.get((leg.client, leg.vip)) is not leg:
            return
        self._close_leg(leg)
        self.stats["tcp_legs_closed"] += 1
        if settle and leg.installed_at is not None:
            self._settle({leg.conn_id})

    def stream_legs_of(self, conn_id: int) -> list[Leg]:
        return [leg for leg in self.stream_legs.values() if leg.conn_id == conn_id]

    def _add_leg(self, leg: Leg) -> None:
        self.legs[(leg.client, leg.vip)] = leg
        self._by_source[(leg.family, *leg.source)] = leg
        self._legs_per_call[leg.conn_id] += 1
        if leg.installed_at is None:
            self._pending_per_source[leg.client[0]] += 1
            self._pending[id(leg)] = leg

    def _note_txid(self, leg: Leg, data: bytes, msg: stun.Message | None = None) -> None:
        if leg.installed_at is not None or not data or data[0] > 1:
            return
        if msg is not None:
            request = msg.message_method == stun.Method.BINDING and msg.message_class == stun.Class.REQUEST
            txid = msg.transaction_id
        else:
            try:  # the header says all we keep: no need to decode the attributes
                h = parse_header(data)
            except ValueError:
                return
            request, txid = h.method == METHOD_BINDING and h.message_class == CLASS_REQUEST, h.transaction_id
        if request:
            leg.txids[txid] = True
            while len(leg.txids) > MAX_PENDING_TXIDS:
                leg.txids.popitem(last=False)

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
        if leg.stream is not None:
            leg.last_seen = time.monotonic()
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
        if self.on_flow_installed:
            self.on_flow_installed(leg.installed_at - leg.first_seen)

    # --- the fleet ------------------------------------------------------------------------

    def _source_addr(self, leg: Leg) -> Addr:
        return (self.flow_sockets.address(leg.family, leg.flow_addr), leg.flow_port)

    def _publish(self, leg: Leg) -> None:
        if self.fleet is not None:
            self.fleet.publish_leg(leg.conn_id, leg.client, leg.vip, self._source_addr(leg), leg.ssrc)

    def _spawn(self, coro) -> None:
        self._tasks.spawn(coro)

    async def _repoint(self, leg: Leg, old: Addr | None) -> None:
        if self.repoint is None:
            return
        try:
            ok = await self.repoint(leg.conn_id, old, self._source_addr(leg))
        except Exception as exc:  # the owner's next consent check from here retries
            self.stats["repoint_failed"] += 1
            log.warning("re-pointing call %s to %s failed: %s", leg.conn_id, self._source_addr(leg), exc)
            return
        self.stats["repointed" if ok else "repoint_refused"] += 1

    def publish_ssrcs(self) -> None:
        """Tell the fleet each installed leg's SSRC once XDP has seen one, so
        that another relay can recognise the call's media (failover)."""
        if self.fleet is None or self.datapath is None:
            return
        for leg in list(self.legs.values()):
            if leg.installed_at is None or leg.ssrc:
                continue
            try:
                ssrc = self.datapath.flow_ssrc(leg.client, leg.vip)
            except (DatapathError, OSError):
                continue
            if ssrc:
                leg.ssrc = ssrc
                self._publish(leg)

    def remote_leg_known(self, remote) -> None:
        """Another relay serves this tuple: index its SSRC here, so the
        client's media reaches this slow path if its packets ever come here."""
        if self.datapath is None or not remote.ssrc or (remote.client, remote.vip) in self.legs:
            return
        try:
            self.datapath.index_ssrc(remote.ssrc, remote.client, remote.vip)
        except (DatapathError, OSError, ValueError) as exc:
            log.warning("cannot index SSRC of call %s: %s", remote.conn_id, exc)

    def owner_moved(self, call: Call, previous) -> None:
        """Another relay moved a call (migration): this relay's legs of it now
        return from the new owner. Same order as the migrator's flip: return
        entries for the new owner, the owner entry, then the old entries go."""
        if self.datapath is None or call.owner is None:
            return
        legs = [leg for leg in self.legs_of(call.conn_id) if leg.installed_at is not None]
        try:
            staged = []
            for leg in legs:
                ep = call.owner.for_family(leg.family)
                if ep is not None:
                    self.datapath.add_reverse(ep, leg.flow_port, leg.client, leg.vip, call.conn_id, leg.flow_addr)
                    staged.append((ep, leg.source))
            cur = self.datapath.get_owner(call.conn_id)
            if (legs or cur is not None) and (cur is None or cur[0] != call.owner):
                self.datapath.set_owner(call.conn_id, call.owner)
            for leg in legs:
                ep = previous.for_family(leg.family) if previous else None
                if ep is not None and (ep, leg.source) not in staged:
                    self.datapath.remove_reverse(ep, *leg.source)
        except (DatapathError, OSError) as exc:
            log.error("cannot apply the move of call %s: %s", call.conn_id, exc)
            return
        self.stats["owner_moves_applied"] += 1

    def _maybe_failover(self, found: tuple[Addr, Addr], client: Addr, vip: Addr, data: bytes) -> bool:
        """Media of a call another relay served (its SSRC was indexed from the
        fleet): that relay is gone or the route moved. The owner authenticates
        the packet and re-points its replies; then the flow is installed here."""
        remote = self.fleet.remote_leg(*found) if self.fleet is not None else None
        if remote is None:
            return False
        key = (client, vip)
        if key in self._taking_over or key in self.legs:
            self.stats["drop_failover_busy"] += 1
            return True
        call = self.registry.get_call(remote.conn_id)
        if (call is None or call.state != "active" or self.sources.get(family_of(client[0])) is None
                or self.check_media is None):
            self.stats["drop_failover_unknown_call"] += 1
            return True
        source = self._take_source(client)
        if source is None:
            return True
        leg = Leg(client=client, vip=vip, conn_id=call.conn_id, flow_port=source[0], flow_addr=source[1])
        self._add_leg(leg)
        self._taking_over.add(key)
        self.stats["failover_checks"] += 1
        self._spawn(self._take_over(leg, remote, data, time.monotonic()))
        return True

    async def _take_over(self, leg: Leg, remote, data: bytes, t0: float) -> None:
        key = (leg.client, leg.vip)
        try:
            authentic = await self.check_media(leg.conn_id, data, path=(remote.source, self._source_addr(leg)))
        except Exception as exc:
            authentic = False
            log.warning("failover check for call %s from %s failed: %s", leg.conn_id, leg.client, exc)
        finally:
            self._taking_over.discard(key)
        if not authentic:
            self.stats["failover_refused"] += 1
            self._close_leg(leg)
            return
        if self.legs.get(key) is not leg:
            return
        self.stats["forward_in"] += 1  # the owner took the packet as media
        self.bytes["forward_in"] += len(data)
        leg.ssrc = remote.ssrc
        self.fleet.replaced(leg.client, leg.vip, remote.relay)
        self._install(leg)
        self.stats["failovers"] += 1
        log.info("call %s: took over %s from relay %s in %.1f ms", leg.conn_id, leg.client, remote.relay,
                 (time.monotonic() - t0) * 1000)

    # --- NAT rebinding ---------------------------------------------------------------------

    def _maybe_rebinding(self, vip: tuple[str, int], data: bytes, client: tuple[str, int]) -> bool:
        """Media from an unknown tuple with the SSRC of an installed leg (XDP
        passed it as pass_rebind): the client may have moved behind its NAT.
        The packet goes to the owner to authenticate; only then does the leg
        move. False if it is nothing of the kind."""
        if self.datapath is None or not 128 <= (data[0] if data else 0) <= 191:
            return False
        found = self.datapath.ssrc_flow(data)
        leg = self.legs.get(found) if found is not None and found[1] == vip else None
        if leg is None and found is not None and found[1] == vip and self._maybe_failover(found, client, vip, data):
            return True
        if leg is None or leg.installed_at is None:
            self.stats["drop_rebind_no_leg"] += 1
            return True
        if self.check_media is None:
            self.stats["drop_rebind_unchecked"] += 1
            return True
        if leg.rebind_checks >= MAX_REBIND_CHECKS:
            self.stats["drop_rebind_busy"] += 1
            return True
        leg.rebind_checks += 1
        self.stats["rebind_checks"] += 1
        self._spawn(self._check_rebinding(leg, client, data, time.monotonic()))
        return True

    async def _check_rebinding(self, leg: Leg, client: tuple[str, int], data: bytes, t0: float) -> None:
        try:
            authentic = await self.check_media(leg.conn_id, data)
        except Exception as exc:  # the owner unreachable: the client's next packet asks again
            self.stats["rebind_check_failed"] += 1
            log.warning("media check for call %s from %s failed: %s", leg.conn_id, client, exc)
            return
        finally:
            leg.rebind_checks -= 1
        if not authentic:
            self.stats["rebind_refused"] += 1
            return
        self.stats["forward_in"] += 1  # the owner took the packet as media
        self.bytes["forward_in"] += len(data)
        self._rebind(leg, client, t0)

    def _rebind(self, leg: Leg, client: tuple[str, int], t0: float) -> None:
        old = (leg.client, leg.vip)
        if self.legs.get(old) is not leg or (client, leg.vip) in self.legs:
            return  # the leg ended, or another check moved it already
        if self.datapath is not None:
            try:
                if not self.datapath.rebind_flow(leg.client, client, leg.vip):
                    self.stats["rebind_lost_flow"] += 1
                    return
            except (DatapathError, OSError) as exc:
                self.stats["install_failed"] += 1
                log.error("cannot move flow %s to %s: %s", leg.client, client, exc)
                return
        del self.legs[old]
        log.info("call %s: client moved %s -> %s (authenticated by its owner in %.1f ms)", leg.conn_id, leg.client,
                 client, (time.monotonic() - t0) * 1000)
        if self.fleet is not None:
            self.fleet.withdraw_leg(leg.conn_id, leg.client, leg.vip)
        leg.client = client
        leg.missing_since = None
        self.legs[(client, leg.vip)] = leg
        self._publish(leg)
        self.stats["legs_rebound"] += 1
        if self.on_rebound:
            self.on_rebound(time.monotonic() - t0)

    # --- ends and expiry -------------------------------------------------------------------

    def legs_of(self, conn_id: int) -> list[Leg]:
        return [leg for leg in self.legs.values() if leg.conn_id == conn_id]

    def _release_pending(self, leg: Leg) -> None:
        self._pending.pop(id(leg), None)
        n = self._pending_per_source[leg.client[0]] - 1
        if n > 0:
            self._pending_per_source[leg.client[0]] = n
        else:
            self._pending_per_source.pop(leg.client[0], None)

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
        n = self._legs_per_call[leg.conn_id] - 1
        if n > 0:
            self._legs_per_call[leg.conn_id] = n
        else:
            self._legs_per_call.pop(leg.conn_id, None)

    def _call_active(self, call: Call) -> None:
        """A call's checks may come: let its ufrag through XDP's admission."""
        if self.datapath is None:
            return
        try:
            self.datapath.admit_ufrag(call.server_ufrag)
        except (DatapathError, OSError) as exc:
            self.stats["ufrag_admit_failed"] += 1
            log.error("cannot admit the ufrag of call %s: %s", call.conn_id, exc)

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

    def expire(self, now: float | None = None) -> None:
        """Drop legs that never got a success response, flows idle either way
        for idle_timeout, and calls left with no flow (all on the caller's
        thread; the housekeeper walks the kernel map off the event loop)."""
        self.expire_pending(time.monotonic() if now is None else now)
        if self.datapath is not None:
            self.after_kernel_expiry(self.datapath.expire_idle(self.idle_timeout))

    def expire_pending(self, now: float) -> None:
        for leg in list(self._pending.values()):  # only the legs still waiting: not every leg
            if leg.installed_at is not None:
                self._pending.pop(id(leg), None)
            elif now - leg.first_seen > self.pending_timeout:
                self._close_leg(leg, reason="the owner never answered a check")
                self._pending.pop(id(leg), None)
                self.stats["legs_expired_pending"] += 1

    def after_kernel_expiry(self, expired: list) -> None:
        """Close the legs of flows the kernel walk removed; end calls left without any."""
        touched = set()
        for flow in expired:
            touched.add(flow.conn_id)
            leg = self.legs.get((flow.client, flow.vip))
            if leg is not None:
                self._close_leg(leg, remove_kernel=False)
            self.stats["flows_expired_idle"] += 1
        self._settle(touched)

    def evicted(self, kept: set) -> set:
        """Installed tuples whose flows-map key is not among `kept` (what an
        expiry walk found in the kernel)."""
        return {k for k, leg in self.legs.items() if leg.installed_at is not None and leg.kernel_key not in kept}

    def sweep_evicted(self, missing: set, now: float) -> None:
        """Installed legs the kernel lost (LRU eviction) and that no STUN has
        brought back within idle_timeout: their client is gone. Close them
        and end calls left without a leg."""
        touched = set()
        for key, leg in list(self.legs.items()):
            if leg.installed_at is None:
                continue
            if key not in missing:
                leg.missing_since = None
            elif leg.missing_since is None:
                leg.missing_since = now
            elif now - leg.missing_since > self.idle_timeout:
                self._close_leg(leg, remove_kernel=False)
                touched.add(leg.conn_id)
                self.stats["legs_expired_evicted"] += 1
        self._settle(touched)

    def _settle(self, touched: set[int]) -> None:
        for conn_id in touched:
            if self.legs_of(conn_id) or self.stream_legs_of(conn_id):
                continue
            if self.fleet is not None and self.fleet.others_serve(conn_id):
                self.stats["idle_served_elsewhere"] += 1  # the client's packets go to another relay now
                continue
            if self.registry.get_call(conn_id) is not None:
                self.registry.end_call(conn_id, "idle-timeout")  # its end removes the owner entry
            else:
                # A call the registry does not know (adopted after a restart
                # and never reported again): its owner entry goes with its
                # last flow, or the owners map (a plain hash) fills up.
                try:
                    if self.datapath.remove_owner(conn_id):
                        self.stats["owners_removed_unknown"] += 1
                except (DatapathError, OSError) as exc:
                    log.warning("cannot remove owner of unknown call %s: %s", conn_id, exc)

    async def _housekeeping(self) -> None:
        period = max(0.5, min(self.idle_timeout, self.pending_timeout) / 4)
        # The kernel walk costs in proportion to the flows held (batched reads,
        # but Python work per entry), and idle flows need not go to the
        # second: a quarter of the idle timeout apart, not every round.
        walk_every = max(period, self.idle_timeout / 4)
        walked = time.monotonic()
        while True:
            await asyncio.sleep(period)
            try:
                self.expire_pending(time.monotonic())
                if self.datapath is not None:
                    if time.monotonic() - walked >= walk_every:
                        walked = time.monotonic()
                        # A thread walks the map; the loop keeps serving packets and APIs.
                        kept: set = set()
                        expired = await asyncio.to_thread(self.datapath.expire_idle, self.idle_timeout, kept=kept)
                        self.after_kernel_expiry(expired)
                        self.sweep_evicted(self.evicted(kept), time.monotonic())
                    self.publish_ssrcs()
                fds = [s.fileno() for s in self.public.values()]
                self.queue_bytes = await asyncio.to_thread(public_queue_bytes, fds)
            except Exception:  # keep the slow path alive; the next round retries
                log.exception("slow-path housekeeping failed")


def public_queue_bytes(fds: list[int]) -> int:
    """Bytes queued on these UDP sockets (rx_queue of /proc/net/udp{,6})."""
    inodes = {str(os.fstat(fd).st_ino) for fd in fds}
    total = 0
    for path in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if len(cols) > 9 and cols[9] in inodes:
                        total += int(cols[4].split(":")[1], 16)
        except OSError:
            continue
    return total


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
