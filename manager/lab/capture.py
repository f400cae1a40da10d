"""Arrival times of media on the wire of a lab namespace, to measure gaps as
the network carries them (independent of what a receiver's jitter buffer
makes of a lost packet: aiortc's audio buffer stalls up to 16 packets for
one missing packet, which would hide the relay's own figure)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

from manager.lab.netns import NetnsExecutor
from manager.protocol.udpip import Datagram, DatagramError, parse_datagram

ETH_P_ALL = 0x0003
ETH_HLEN = 14
ETHERTYPES = (0x0800, 0x86DD)
PACKET_OUTGOING = 4


class WireClock:
    """Records when matching UDP datagrams arrive on one interface (an
    AF_PACKET socket made in the namespace, read on a thread); with
    `outgoing`, the ones it sends as well (`sent` says which)."""

    def __init__(self, ns: str, ifname: str, match: Callable[[Datagram], bool], *, outgoing: bool = False):
        self.match = match
        self.outgoing = outgoing
        self.sent: set[int] = set()  # indexes into arrivals of the datagrams sent (with `outgoing`)
        self.arrivals: list[tuple[float, Datagram]] = []
        self._stop = threading.Event()
        with NetnsExecutor(ns) as ex:
            self._sock = ex.call(_packet_socket, ifname)
        self._thread = threading.Thread(target=self._run, name=f"wireclock-{ifname}", daemon=True)

    def __enter__(self) -> WireClock:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, addr = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            out = addr[2] == PACKET_OUTGOING
            if (out and not self.outgoing) or len(frame) <= ETH_HLEN:
                continue
            if int.from_bytes(frame[12:14], "big") not in ETHERTYPES:
                continue
            try:
                d = parse_datagram(frame[ETH_HLEN:])
            except DatagramError:
                continue
            if self.match(d):
                if out:
                    self.sent.add(len(self.arrivals))
                self.arrivals.append((now, d))

    @property
    def times(self) -> list[float]:
        return [t for t, _ in self.arrivals]


def _packet_socket(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((ifname, ETH_P_ALL))
    sock.settimeout(0.1)
    return sock


def is_rtp(d: Datagram) -> bool:
    return bool(d.payload) and 128 <= d.payload[0] <= 191


def longest_gap(times: list[float], start: float, end: float) -> float:
    """Longest time without an arrival in [start, end] (ms), counting from
    the last arrival before start; from start to end if none came after it."""
    before = [t for t in times if t < start]
    after = [t for t in times if start <= t <= end]
    if not after:
        return round((end - (before[-1] if before else start)) * 1000, 1)
    points = ([before[-1]] if before else [start]) + after
    return round(max(b - a for a, b in zip(points, points[1:], strict=False)) * 1000, 1)
