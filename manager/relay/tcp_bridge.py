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

Limits: connections at once (all sources, and per source address), a
handshake timeout (the owner's success within `handshake_timeout` of the
connect, the first frame included), an idle timeout (no frame either way),
the largest frame accepted, and the bytes queued to a slow client (frames to
it are dropped beyond, as UDP would lose them). Either side's close tears
the other down: the client's close frees the leg (and ends a call nothing
else carries); the call's end closes the connection.

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
from dataclasses import dataclass

from manager.protocol.addresses import family_of
from manager.relay.config import TcpConfig
from manager.relay.slowpath import Leg, SlowPath

log = logging.getLogger(__name__)

FRAME_HEADER = struct.Struct("!H")  # RFC 4571: the length of the packet that follows


def frame(packet: bytes) -> bytes:
    """One RFC 4571 frame."""
    if len(packet) > 0xFFFF:
        raise ValueError(f"a packet of {len(packet)} bytes does not fit an RFC 4571 frame")
    return FRAME_HEADER.pack(len(packet)) + packet


class FrameError(ValueError):
    """A frame the bridge refuses (the connection is closed)."""


async def read_frame(reader: asyncio.StreamReader, max_frame: int) -> bytes:
    """The next frame's packet; EOF raises asyncio.IncompleteReadError."""
    header = await reader.readexactly(FRAME_HEADER.size)
    (length,) = FRAME_HEADER.unpack(header)
    if length == 0:
        raise FrameError("empty frame")
    if length > max_frame:
        raise FrameError(f"frame of {length} bytes exceeds tcp.max_frame ({max_frame})")
    return await reader.readexactly(length)


@dataclass(eq=False)
class Connection:
    client: tuple[str, int]
    listener: tuple[str, int]
    writer: asyncio.StreamWriter
    opened: float
    leg: Leg | None = None
    closed_by: str | None = None  # why the relay closed it


class TcpBridge:
    """The ICE-TCP listeners and their connections (see the module docstring)."""

    def __init__(self, slowpath: SlowPath, cfg: TcpConfig, hosts: list[str]) -> None:
        self.slowpath = slowpath
        self.cfg = cfg
        self.hosts = hosts
        self.servers: list[asyncio.base_events.Server] = []
        self.connections: set[Connection] = set()
        self.per_source: collections.Counter[str] = collections.Counter()
        self.stats: collections.Counter[str] = collections.Counter()

    @property
    def listening(self) -> list[tuple[str, int]]:
        return [(h, self.cfg.port) for h in self.hosts]

    async def start(self) -> None:
        for host in self.hosts:
            family = family_of(host)
            try:
                server = await asyncio.start_server(self._serve, host, self.cfg.port, family=family,
                                                    reuse_address=True, backlog=1024)
            except OSError as exc:
                await self.stop()
                raise OSError(exc.errno, f"tcp.port {self.cfg.port} on {host}: {exc.strerror}") from None
            self.servers.append(server)
        log.info("ICE-TCP listening on %s", ", ".join(f"{h}:{self.cfg.port}" for h in self.hosts))

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            self._close(conn, "relay stopping", settle=False)
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()

    def summary(self) -> dict:
        return {"listening": [f"{h}:{p}" for h, p in self.listening], "connections": len(self.connections),
                "events": dict(sorted(self.stats.items()))}

    # -- one connection ---------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        local = writer.get_extra_info("sockname")
        client, listener = (peer[0], peer[1]), (local[0], local[1])
        if len(self.connections) >= self.cfg.max_connections:
            self.stats["refused_max_connections"] += 1
            writer.transport.abort()
            return
        if self.per_source[client[0]] >= self.cfg.max_per_source:
            self.stats["refused_per_source"] += 1
            writer.transport.abort()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # media: no Nagle delay
        writer.transport.set_write_buffer_limits(high=self.cfg.write_buffer)
        conn = Connection(client=client, listener=listener, writer=writer, opened=time.monotonic())
        self.connections.add(conn)
        self.per_source[client[0]] += 1
        self.stats["accepted"] += 1
        try:
            await self._pump(conn, reader)
        except asyncio.IncompleteReadError:
            if conn.closed_by is None:
                self.stats["closed_by_client"] += 1
        except FrameError as exc:
            self.stats["closed_bad_frame"] += 1
            log.debug("ICE-TCP %s: %s", client, exc)
        except TimeoutError:
            pass  # counted where it was decided
        except (ConnectionError, OSError):
            self.stats["closed_error"] += 1
        finally:
            self._close(conn, conn.closed_by or "closed")

    async def _pump(self, conn: Connection, reader: asyncio.StreamReader) -> None:
        cfg = self.cfg
        deadline = conn.opened + cfg.handshake_timeout
        while True:
            now = time.monotonic()
            if conn.leg is None or conn.leg.installed_at is None:
                wait = deadline - now
                if wait <= 0:
                    self.stats["closed_handshake_timeout"] += 1
                    conn.closed_by = "no STUN success within tcp.handshake_timeout"
                    raise TimeoutError
            else:
                wait = conn.leg.last_seen + cfg.idle_timeout - now
                if wait <= 0:
                    self.stats["closed_idle"] += 1
                    conn.closed_by = "idle"
                    raise TimeoutError
            try:
                packet = await asyncio.wait_for(read_frame(reader, cfg.max_frame), timeout=wait)
            except TimeoutError:
                continue  # the loop decides (the owner's traffic may have kept it alive)
            self.stats["frames_in"] += 1
            if conn.leg is None:
                conn.leg = self.slowpath.open_stream_leg(
                    conn.listener, packet, conn.client,
                    send=lambda data, c=conn: self._send(c, data),
                    close=lambda reason, c=conn: self._close(c, reason))
                if conn.leg is None:
                    self.stats["closed_refused"] += 1
                    conn.closed_by = "first frame refused"
                    return
            else:
                self.slowpath.stream_packet(conn.leg, packet)

    def _send(self, conn: Connection, data: bytes) -> None:
        transport = conn.writer.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() > self.cfg.write_buffer:
            self.stats["frames_dropped_slow_client"] += 1
            return
        conn.writer.write(frame(data))
        self.stats["frames_out"] += 1

    def _close(self, conn: Connection, reason: str, *, settle: bool = True) -> None:
        if conn not in self.connections:
            return
        conn.closed_by = conn.closed_by or reason
        self.connections.discard(conn)
        n = self.per_source[conn.client[0]] - 1
        if n > 0:
            self.per_source[conn.client[0]] = n
        else:
            self.per_source.pop(conn.client[0], None)
        leg, conn.leg = conn.leg, None
        if leg is not None:
            leg.close_stream = None  # closing here: the slow path must not call back
            self.slowpath.close_stream_leg(leg, settle=settle)
        if not conn.writer.transport.is_closing():
            conn.writer.close()
        log.debug("ICE-TCP %s closed: %s", conn.client, reason)
