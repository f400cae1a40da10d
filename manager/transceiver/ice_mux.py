"""One UDP socket per bind address, shared by every call of the transceiver.

aioice opens a socket per ``Connection``; instead each call's ``Connection``
gets an :class:`aioice.ice.StunProtocol` whose transport is a
:class:`CallPort`, a view on the shared :class:`IceMux` socket. The mux routes
a STUN request by the local ufrag in its USERNAME, and everything else (STUN
responses, DTLS, SRTP) by the source address. A call claims a source address
when it sends a STUN request or a success response to it: aioice sends those
only after it verified MESSAGE-INTEGRITY with the call's password (or for its
own checks), so an unauthenticated sender never claims one.

The socket is read in batches: one wake-up of the event loop drains up to
``READ_BATCH`` datagrams (``recvfrom`` until EAGAIN), instead of asyncio's
one datagram per wake-up. Sends are batched: the datagrams sent during one
pass of the event loop leave in one ``sendmmsg`` at its end (batch_send.py);
a datagram the kernel cannot take now (EAGAIN) is dropped and counted, as
the network would.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections import Counter
from typing import Any

from aioice.ice import StunProtocol

from manager.protocol.rfc7983 import STUN_REQUEST, STUN_SUCCESS, stun_class, stun_username

from .batch_send import BatchSender
from .errors import DuplicateCall

logger = logging.getLogger(__name__)

Addr = tuple[str, int]
#: Datagrams read per wake-up at most (then other work gets its turn).
READ_BATCH = 256
#: Socket buffers asked of the kernel (capped by net.core.[rw]mem_max).
SOCKET_BUFFER = 4 << 20
#: Send through one sendmmsg per loop pass (False: one sendto per datagram;
#: the density benchmark measures both).
BATCHED_SENDS = True


class MuxSocket:
    """The shared socket's send side (what a CallPort sends through)."""

    def __init__(self, sock: socket.socket, mux: IceMux) -> None:
        self.sock = sock
        self.mux = mux
        self.batch = BatchSender(sock, self._dropped, self._error) if BATCHED_SENDS else None

    def sendto(self, data: bytes, addr: Addr) -> None:
        if self.batch is not None:
            self.batch.sendto(data, addr)
            return
        try:
            self.sock.sendto(data, addr)
        except BlockingIOError:
            self._dropped(1)
        except OSError as exc:
            self._error(exc)

    def _dropped(self, n: int) -> None:
        self.mux.stats["tx_dropped_full"] += n

    def _error(self, exc: OSError) -> None:
        self.mux.stats["socket_errors"] += 1

    def close(self) -> None:
        if self.batch is not None:
            self.batch.close()
        self.sock.close()


class CallPort(asyncio.DatagramTransport):
    """One call's view of the shared socket, handed to aioice as its transport."""

    def __init__(self, mux: IceMux, ufrag: str, protocol: StunProtocol) -> None:
        super().__init__()
        self.mux = mux
        self.ufrag = ufrag
        #: Every local ufrag routed here: the call's, and during an ICE restart
        #: the new one too (RFC 8445 section 9: both are valid until it completes).
        self.ufrags: set[str] = {ufrag}
        self.protocol: StunProtocol | None = protocol
        self.addrs: set[Addr] = set()
        self._closing = False
        #: Drop everything this call sends (it was released after a migration:
        #: its DTLS close_notify, SCTP ABORT and consent checks must not go out).
        self.muted = False

    def sendto(self, data: bytes, addr: Addr | None = None) -> None:  # type: ignore[override]
        if self._closing or self.muted or addr is None or self.mux.transport is None:
            return
        addr = (addr[0], addr[1])
        # A call claims an address when it sends it a STUN request or success
        # response. aioice sends a success only to a check it authenticated
        # with this call's password, and requests only to candidates it knows:
        # with the offer's candidates stripped, only peer-reflexive ones
        # learnt from such checks. Error responses (to forged checks) claim nothing.
        if addr not in self.addrs and stun_class(data) in (STUN_REQUEST, STUN_SUCCESS):
            self.mux.claim(addr, self)
        self.mux.transport.sendto(data, addr)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.mux.detach(self)
        # StunProtocol.close() waits for connection_lost, as for a real socket.
        asyncio.get_running_loop().call_soon(self._lost)

    def _lost(self) -> None:
        # Then the port lets go of its protocol, which holds the port as its
        # transport: a cycle only the collector would free.
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.connection_lost(None)

    def is_closing(self) -> bool:
        return self._closing

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname":
            return self.mux.sockname
        return default  # notably no "socket": the shared one is not the call's to tune


