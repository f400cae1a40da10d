"""relayd's side of every flow source, with no socket per flow.

A flow source is (pool address, flow port): the relay-internal address:port a
client's packets come from when they reach the call's owner. XDP forwards
established flows by itself; the slow path still has to send from a flow
source (a new leg's checks) and to hear what the stack gets for one (the
owner's answers before a flow is installed, and a packet XDP passes up).

- Receiving: an sk_lookup program (bpf/flow_sockets.bpf.c) hands every UDP
  packet for a flow source to one socket per family; recvmsg with
  IP(V6)_RECVORIGDSTADDR says which flow source it was sent to.
- Sending: a raw socket per family (IPPROTO_RAW: header included, receives
  nothing) sends datagrams built by manager.protocol.udpip from any source.

bcc compiles the program but cannot load an sk_lookup program (it needs an
expected attach type at load); its instructions, map fds in place, go to
libbpf instead, and a BPF link attaches it to relayd's network namespace for
as long as relayd holds the link.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Iterator

from manager.protocol.addresses import AF_INET, AF_INET6, family_of, parse_ip
from manager.protocol.udpip import build_datagram
from manager.relay.config import DatapathConfig
from manager.relay.kernel import libbpf
from manager.relay.kernel.datapath import DatapathError, ensure_kernel_headers
from manager.relay.kernel.structs import BPF_DIR

log = logging.getLogger(__name__)

PROG_SOURCE = BPF_DIR / "flow_sockets.bpf.c"
PROG_NAME = "flow_lookup"
IP_RECVORIGDSTADDR = 20        # linux/in.h (IP_ORIGDSTADDR in the control message)
IPV6_RECVORIGDSTADDR = 74      # linux/in6.h
SOL_IPV6 = 41
MAX_DATAGRAM = 65535
CMSG_SPACE = 64
SOCKADDR_IN = struct.Struct("=H2s4s")        # family (host order), port, address
SOCKADDR_IN6 = struct.Struct("=H2s4x16s4x")  # family, port, flowinfo, address, scope
SLOT = {AF_INET: 0, AF_INET6: 1}
SO_RCVBUFFORCE = 33
RECEIVE_BUFFER = 16 << 20           # key of each family's socket in the sockmap


def pool_cflags(cfg: DatapathConfig) -> list[str]:
    """The pool and flow-port range as the program's compile-time constants."""
    flags = [f"-DFLOW_PORT_MIN={cfg.flow_port_min}", f"-DFLOW_PORT_MAX={cfg.flow_port_max}"]
    if cfg.internal_addr4:
        flags += [f"-DPOOL4_FIRST={int(ipaddress.IPv4Address(cfg.internal_addr4))}u",
                  f"-DPOOL4_COUNT={cfg.internal_addr_count}u"]
    if cfg.internal_addr6:
        packed = ipaddress.IPv6Address(cfg.internal_addr6).packed
        # The context holds each word as loaded from network-order bytes: the
        # constant is that load on this (little- or big-endian) machine.
        words = [int.from_bytes(packed[i:i + 4], "little" if struct.pack("=H", 1)[0] else "big")
                 for i in range(0, 12, 4)]
        flags += [f"-DPOOL6_W{i}={w}u" for i, w in enumerate(words)]
        flags += [f"-DPOOL6_FIRST={int.from_bytes(packed[12:], 'big')}u", f"-DPOOL6_COUNT={cfg.internal_addr_count}u"]
    return flags


