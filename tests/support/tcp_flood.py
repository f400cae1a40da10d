"""An ICE-TCP connection flood from many addresses of one IPv6 /64, in a
lab: the client namespace holds the whole prefix (a local route; sockets
bind with IP_FREEBIND) and the relay routes it back through the client.
Connections are opened and left silent, as an attacker holding the bridge's
slots would."""

from __future__ import annotations

import os
import resource
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from manager.lab.netns import NetnsExecutor
from manager.lab.services import LAB_TCP_PORT

FLOOD_PREFIX = "fd00:64:64:64"
IP_FREEBIND = 15


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_window(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """Each named process's CPU over the next `seconds`, % of a core."""
    c0, t0 = {k: cpu_seconds(p) for k, p in pids.items()}, time.monotonic()
    time.sleep(seconds)  # the measurement window
    wall = time.monotonic() - t0
    return {k: round((cpu_seconds(p) - c0[k]) / wall * 100, 1) for k, p in pids.items()}


def route_flood_prefix(lab) -> None:
    """The /64 lives in the client namespace; the relay reaches it through the client."""
    lab.run(lab.client_ns, ["ip", "-6", "route", "replace", "local", f"{FLOOD_PREFIX}::/64", "dev", "lo"], check=True)
    lab.run(lab.relay_ns, ["ip", "-6", "route", "replace", f"{FLOOD_PREFIX}::/64", "via", lab.client.addr6],
            check=True)


def unroute_flood_prefix(lab) -> None:
    lab.run(lab.client_ns, ["ip", "-6", "route", "del", "local", f"{FLOOD_PREFIX}::/64", "dev", "lo"])
    lab.run(lab.relay_ns, ["ip", "-6", "route", "del", f"{FLOOD_PREFIX}::/64"])


@dataclass
class Flood:
    """Opens `addresses` x `per_address` connections, then keeps cycling
    through them (each new connection replaces that slot's old one) until
    stopped, so the bridge is under attack for as long as the test needs."""

    lab: object
    addresses: int = 2600
    per_address: int = 1
    cycle: bool = True
    opened: int = 0
    connected: int = 0
    refused: int = 0  # reset or closed before we closed it
    unanswered: int = 0  # no answer to the SYN within settle_s (dropped in XDP, or a full accept queue)
    # How long a batch of connects may wait for their answers before the
    # unanswered are given up (an attacker does not wait out SYN retries);
    # the lab answers a SYN within a millisecond when it answers at all.
    settle_s: float = 0.1
    first_round_s: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _ready: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Flood:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def wait_first_round(self, timeout: float = 120.0) -> None:
        assert self._ready.wait(timeout), "the flood's first round did not finish"

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)

    def _run(self) -> None:
        with NetnsExecutor(self.lab.client_ns) as ex:
            ex.call(self._flood)

    def _flood(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = self.addresses * self.per_address + 1024
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
        target = (self.lab.vip6, LAB_TCP_PORT)
        slots: dict[int, socket.socket] = {}
        pending: dict[int, socket.socket] = {}
        t0 = time.monotonic()
        n = self.addresses * self.per_address
        i = 0
        try:
            while not self._stop.is_set():
                slot = i % n
                old = slots.pop(slot, None) or pending.pop(slot, None)
                if old is not None:
                    old.close()
                s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.bind((f"{FLOOD_PREFIX}::{slot // self.per_address + 1:x}", 0))
                s.setblocking(False)
                s.connect_ex(target)
                pending[slot] = s
                self.opened += 1
                i += 1
                if len(pending) >= 256 or i % n == 0:
                    self._settle(pending, slots)
                if i == n:
                    self.first_round_s = time.monotonic() - t0
                    self._ready.set()
                    if not self.cycle:
                        self._stop.wait()
        finally:
            for s in [*slots.values(), *pending.values()]:
                s.close()
            self._ready.set()

    def _settle(self, pending: dict[int, socket.socket], slots: dict[int, socket.socket]) -> None:
        deadline = time.monotonic() + self.settle_s
        while pending and time.monotonic() < deadline:
            by_fd = {s.fileno(): k for k, s in pending.items()}
            poll = select.poll()  # not select(): the descriptors run past FD_SETSIZE
            for fd in by_fd:
                poll.register(fd, select.POLLOUT)
            for fd, _ in poll.poll(max(1, min(200, int((deadline - time.monotonic()) * 1000)))):
                slot = by_fd[fd]
                s = pending.pop(slot)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    self.connected += 1
                    slots[slot] = s
                else:
                    self.refused += 1
                    s.close()
        self.unanswered += len(pending)
        for s in pending.values():
            s.close()
        pending.clear()
