"""Forged packets at the highest rate this machine injects, into a lab
relay's public interface: BPF_PROG_TEST_RUN with live frames on the lab
client's interface. bpf/testing/flood.bpf.c rewrites the template frame with
a random source (198.18.0.0/15) and port each run (and, for STUN, optionally
a random ufrag tail) and sends it out (XDP_TX) to the relay's pub0, where
the relay's own XDP program meets it.

    with Flood(lab, rtp_template(lab, ssrc), 0, random_ufrag=False) as flood:
        ...                                   # flood.injected so far
"""

from __future__ import annotations

import ctypes
import socket
import threading
import time

from aioice import stun
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from manager.lab.netns import NetnsExecutor
from manager.relay.kernel import libbpf
from manager.relay.kernel.datapath import ensure_kernel_headers
from manager.relay.kernel.structs import BPF_DIR

FLOOD_SOURCE = BPF_DIR / "testing" / "flood.bpf.c"
CHUNK = 100_000  # runs per BPF_PROG_TEST_RUN call
PACED_CHUNK = 5_000_000  # runs per call at a set rate (most send nothing): about a second
NOP_OPTION = b"\x01\x01\x01\x00"


def template(lab, username: str, options: bytes = b"") -> tuple[bytes, int]:
    msg = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    msg.attributes["USERNAME"] = username
    msg.attributes["PRIORITY"] = 1853824767
    frame = bytes(Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff")
                  / IP(src=lab.client.addr4, dst=lab.vip4, options=options) / UDP(sport=40000, dport=lab.port)
                  / Raw(bytes(msg)))
    return frame, frame.index(username.split(":")[0].encode())


def rtp_template(lab, ssrc: int) -> bytes:
    """An Opus-sized SRTP packet of the established call's stream (SSRC as on the wire)."""
    rtp = bytes([0x80, 111]) + b"\x00\x01" + b"\x00" * 4 + ssrc.to_bytes(4, "big") + b"r" * 120
    return bytes(Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff")
                 / IP(src=lab.client.addr4, dst=lab.vip4) / UDP(sport=40000, dport=lab.port) / Raw(rtp))


def live_ssrc(svc, conn_id: int) -> int:
    """The SSRC XDP learned on the established call's flow."""
    from manager.relay.config import DatapathConfig
    from manager.relay.kernel.datapath import Datapath

    dp = Datapath(DatapathConfig(pin_dir=svc.config["datapath"]["pin_dir"]))
    try:
        dp.open_maps()
        found = [f.ssrc for f in dp.flows() if f.ssrc and f.conn_id == conn_id]
    finally:
        dp.close()
    if not found:
        raise RuntimeError("the established call's flow has no SSRC yet")
    return found[0]


class Flood:
    """Injects the template from a thread in the client namespace: at full
    speed (in bursts: a test run sends several Mpps, then sets up the next
    for tens of ms), or evenly at `pps` (the program sends one frame per
    1/pps of its runs' time and drops the rest: flood.bpf.c's PACE_NS)."""

    def __init__(self, lab, frame: bytes, ufrag_off: int, random_ufrag: bool, ip_hlen: int = 20,
                 pps: float | None = None):
        from bcc import BPF

        ensure_kernel_headers()
        self._bpf = BPF(src_file=str(FLOOD_SOURCE).encode(),
                        cflags=[f"-DUFRAG_OFF={ufrag_off}", f"-DRANDOM_UFRAG={int(random_ufrag)}",
                                f"-DIP_HLEN={ip_hlen}", f"-DPACE_NS={round(1e9 / pps) if pps else 0}"])
        self.fd = self._bpf.load_func(b"xdp_flood", BPF.XDP).fd
        self.lab, self.frame, self.pps = lab, frame, pps
        self.injected = 0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._ex = NetnsExecutor(lab.client_ns)
        self._ifindex = self._ex.call(socket.if_nametoindex, lab.client.ifname)  # in the namespace
        self._future = None

    def _run(self) -> None:
        t0 = time.monotonic()
        chunk = PACED_CHUNK if self.pps else CHUNK
        while not self._stop.is_set():
            libbpf.prog_test_run_xdp(self.fd, self.frame, ingress_ifindex=self._ifindex, repeat=chunk,
                                     flags=libbpf.BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=64)
            self.injected = self._bpf["pace"][ctypes.c_int(1)].value if self.pps else self.injected + chunk
        self.seconds = time.monotonic() - t0

    def __enter__(self) -> Flood:
        self._future = self._ex.submit(self._run)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._future.result()
        self._ex.shutdown()
        self._bpf.cleanup()
