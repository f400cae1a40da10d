"""Batched datagram sends: many datagrams, one ``sendmmsg(2)``.

The media engine's tick sends one packet per call; one syscall each is the
per-packet wall the issue names (pion moved to batched socket I/O for it).
:class:`BatchSender` queues the datagrams sent on a socket during one pass
of the event loop and sends them with one ``sendmmsg`` when the pass ends
(``loop.call_soon``): nothing waits longer than the callbacks already queued.

``sendmmsg`` is called through ctypes (the standard library has no binding):
the datagrams are joined into one buffer, and one preallocated array of
``mmsghdr``/``iovec`` points into it. Where libc has no ``sendmmsg`` each
datagram goes through ``socket.sendto``.

A datagram the kernel cannot take now (EAGAIN, a full send buffer) is dropped
and counted, as the network would drop it, and so is the rest of its batch;
a datagram the kernel refuses (an unreachable address, a firewall's EPERM)
is counted as an error and skipped, and the batch goes on after it.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import socket
import struct
from collections.abc import Callable

Addr = tuple[str, int]
#: Datagrams per sendmmsg call (Linux caps a call at UIO_MAXIOV, 1024).
MAX_BATCH = 1024
#: Destination addresses whose sockaddr bytes are kept (one per call and peer).
SOCKADDR_CACHE = 4096


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_Iovec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


def _libc_sendmmsg():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sendmmsg
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_Mmsghdr), ctypes.c_uint, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_SENDMMSG = _libc_sendmmsg()


def sockaddr(family: int, addr: Addr) -> bytes:
    """``struct sockaddr_in`` / ``sockaddr_in6`` for `addr` (numeric host only)."""
    host, port = addr[0], addr[1]
    if family == socket.AF_INET:
        return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_pton(
            socket.AF_INET, host) + bytes(8)
    scope = addr[3] if len(addr) > 3 else 0  # type: ignore[misc]
    return (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0)
            + socket.inet_pton(socket.AF_INET6, host) + struct.pack("=I", scope))


class BatchSender:
    """Queue datagrams for one non-blocking socket; flush them with one sendmmsg per loop pass.

    ``on_drop(n)`` is told of datagrams dropped for a full buffer,
    ``on_error(exc)`` of each datagram the kernel refused.
    """

    def __init__(self, sock: socket.socket, on_drop: Callable[[int], None],
                 on_error: Callable[[OSError], None], *, use_sendmmsg: bool = True) -> None:
        self.sock = sock
        self.on_drop = on_drop
        self.on_error = on_error
        self._pending: list[tuple[bytes, Addr | None]] = []
        self._scheduled = False
        self._names: dict[Addr, bytes] = {}
        self.use_sendmmsg = use_sendmmsg and _SENDMMSG is not None
        if self.use_sendmmsg:
            self._msgs = (_Mmsghdr * MAX_BATCH)()
            self._iovs = (_Iovec * MAX_BATCH)()
            for i in range(MAX_BATCH):
                self._msgs[i].msg_hdr.msg_iov = ctypes.pointer(self._iovs[i])
                self._msgs[i].msg_hdr.msg_iovlen = 1
        self.batches = 0  # sendmmsg calls (or fallback flushes) made
        self.sent = 0
        self._last_sent = 0

    def sendto(self, data: bytes, addr: Addr | None = None) -> None:
        """Queue `data` for `addr` (None: the connected peer); sent when this loop pass ends."""
        self._pending.append((data, addr))
        if not self._scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no event loop (a synchronous caller): send now
                self.flush()
                return
            self._scheduled = True

    def flush(self) -> None:
        """Send everything queued now."""
        self._scheduled = False
        pending, self._pending = self._pending, []
        send = self._send_chunk if self.use_sendmmsg else self._send_each
        for start in range(0, len(pending), MAX_BATCH):
            if not send(pending[start:start + MAX_BATCH]):
                self.on_drop(len(pending) - start - self._last_sent)  # the buffer is full: the rest too
                return

    def _send_each(self, chunk: list[tuple[bytes, Addr | None]]) -> bool:
        self.batches += 1
        for i, (data, addr) in enumerate(chunk):
            try:
                if addr is None:
                    self.sock.send(data)
                else:
                    self.sock.sendto(data, addr)
            except BlockingIOError:
                self._last_sent = i
                return False
            except OSError as exc:
                self.on_error(exc)
                continue
            self.sent += 1
        return True

    def _name(self, addr: Addr) -> bytes:
        name = self._names.get(addr)
        if name is None:
            if len(self._names) >= SOCKADDR_CACHE:
                self._names.clear()
            name = self._names[addr] = sockaddr(self.sock.family, addr)
        return name

    def _send_chunk(self, chunk: list[tuple[bytes, Addr | None]]) -> bool:
        """sendmmsg `chunk`; False (and ``_last_sent`` set) if the buffer filled up."""
        names: list[bytes | None] = []
        for data, addr in list(chunk):
            try:
                names.append(None if addr is None else self._name(addr))
            except (OSError, ValueError, TypeError) as exc:  # not a numeric address of this family
                self.on_error(OSError(str(exc)))
                chunk.remove((data, addr))
        if not chunk:
            return True
        blob = b"".join(data for data, _ in chunk)
        namebuf = b"".join(n for n in names if n is not None)
        # c_char_p points into the bytes objects themselves (kept alive below).
        base = ctypes.cast(ctypes.c_char_p(blob), ctypes.c_void_p).value or 0
        name_base = ctypes.cast(ctypes.c_char_p(namebuf), ctypes.c_void_p).value or 0
        offset = name_offset = 0
        msgs, iovs = self._msgs, self._iovs
        for i, (data, _) in enumerate(chunk):
            iov = iovs[i]
            iov.iov_base = base + offset
            iov.iov_len = len(data)
            offset += len(data)
            hdr = msgs[i].msg_hdr
            name = names[i]
            if name is None:
                hdr.msg_name = None
                hdr.msg_namelen = 0
            else:
                hdr.msg_name = name_base + name_offset
                hdr.msg_namelen = len(name)
                name_offset += len(name)
        fd, done = self.sock.fileno(), 0
        self.batches += 1
        while done < len(chunk):
            n = _SENDMMSG(fd, ctypes.byref(msgs[done]), len(chunk) - done, 0)
            if n > 0:
                done += n
                self.sent += n
                continue
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS):
                self._last_sent = done
                del blob, namebuf
                return False
            self.on_error(OSError(err, f"sendmmsg: {errno.errorcode.get(err, err)}"))
            done += 1  # the first datagram of the rest failed: skip it
        del blob, namebuf
        return True

    def close(self) -> None:
        """Send what is queued (a close_notify, say) before the socket closes."""
        if self._pending:
            self.flush()
