"""Paced UDP streams and a counting receiver across lab namespaces."""

from __future__ import annotations

import socket
import struct
import threading
import time

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # root may exceed rmem_max


class Receiver(threading.Thread):
    """Collects sequence numbers arriving on one socket."""

    def __init__(self, sock: socket.socket):
        super().__init__(daemon=True)
        self.sock = sock
        self.seqs: list[int] = []
        self.sources: set = set()
        self.stop = threading.Event()
        # A deep queue: the tests measure the kernel's forwarding, and a
        # receiver thread starved for a moment (a relayd compiling its
        # program, an emulated CPU) must not lose packets at its own socket.
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        sock.settimeout(0.1)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                data, addr = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            self._note(data, addr)
        # What already arrived counts, even if this thread lagged behind it.
        self.sock.setblocking(False)
        while True:
            try:
                data, addr = self.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            self._note(data, addr)

    def _note(self, data: bytes, addr) -> None:
        if data[:1] == b"\x80":
            self.seqs.append(struct.unpack_from("!I", data, 4)[0])
            self.sources.add(addr[:2])


def paced_send(sock: socket.socket, dst, seqs: range, rate: int, stop: threading.Event | None = None) -> int:
    """Send RTP-like packets (first byte 0x80) carrying a sequence number."""
    start = time.monotonic()
    sent = 0
    for i, seq in enumerate(seqs):
        if stop is not None and stop.is_set():
            break
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # pacing
        sock.sendto(b"\x80\x6f\x00\x00" + struct.pack("!I", seq) + b"m" * 160, dst)
        sent += 1
    return sent