class IceMux:
    """A UDP socket shared by all calls, demultiplexing to each call's aioice protocol."""

    def __init__(self, bind_addr: str) -> None:
        self.bind_addr = bind_addr
        self.family = ipaddress.ip_address(bind_addr).version
        self.transport: MuxSocket | None = None
        self.sockname: Addr = (bind_addr, 0)
        self._by_ufrag: dict[str, CallPort] = {}
        self._by_addr: dict[Addr, CallPort] = {}
        self.stats: Counter[str] = Counter()


    async def open(self, port: int = 0) -> None:
        family = socket.AF_INET if self.family == 4 else socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            sock.bind((self.bind_addr, port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        sockname = sock.getsockname()
        self.sockname = (sockname[0], sockname[1])
        self.transport = MuxSocket(sock, self)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._read_ready, sock)

    def _read_ready(self, sock: socket.socket) -> None:
        for _ in range(READ_BATCH):
            try:
                data, addr = sock.recvfrom(2048)
            except BlockingIOError:
                return
            except OSError as exc:  # an ICMP error for an earlier send
                self.error_received(exc)
                continue
            self.datagram_received(data, addr)
        self.stats["read_batches_full"] += 1

    def close(self) -> None:
        if self.transport is not None:
            try:
                asyncio.get_running_loop().remove_reader(self.transport.sock.fileno())
            except RuntimeError:
                pass  # no loop any more: nothing to remove it from
            self.transport.close()
            self.transport = None

    def attach(self, ufrag: str, protocol: StunProtocol) -> CallPort:
        if ufrag in self._by_ufrag:
            raise DuplicateCall(f"ufrag {ufrag!r} is already in use")
        port = CallPort(self, ufrag, protocol)
        self._by_ufrag[ufrag] = port
        protocol.connection_made(port)
        return port

    def add_ufrag(self, ufrag: str, port: CallPort) -> None:
        """Route checks for `ufrag` to `port` as well (an ICE restart's new credentials)."""
        owner = self._by_ufrag.get(ufrag)
        if owner is not None and owner is not port:
            raise DuplicateCall(f"ufrag {ufrag!r} is already in use")
        self._by_ufrag[ufrag] = port
        port.ufrags.add(ufrag)

    def remove_ufrag(self, ufrag: str, port: CallPort) -> None:
        """Stop routing `ufrag` to `port` (credentials an ICE restart retired)."""
        if self._by_ufrag.get(ufrag) is port:
            del self._by_ufrag[ufrag]
        port.ufrags.discard(ufrag)

    def detach(self, port: CallPort) -> None:
        for ufrag in port.ufrags:
            if self._by_ufrag.get(ufrag) is port:
                del self._by_ufrag[ufrag]
        for addr in port.addrs:
            if self._by_addr.get(addr) is port:
                del self._by_addr[addr]
        port.addrs.clear()

    def claim(self, addr: Addr, port: CallPort) -> None:
        previous = self._by_addr.get(addr)
        if previous is not None and previous is not port:
            # The relay reused a flow port for another call: the newest
            # authenticated owner wins.
            previous.addrs.discard(addr)
            logger.info("ICE source %s moved from ufrag %s to %s", addr, previous.ufrag, port.ufrag)
        self._by_addr[addr] = port
        port.addrs.add(addr)

    def route(self, data: bytes, addr: Addr) -> CallPort | None:
        """Pick the call a datagram belongs to, or None to drop it."""
        if stun_class(data) == STUN_REQUEST:
            # A check names its target in USERNAME "<our ufrag>:<theirs>"; that
            # beats the source address (a reused flow port, an ICE restart).
            username = stun_username(data)
            if username is None:
                self.stats["drop_stun_no_username"] += 1
                return None
            port = self._by_ufrag.get(username.partition(":")[0])
            if port is None:
                self.stats["drop_unknown_ufrag"] += 1
            return port
        port = self._by_addr.get(addr)
        if port is None:
            self.stats["drop_unknown_source"] += 1
        return port

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        addr = (addr[0], addr[1])  # IPv6 four-tuple to two-tuple, as aioice does
        port = self.route(data, addr)
        if port is None:
            return
        self.stats["rx"] += 1
        if port.protocol is not None:
            port.protocol.datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.stats["socket_errors"] += 1
        logger.debug("ICE socket %s: %s", self.sockname, exc)