class FlowSockets:
    """The shared receive socket and the raw send socket of each family."""

    def __init__(self, cfg: DatapathConfig):
        self.cfg = cfg
        self.pools: dict[int, list[str]] = {}
        for fam, base in ((AF_INET, cfg.internal_addr4), (AF_INET6, cfg.internal_addr6)):
            if base:
                self.pools[fam] = cfg.pool(base)
        self.receivers: dict[int, socket.socket] = {}
        self._senders: dict[int, socket.socket] = {}
        self._prog_fd = -1
        self._link_fd = -1
        self._map_fd = -1
        self._bpf = None

    # --- lifecycle ------------------------------------------------------------------

    def open(self) -> None:
        """Load and link the program, open the sockets and register them."""
        try:
            self._load()
            for fam, pool in self.pools.items():
                self.receivers[fam] = _receiver(fam, pool[0])
                self._senders[fam] = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
                libbpf.map_update_raw(self._map_fd, ctypes.c_uint32(SLOT[fam]),
                                      ctypes.c_uint64(self.receivers[fam].fileno()))
        except (OSError, DatapathError) as exc:
            self.close()
            if isinstance(exc, DatapathError):
                raise
            raise DatapathError(f"cannot open the flow sockets: {exc}") from exc

    def _load(self) -> None:
        ensure_kernel_headers()
        try:
            from bcc import BPF  # noqa: PLC0415 - slow to import; only loading needs it
            from bcc.libbcc import lib as bcclib  # noqa: PLC0415
        except ImportError as exc:
            raise DatapathError("bcc is not importable: install python3-bpfcc (run `make setup`)") from exc
        try:
            self._bpf = BPF(src_file=str(PROG_SOURCE).encode(), cflags=pool_cflags(self.cfg))
            insns = self._bpf.dump_func(PROG_NAME.encode())
        except Exception as exc:
            raise DatapathError(f"cannot compile {PROG_SOURCE.name}: {exc}") from exc
        # bcc's module keeps the sockmap; our own fd of it outlives bcc's object.
        self._map_fd = os.dup(bcclib.bpf_table_fd(self._bpf.module, b"flow_sockets"))
        self._prog_fd = libbpf.prog_load(libbpf.BPF_PROG_TYPE_SK_LOOKUP, PROG_NAME, insns,
                                         expected_attach_type=libbpf.BPF_SK_LOOKUP)
        ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            self._link_fd = libbpf.link_create(self._prog_fd, ns, libbpf.BPF_SK_LOOKUP)
        finally:
            os.close(ns)

    def close(self) -> None:
        """Detach (closing the link) and close every socket."""
        for sock in [*self.receivers.values(), *self._senders.values()]:
            sock.close()
        self.receivers.clear()
        self._senders.clear()
        for name in ("_link_fd", "_prog_fd", "_map_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    # --- flow sources ---------------------------------------------------------------

    def address(self, family: int, index: int) -> str:
        return self.pools[family][index]

    def index_of(self, addr: str) -> int | None:
        """Pool index of addr, or None if it is not a pool address."""
        pool = self.pools.get(family_of(addr))
        if not pool:
            return None
        idx = int(parse_ip(addr)) - int(parse_ip(pool[0]))
        return idx if 0 <= idx < len(pool) else None

    def send(self, src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> None:
        """One datagram from flow source src to dst; OSError if the kernel refuses it."""
        sender = self._senders[family_of(src[0])]
        sender.sendto(build_datagram(src, dst, payload), (dst[0], 0))

    def receive(self, family: int, budget: int = 64) -> Iterator[tuple[bytes, tuple[str, int], tuple[str, int]]]:
        """Up to `budget` queued datagrams: (payload, sender, flow source it was sent to)."""
        sock = self.receivers[family]
        for _ in range(budget):
            try:
                data, anc, _flags, addr = sock.recvmsg(MAX_DATAGRAM, CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            dst = _orig_dst(anc)
            if dst is not None:
                yield data, (addr[0], addr[1]), dst


def _receiver(family: int, addr: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(SOL_IPV6, IPV6_RECVORIGDSTADDR, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        sock.setblocking(False)
        # One queue for every flow source's slow-path traffic: make it deep.
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        # Any port: the program steers flow sources here whatever this one is.
        sock.bind((addr, 0))
    except OSError:
        sock.close()
        raise
    return sock


def _orig_dst(ancillary: list) -> tuple[str, int] | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_IP and kind == IP_RECVORIGDSTADDR and len(data) >= SOCKADDR_IN.size:
            _, port, addr = SOCKADDR_IN.unpack_from(data)
            return socket.inet_ntop(socket.AF_INET, addr), int.from_bytes(port, "big")
        if level == SOL_IPV6 and kind == IPV6_RECVORIGDSTADDR and len(data) >= SOCKADDR_IN6.size:
            _, port, addr = SOCKADDR_IN6.unpack_from(data)
            return socket.inet_ntop(socket.AF_INET6, addr), int.from_bytes(port, "big")
    return None

