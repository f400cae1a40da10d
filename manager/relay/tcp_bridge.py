"""ICE-TCP on the relay's public addresses, for clients that cannot use UDP.

The answer carries an RFC 6544 passive TCP candidate at each VIP address (on
`tcp.port`, 443 by default, below the UDP candidates' priority). A client's
active candidate connects; every packet then travels in an RFC 4571 frame
(a 16-bit length, then the packet). The first frame must be a STUN Binding
request whose ufrag hint verifies, exactly as a new UDP tuple's first packet
(SlowPath._admit); the connection becomes a *stream leg* of the slow path,
with a flow source of its own, and the transceiver sees an ordinary UDP peer
(it stays UDP-only and unaware of TCP). Until the owner answers a check with
a success, only Binding requests go to it. Both directions stay in Python.

Before any of this, XDP drops a source's SYNs to the ICE-TCP port beyond its
SYN rate (bpf/relay.bpf.c syn_admit, tcp.syn_rate_per_source): a flood of
connections costs relayd only what that bucket admits.

A proxy in `trusted_proxies` starts each connection with a PROXY protocol
header (manager.protocol.proxy_protocol) naming the client, whom the
per-source limits then count; from anyone else no header is read.

Limits: connections at once (all sources, and per source: an IPv4 address
or an IPv6 /64, manager.protocol.sources.SourceKey), a handshake timeout
(the owner's success within `handshake_timeout` of the connect, the first
frame included), an idle timeout (no frame either way),
the largest frame accepted, and the bytes queued to a slow client (frames to
it are dropped beyond, as UDP would lose them). Either side's close tears
the other down: the client's close frees the leg (and ends a call nothing
else carries); the call's end closes the connection. When a limit is
reached, the oldest connection the owner has not authenticated yet (of that
source, or of all) is closed to make room: connections opened and left
silent cannot keep a real client out, and an authenticated call is never
closed for a newcomer.

A kernel fast path for this later: sockmap/sk_msg can splice a TCP stream's
messages to another socket without a trip through userspace, but the frames
must become UDP datagrams towards the owner (and back), which sk_msg cannot
produce; it would take a BPF program parsing RFC 4571 in sk_skb's stream
parser and a UDP socket redirect that the kernel does not offer today.
docs/tcp.md has the details.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass

from manager.protocol.addresses import family_of
from manager.protocol.proxy_protocol import ProxyHeaderError, ProxyHeaderParser
from manager.protocol.rfc4571 import FrameError, FrameParser, frame
from manager.protocol.sources import SourceKey, TokenBuckets, TrustedProxies
from manager.protocol.tasks import TaskSet
from manager.relay.config import TcpConfig
from manager.relay.slowpath import Leg, SlowPath

log = logging.getLogger(__name__)

@dataclass(eq=False)
class Connection:
    client: tuple[str, int]
    source: str  # SourceKey of the client
    listener: tuple[str, int]
    transport: asyncio.Transport
    opened: float
    parser: FrameParser
    leg: Leg | None = None
    # From a trusted proxy, until its PROXY header has named the client:
    # client and source are the proxy's meanwhile, and count nowhere.
    proxy_header: ProxyHeaderParser | None = None
    closed_by: str | None = None  # why the relay closed it

    @property
    def authenticated(self) -> bool:
        return self.leg is not None and self.leg.installed_at is not None


class _Stream(asyncio.Protocol):
    """One accepted connection: bytes in → frames → the bridge. A protocol,
    not a StreamReader: a data_received call parses every frame it holds
    without a coroutine switch per frame."""

    def __init__(self, bridge: TcpBridge) -> None:
        self.bridge = bridge
        self.conn: Connection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn = self.bridge._accepted(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if self.conn is not None:
            self.bridge._received(self.conn, data)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.bridge._lost(self.conn, exc)


class TcpBridge:
    """The ICE-TCP listeners and their connections (see the module docstring)."""

    def __init__(self, slowpath: SlowPath, cfg: TcpConfig, hosts: list[str], *,
                 source_key: SourceKey | None = None) -> None:
        self.slowpath = slowpath
        self.cfg = cfg
        self.hosts = hosts
        self.source_key = source_key or SourceKey()
        self.proxies = TrustedProxies(cfg.trusted_proxies)  # their PROXY header names the client
        self.listeners: list[socket.socket] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening = TaskSet("ICE-TCP bridge", log)
        # New connections per source and second: what a flood from one source
        # (an IPv6 /64 of addresses) costs is a refused accept, not a bridge slot.
        self._accepts = TokenBuckets(cfg.accept_rate_per_source, cfg.accept_burst_per_source)
        self.connections: set[Connection] = set()
        # Connections by source, and every connection, in the order they
        # opened: the oldest unauthenticated one is found from the front.
        self.by_source: dict[str, OrderedDict[Connection, None]] = {}
        self._opened: OrderedDict[Connection, None] = OrderedDict()
        self.stats: collections.Counter[str] = collections.Counter()
        self._housekeeper: asyncio.Task[None] | None = None

    @property
    def listening(self) -> list[tuple[str, int]]:
        return [(h, self.cfg.port) for h in self.hosts]

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        for host in self.hosts:
            try:
                sock = _listen(host, self.cfg.port)
            except OSError as exc:
                await self.stop()
                raise OSError(exc.errno, f"tcp.port {self.cfg.port} on {host}: {exc.strerror}") from None
            self.listeners.append(sock)
            loop.add_reader(sock.fileno(), self._accept, sock)
        self._housekeeper = loop.create_task(self._housekeeping())
        log.info("ICE-TCP listening on %s", ", ".join(f"{h}:{self.cfg.port}" for h in self.hosts))

    def stop_accepting(self) -> None:
        """Close the listening sockets (a new connection is refused); open ones go on."""
        for sock in self.listeners:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self.listeners.clear()

    async def stop(self) -> None:
        if self._housekeeper is not None:
            self._housekeeper.cancel()
            self._housekeeper = None
        self.stop_accepting()
        await self._opening.close()
        for conn in list(self.connections):
            self._close(conn, "relay stopping", settle=False)

    def summary(self) -> dict:
        return {"listening": [f"{h}:{p}" for h, p in self.listening], "connections": len(self.connections),
                "sources": len(self.by_source),
                "largest_source": max((len(c) for c in self.by_source.values()), default=0),
                "events": dict(sorted(self.stats.items()))}

    # -- connections ------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        """Accept what is queued (a bounded batch per wake-up). A source over
        its accept rate is reset at once: no transport, no slot, no eviction."""
        for _ in range(64):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, or the peer already gone
                self.stats["accept_error"] += 1
                log.debug("ICE-TCP accept: %s", exc)
                return
            # A trusted proxy's connections are many clients': their accept
            # rate is charged once the PROXY header names the client.
            if not self.proxies.trusts(peer[0]) and not self._accepts.take(self.source_key(peer[0]), time.monotonic()):
                self.stats["refused_accept_rate"] += 1
                _reset(sock)
                continue
            sock.setblocking(False)
            self._opening.spawn(self._open(sock))

    async def _open(self, sock: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(lambda: _Stream(self), sock)
        except OSError:  # the peer is gone already: counted, not logged (a peer can repeat it at will)
            self.stats["accept_error"] += 1
            sock.close()

    def _accepted(self, transport: asyncio.Transport) -> Connection | None:
        peer, local = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        client, listener = (peer[0], peer[1]), (local[0], local[1])
        proxied = self.proxies.trusts(client[0])
        source = self.source_key(client[0])
        if not proxied and not self._room_in_source(source):
            transport.abort()
            return None
        if len(self.connections) >= self.cfg.max_connections and not self._evict_oldest(self._opened,
                                                                                          "max_connections"):
            self.stats["refused_max_connections"] += 1
            transport.abort()
            return None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # media: no Nagle delay
        transport.set_write_buffer_limits(high=self.cfg.write_buffer)
        conn = Connection(client=client, source=source, listener=listener, transport=transport,
                          opened=time.monotonic(), parser=FrameParser(self.cfg.max_frame),
                          proxy_header=ProxyHeaderParser() if proxied else None)
        self.connections.add(conn)
        if not proxied:
            self.by_source.setdefault(source, OrderedDict())[conn] = None
        self._opened[conn] = None
        self.stats["accepted"] += 1
        return conn

    def _room_in_source(self, source: str) -> bool:
        """Whether `source` may hold one more connection (its oldest
        unauthenticated one closed for it if need be); counted if not."""
        mine = self.by_source.get(source, {})
        if len(mine) >= self.cfg.max_per_source and not self._evict_oldest(mine, "per_source"):
            self.stats["refused_per_source"] += 1
            return False
        return True

    def _proxied(self, conn: Connection, data: bytes) -> bytes | None:
        """A trusted proxy's connection, until its PROXY header is complete:
        then the client it names is the connection's, under that client's
        accept rate and per-source limit, and the bytes after the header are
        returned. None: more header to come, or the connection closed."""
        try:
            got = conn.proxy_header.feed(data)
        except ProxyHeaderError as exc:
            self.stats["closed_bad_proxy_header"] += 1
            self._close(conn, f"PROXY header: {exc}")
            return None
        if got is None:
            return None
        client, rest = got
        conn.proxy_header = None
        if client is not None:  # else the proxy's own connection (a health check): it stays the source
            conn.client, conn.source = client, self.source_key(client[0])
        if not self._accepts.take(conn.source, time.monotonic()):
            self.stats["refused_accept_rate"] += 1
            self._close(conn, "over its source's accept rate")
            return None
        if not self._room_in_source(conn.source):
            self._close(conn, "its source is full")
            return None
        self.by_source.setdefault(conn.source, OrderedDict())[conn] = None
        self.stats["proxied"] += 1
        return rest

    def _evict_oldest(self, conns: OrderedDict[Connection, None], limit: str) -> bool:
        """Close the oldest unauthenticated connection of `conns` to make
        room; False if every one is authenticated (the newcomer is refused)."""
        if conns is self._opened:
            # Authenticated connections never become victims: they leave the
            # line as they are met, so the search stays short under a flood.
            while conns and next(iter(conns)).authenticated:
                conns.popitem(last=False)
            victim = next(iter(conns), None)
        else:  # one source's: at most max_per_source
            victim = next((c for c in conns if not c.authenticated), None)
        if victim is None:
            return False
        self.stats[f"evicted_{limit}"] += 1
        self._close(victim, f"closed for a newer connection (tcp.{limit} reached)")
        return True

    def _received(self, conn: Connection, data: bytes) -> None:
        if conn.proxy_header is not None:
            data = self._proxied(conn, data)
            if not data:
                return
        try:
            packets = conn.parser.feed(data)
        except FrameError as exc:
            self.stats["closed_bad_frame"] += 1
            self._close(conn, str(exc))
            return
        for packet in packets:
            if conn.closed_by is not None:
                return
            self.stats["frames_in"] += 1
            if conn.leg is None:
                conn.leg = self.slowpath.open_stream_leg(
                    conn.listener, packet, conn.client,
                    send=lambda data, c=conn: self._send(c, data),
                    close=lambda reason, c=conn: self._close(c, reason))
                if conn.leg is None:
                    self.stats["closed_refused"] += 1
                    self._close(conn, "first frame refused")
                    return
            else:
                self.slowpath.stream_packet(conn.leg, packet)

    def _lost(self, conn: Connection, exc: Exception | None) -> None:
        if conn.closed_by is None:
            self.stats["closed_by_client" if exc is None else "closed_error"] += 1
        self._close(conn, "closed by the client" if exc is None else f"connection error: {exc}")

    def expire(self, now: float) -> None:
        """Close connections past the handshake timeout (no owner's success
        yet) or idle both ways past the idle timeout."""
        cfg = self.cfg
        for conn in list(self.connections):
            leg = conn.leg
            if leg is None or leg.installed_at is None:
                if now - conn.opened > cfg.handshake_timeout:
                    self.stats["closed_handshake_timeout"] += 1
                    self._close(conn, "no STUN success within tcp.handshake_timeout")
            elif now - leg.last_seen > cfg.idle_timeout:
                self.stats["closed_idle"] += 1
                self._close(conn, "idle")

    async def _housekeeping(self) -> None:
        period = max(0.1, min(self.cfg.handshake_timeout, self.cfg.idle_timeout) / 10)
        while True:
            await asyncio.sleep(period)
            self.expire(time.monotonic())

    def _send(self, conn: Connection, data: bytes) -> None:
        transport = conn.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() > self.cfg.write_buffer:
            self.stats["frames_dropped_slow_client"] += 1
            return
        transport.write(frame(data))
        self.stats["frames_out"] += 1

    def _close(self, conn: Connection, reason: str, *, settle: bool = True) -> None:
        if conn not in self.connections:
            return
        conn.closed_by = conn.closed_by or reason
        self.connections.discard(conn)
        self._opened.pop(conn, None)
        mine = self.by_source.get(conn.source)
        if mine is not None:
            mine.pop(conn, None)
            if not mine:
                del self.by_source[conn.source]
        leg, conn.leg = conn.leg, None
        if leg is not None:
            leg.close_stream = None  # closing here: the slow path must not call back
            self.slowpath.close_stream_leg(leg, settle=settle)
        if not conn.transport.is_closing():
            conn.transport.close()
        log.debug("ICE-TCP %s closed: %s", conn.client, reason)


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(family_of(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _reset(sock: socket.socket) -> None:
    """Close with a reset: no FIN exchange, no TIME_WAIT kept for a refused peer."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()
