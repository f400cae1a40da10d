"""A namespace with the relay's interfaces, static neighbours and the real XDP
program loaded, for BPF_PROG_TEST_RUN fixtures and benchmarks.

The fib lookups the program makes resolve in the namespace of the ingress
ifindex given to BPF_PROG_TEST_RUN, so runs happen on a thread inside it.
"""

from __future__ import annotations

import subprocess
import uuid
from dataclasses import dataclass

from aioice import stun

from manager.lab.netns import NetnsExecutor
from manager.protocol.ufrag import encode_ufrag
from manager.relay.config import DatapathConfig, Endpoint, TcpConfig
from manager.relay.kernel import libbpf
from manager.relay.kernel.datapath import Datapath
from manager.relay.kernel.structs import ROLE_INTERNAL, ROLE_PUBLIC

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
VERDICTS = {0: "ABORTED", 1: "DROP", 2: "PASS", 3: "TX", 4: "REDIRECT"}

# Addressing mirrors manager/lab/model.py: public side, internal side, loopback.
MAC = {
    "client": "02:00:00:00:01:02", "pub": "02:00:00:00:01:01",
    "int": "02:00:00:00:02:01", "tx1": "02:00:00:00:02:02", "tx2": "02:00:00:00:02:03",
}
VIP4, VIP6, VIP_PORT = "10.10.1.1", "fd00:10:1::1", 3478
TCP_PORT = 443  # the ICE-TCP listener on the VIP addresses (its SYN limit: tcp_listeners)
CLIENT4, CLIENT6 = "10.10.1.2", "fd00:10:1::2"
INT4, INT6 = "10.10.0.1", "fd00:10::1"
# The pool of internal addresses flow sources come from: INT4/INT6 and the next two.
POOL_COUNT = 3
POOL4 = [f"10.10.0.{i}" for i in range(1, POOL_COUNT + 1)]
POOL6 = [f"fd00:10::{i}" for i in range(1, POOL_COUNT + 1)]
TX1_4, TX1_6, TX2_4, TX2_6 = "10.10.2.2", "fd00:10:2::2", "10.10.2.3", "fd00:10:2::3"
NO_NEIGH4 = "10.10.2.9"
HINT_KEY = bytes(range(32))  # the routing-hint key of the harness's stand-in relay


def binding_request(username: str, *, before: dict | None = None, cls: stun.Class = stun.Class.REQUEST) -> bytes:
    """A real STUN message (aioice) as a client's ICE check: the attributes in
    `before` first (as browsers put PRIORITY etc.), then USERNAME."""
    msg = stun.Message(message_method=stun.Method.BINDING, message_class=cls)
    for name, value in (before or {}).items():
        msg.attributes[name] = value
    msg.attributes["USERNAME"] = username
    return bytes(msg)


# A new call's first packet: a check whose USERNAME starts with a minted server
# ufrag, that of a live call (build() admits it, as relayd does for its calls).
LIVE_UFRAG = encode_ufrag(HINT_KEY, 1, 7)
STUN_CHECK = binding_request(LIVE_UFRAG + ":cli1")


@dataclass
class Harness:
    ns: str
    dp: Datapath
    ex: NetnsExecutor
    ifindex: dict[str, int]

    def run(self, frame: bytes, ingress: str = "pub", repeat: int = 1, flags: int = 0) -> tuple[int, bytes, int]:
        return self.ex.call(libbpf.prog_test_run_xdp, self.dp.prog_fd, frame,
                            ingress_ifindex=self.ifindex[ingress], repeat=repeat, flags=flags)


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)


def build(*, max_flows: int = 1024, pin_dir: str | None = None,
          flow_ports: tuple[int, int] = (20000, 29999)) -> Harness:
    """Create the namespace and load the program. Call teardown() after."""
    tag = uuid.uuid4().hex[:8]
    ns = f"srfx-{tag}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        _ip(ns, "link", "add", "pub", "address", MAC["pub"], "type", "veth", "peer", "pubp")
        _ip(ns, "link", "add", "int", "address", MAC["int"], "type", "veth", "peer", "intp")
        for dev in ("pub", "pubp", "int", "intp", "lo"):
            _ip(ns, "link", "set", dev, "up")
        for addr, dev in ((f"{VIP4}/24", "pub"), (f"{VIP6}/64", "pub"), ("10.10.2.1/24", "int"),
                          ("fd00:10:2::1/64", "int"), *((f"{a}/32", "lo") for a in POOL4),
                          *((f"{a}/128", "lo") for a in POOL6)):
            _ip(ns, "addr", "add", addr, "dev", dev, *(["nodad"] if ":" in addr else []))
        for addr, mac, dev in ((CLIENT4, MAC["client"], "pub"), (CLIENT6, MAC["client"], "pub"),
                               (TX1_4, MAC["tx1"], "int"), (TX1_6, MAC["tx1"], "int"),
                               (TX2_4, MAC["tx2"], "int"), (TX2_6, MAC["tx2"], "int")):
            _ip(ns, "neigh", "add", addr, "lladdr", mac, "dev", dev, "nud", "permanent")
        # bpf_fib_lookup refuses to route on interfaces without forwarding.
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.conf.all.forwarding=1",
                        "net.ipv6.conf.all.forwarding=1"], check=True)
        ifindex = {dev: int(subprocess.check_output(["ip", "netns", "exec", ns, "cat",
                                                     f"/sys/class/net/{dev}/ifindex"]))
                   for dev in ("pub", "int")}
        cfg = DatapathConfig(
            pin_dir=pin_dir or f"/sys/fs/bpf/srfx-{tag}",
            vips=[Endpoint(addr=VIP4, port=VIP_PORT), Endpoint(addr=VIP6, port=VIP_PORT)],
            internal_addr4=INT4, internal_addr6=INT6, internal_addr_count=POOL_COUNT,
            flow_port_min=flow_ports[0], flow_port_max=flow_ports[1],
            max_flows=max_flows, max_flows6=max_flows, max_reverse=max_flows, max_owners=max(64, max_flows),
            # Unlimited set-up admission: fixtures and benchmarks run STUN
            # misses by the thousand (tests of the limits set their own).
            admit_source_rate=0, admit_budget=0, admit_call_rate=0, admit_rebind_rate=0,
        )
        # ICE-TCP's listeners with unlimited SYNs (the test of the limit sets its own).
        dp = Datapath(cfg, tcp=TcpConfig(port=TCP_PORT, syn_rate_per_source=0))
        try:
            dp.load(upgrade=True)
        except BaseException:
            dp.detach(purge=True)  # what load() pinned before it failed
            raise
        dp.set_roles({ifindex["pub"]: ROLE_PUBLIC, ifindex["int"]: ROLE_INTERNAL})
        dp.admit_ufrag(LIVE_UFRAG)
        return Harness(ns=ns, dp=dp, ex=NetnsExecutor(ns), ifindex=ifindex)
    except BaseException:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        raise


def teardown(h: Harness) -> None:
    try:
        h.ex.shutdown()
        h.dp.detach(purge=True)
        h.dp.close()
    finally:
        subprocess.run(["ip", "netns", "del", h.ns], capture_output=True)
