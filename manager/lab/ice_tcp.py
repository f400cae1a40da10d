"""ICE-TCP for the lab's aiortc client. aioice offers no TCP candidates, so
the client sends UDP to a local adapter that carries each datagram in an
RFC 4571 frame over one TCP connection to the relay's passive candidate (the
role of a browser's active TCP candidate), and hands back what the relay
frames. The relay side is the real one: manager/relay/tcp_bridge.py."""

from __future__ import annotations

import asyncio

from manager.protocol.rfc4571 import FRAME_HEADER, frame
from manager.protocol.sdp import rewrite_candidates


class TcpAdapter(asyncio.DatagramProtocol):
    """UDP on `local` ↔ one TCP connection to `relay` (see the module docstring)."""

    def __init__(self, relay: tuple[str, int]) -> None:
        self.relay = relay
        self.local: tuple[str, int] | None = None
        self.peer: tuple[str, int] | None = None  # the aiortc client's socket
        self.udp: asyncio.DatagramTransport | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.frames_out = 0
        self.frames_in = 0
        self.closed_by_relay = False
        self.connections_lost = 0
        self.connect_failures = 0
        self.held = 0  # media dropped while no connection was open
        self._queue: list[bytes] = []
        self._reader_task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, relay: tuple[str, int], bind: str = "127.0.0.1") -> TcpAdapter:
        adapter = cls(relay)
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: adapter, local_addr=(bind, 0))
        return adapter

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.udp = transport  # type: ignore[assignment]
        self.local = transport.get_extra_info("sockname")[:2]

    def rewrite_answer(self, sdp: str) -> str:
        """The answer as the client must see it: the adapter is its only candidate."""
        assert self.local is not None
        return rewrite_candidates(sdp, [self.local])

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.peer = addr
        if self.writer is not None and self.closed_by_relay:
            # The relay closed the connection (a restart): open a new one, as a
            # browser's active TCP candidate does, with a check first.
            self.connections_lost += 1
            self.close_tcp()
            self.writer, self._connecting, self.closed_by_relay = None, None, False
        if self.writer is None:
            if not self._queue and data[:1] not in (b"\x00", b"\x01"):
                self.held += 1  # a connection starts with a STUN check
                return
            self._queue.append(data)
            if self._connecting is None:
                self._connecting = asyncio.ensure_future(self._connect())
            return
        self._write(data)

    def _write(self, data: bytes) -> None:
        assert self.writer is not None
        if self.writer.transport.is_closing():
            return
        self.writer.write(frame(data))
        self.frames_out += 1

    async def _connect(self) -> None:
        try:
            reader, self.writer = await asyncio.open_connection(*self.relay)
        except OSError:
            # The relay is not listening (restarting): drop what waited; the
            # client's next check tries again.
            self.connect_failures += 1
            self._queue.clear()
            self._connecting = None
            return
        for data in self._queue:
            self._write(data)
        self._queue.clear()
        self._reader_task = asyncio.ensure_future(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (length,) = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
                data = await reader.readexactly(length)
                self.frames_in += 1
                if self.udp is not None and self.peer is not None:
                    self.udp.sendto(data, self.peer)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_relay = True

    def close_tcp(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self.writer is not None:
            self.writer.close()

    def close(self) -> None:
        self.close_tcp()
        if self.udp is not None:
            self.udp.close()
