"""Paced UDP streams and a counting receiver across lab namespaces."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time

from tests.support.waiting import NotYet, eventually

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


def settle(groups: dict[str, list[Receiver]], n: int, timeout: float = 2.0) -> float:
    """Until each group of receivers holds the n sequence numbers sent to it
    (what was in flight has landed), or `timeout`: the caller then reports
    what is missing, by number. Returns how long it waited."""
    t0 = time.monotonic()

    def complete() -> bool:
        missing = {name: n - len({s for r in rs for s in r.seqs}) for name, rs in groups.items()}
        assert not any(missing.values()), f"missing {missing}"
        return True

    with contextlib.suppress(NotYet):
        eventually(complete, timeout, what="every packet sent")
    return time.monotonic() - t0


def snmp_udp(lab, ns: str, family: int = socket.AF_INET) -> dict[str, int]:
    """The namespace's UDP counters (InErrors, RcvbufErrors, InCsumErrors...)."""
    path = "/proc/net/snmp" if family == socket.AF_INET else "/proc/net/snmp6"
    text = lab.run(ns, ["cat", path]).stdout
    if family == socket.AF_INET:
        rows = [line.split() for line in text.splitlines() if line.startswith("Udp:")]
        return dict(zip(rows[0][1:], map(int, rows[1][1:]), strict=False))
    return {k[len("Udp6"):]: int(v) for k, v in (line.split() for line in text.splitlines()) if k.startswith("Udp6")}


def link_drops(lab, ns: str) -> dict[str, int]:
    """Every drop and XDP error counter of the namespace's links ("dev/name":
    value), from `ip -s link` and the veth driver's `ethtool -S`."""
    out = {}
    for link in json.loads(lab.run(ns, ["ip", "-s", "-j", "link"]).stdout or "[]"):
        dev = link["ifname"]
        for way in ("rx", "tx"):
            stats = link.get("stats64", {}).get(way, {})
            out.update({f"{dev}/{way}_{k}": v for k, v in stats.items() if "drop" in k or "error" in k})
        if dev != "lo":
            for line in lab.run(ns, ["ethtool", "-S", dev]).stdout.splitlines()[1:]:
                name, _, value = line.strip().partition(": ")
                if ("drop" in name or "err" in name) and value.strip().isdigit():
                    out[f"{dev}/{name}"] = int(value)
    return out


def moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


class TwoWayStream:
    """n paced packets each way on one kernel flow: client → VIP (up, to
    the owner's socket) and owner → flow source (down, to the client's), with
    the namespaces' socket and link drop counters around it, so a loss is
    reported with the layer that lost it."""

    def __init__(self, lab, namespaces, client_sock: socket.socket, owner_sock: socket.socket, vip,
                 flow_dst, n: int, rate: int):
        self.lab, self.namespaces, self.n = lab, namespaces, n
        self.rx_up, self.rx_down = Receiver(owner_sock), Receiver(client_sock)
        self.senders = [threading.Thread(target=paced_send, args=(client_sock, vip, range(n), rate)),
                        threading.Thread(target=paced_send, args=(owner_sock, flow_dst, range(n), rate))]

    def start(self) -> None:
        self.sockets_before = {ns: snmp_udp(self.lab, ns) for ns in self.namespaces}
        self.links_before = {ns: link_drops(self.lab, ns) for ns in self.namespaces}
        for t in (self.rx_up, self.rx_down, *self.senders):
            t.start()

    def finish(self) -> tuple[int, int]:
        """Wait for the senders and what is in flight; (lost up, lost down)."""
        for t in self.senders:
            t.join()
        settle({"up": [self.rx_up], "down": [self.rx_down]}, self.n)
        for rx in (self.rx_up, self.rx_down):
            rx.stop.set()
            rx.join()
        return self.n - len(set(self.rx_up.seqs)), self.n - len(set(self.rx_down.seqs))

    def drops(self) -> tuple[dict, dict]:
        """(UDP error counters, link drop counters) that moved, by namespace."""
        sockets = {ns: {k: v for k, v in moved(self.sockets_before[ns], snmp_udp(self.lab, ns)).items()
                        if "Errors" in k} for ns in self.namespaces}
        return sockets, {ns: moved(self.links_before[ns], link_drops(self.lab, ns)) for ns in self.namespaces}
