"""Bringing a lab's plumbing up: sysctls, veth pairs and their addresses,
offloads, and the wait until every link has carrier and every IPv6 address
is usable. Links and addresses go through pyroute2, sysctls through /proc/sys
on a thread inside the namespace; only offloads use a subprocess (`ethtool -K`)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from pyroute2 import IPRoute

from manager.lab.model import Lab
from manager.lab.netns import LabError, _ipr, ns_popen, run_in_netns

READY_TIMEOUT = 5.0
EDGE_CLIENT4, EDGE_CLIENT6 = "10.10.1.254", "fd00:10:1::fe"
_IFA_F_NODAD = 0x02
_IFA_F_TENTATIVE = 0x40
_IFA_F_DADFAILED = 0x08


def write_sysctls(values: dict[str, str]) -> None:
    # Runs on a NetnsExecutor thread: /proc/sys/net resolves to the calling
    # thread's namespace.
    for key, value in values.items():
        Path("/proc/sys", *key.split(".")).write_text(value)


def set_sysctls(lab: Lab) -> None:
    # Before any interface exists, so new interfaces inherit conf.default.
    common = {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0",
              "net.ipv6.conf.default.disable_ipv6": "0"}
    # Forwarding on: bpf_fib_lookup returns FWD_DISABLED without it. The
    # kernel's own routing between the sides is stopped by isolate_relay.
    relay = {**common, "net.ipv4.ip_forward": "1",
             "net.ipv6.conf.all.forwarding": "1", "net.ipv6.conf.default.forwarding": "1",
             # A relay's links may go down and up (a fleet lab's failover):
             # its IPv6 addresses must survive that, as IPv4 ones do.
             "net.ipv6.conf.all.keep_addr_on_down": "1", "net.ipv6.conf.default.keep_addr_on_down": "1"}
    forwarders = {*lab.relay_namespaces, lab.edge_ns}
    for ns in lab.namespaces:
        run_in_netns(ns, write_sysctls, relay if ns in forwarders else common)


def add_addrs(ipr: IPRoute, index: int, addrs: Sequence[tuple[str, int]]) -> None:
    for addr, plen in addrs:
        flags = _IFA_F_NODAD if ":" in addr else 0  # usable at once, no DAD wait
        ipr.addr("add", index=index, address=addr, prefixlen=plen, flags=flags)


def configure_links(lab: Lab) -> None:
    # In a fleet lab the client hangs off the edge router (configure_fleet_links).
    wired = lab.endpoints if lab.relays == 1 else lab.transceivers
    with _ipr(lab.relay_ns) as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        add_addrs(ipr, lo, [*((a, 32) for a in lab.internal_pool(lab.internal4)),
                            *((a, 128) for a in lab.internal_pool(lab.internal6))])
        for ep in wired:
            # Create the pair in the relay ns with the peer born in its own ns:
            # nothing ever appears in the root namespace, so no name clashes.
            ipr.link("add", ifname=ep.relay_ifname, kind="veth",
                     peer={"ifname": ep.ifname, "net_ns_fd": ep.ns})
            idx = ipr.link_lookup(ifname=ep.relay_ifname)[0]
            ipr.link("set", index=idx, state="up")
            add_addrs(ipr, idx, [(ep.relay_addr4, ep.prefixlen4), (ep.relay_addr6, ep.prefixlen6)])
    for ep in wired:
        with _ipr(ep.ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            idx = ipr.link_lookup(ifname=ep.ifname)[0]
            ipr.link("set", index=idx, state="up")
            add_addrs(ipr, idx, [(ep.addr4, ep.prefixlen4), (ep.addr6, ep.prefixlen6)])
            ipr.route("add", dst="0.0.0.0/0", gateway=ep.relay_addr4, oif=idx)
            ipr.route("add", dst="::/0", gateway=ep.relay_addr6, oif=idx, family=socket.AF_INET6)


def veth(ipr: IPRoute, ifname: str, peer: str, peer_ns: str, addrs: Sequence[tuple[str, int]]) -> int:
    ipr.link("add", ifname=ifname, kind="veth", peer={"ifname": peer, "net_ns_fd": peer_ns})
    idx = ipr.link_lookup(ifname=ifname)[0]
    ipr.link("set", index=idx, state="up")
    add_addrs(ipr, idx, addrs)
    return idx


def link_up(ipr: IPRoute, ifname: str, addrs: Sequence[tuple[str, int]]) -> int:
    idx = ipr.link_lookup(ifname=ifname)[0]
    ipr.link("set", index=idx, state="up")
    add_addrs(ipr, idx, addrs)
    return idx


def configure_fleet_links(lab: Lab) -> None:
    """The edge router, relays 2..N and their links (the fleet picture in manager.lab.model)."""
    edge, c = lab.edge_ns, lab.client
    with _ipr(edge) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        veth(ipr, "cl0", c.ifname, c.ns, [(EDGE_CLIENT4, 24), (EDGE_CLIENT6, 64)])
        for r in range(1, lab.relays + 1):
            veth(ipr, f"r{r}", lab.public_ifname, lab.relay_namespace(r),
                 [(f"10.10.{200 + r}.1", 24), (f"fd00:10:{200 + r}::1", 64)])
    with _ipr(c.ns) as ipr:
        # The client's address alone (/32): the VIP, in its old subnet, must
        # not look on-link; everything goes through the edge.
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        idx = link_up(ipr, c.ifname, [(c.addr4, 32), (c.addr6, 128)])
        ipr.route("add", dst=f"{EDGE_CLIENT4}/32", oif=idx, scope=253)  # on-link
        ipr.route("add", dst="0.0.0.0/0", gateway=EDGE_CLIENT4, oif=idx)
        ipr.route("add", dst=f"{EDGE_CLIENT6}/128", oif=idx, family=socket.AF_INET6)
        ipr.route("add", dst="::/0", gateway=EDGE_CLIENT6, oif=idx, family=socket.AF_INET6)
    for r in range(1, lab.relays + 1):
        ns = lab.relay_namespace(r)
        with _ipr(ns) as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
            vips = [(lab.vip4, 32), (lab.vip6, 128)]
            pools = [] if r == 1 else [
                *((a, 32) for a in lab.internal_pool(lab.relay_internal(r, socket.AF_INET))),
                *((a, 128) for a in lab.internal_pool(lab.relay_internal(r, socket.AF_INET6)))]
            add_addrs(ipr, lo, [*vips, *pools])
            link_up(ipr, lab.public_ifname, [(lab.relay_public(r), 24), (lab.relay_public(r, socket.AF_INET6), 64)])
            if r >= 2:
                for k, tx in enumerate(lab.transceivers, start=1):
                    r4, _, r6, _ = lab.fleet_link(r, k)
                    veth(ipr, f"tx{k}", f"eth{r - 1}", tx.ns, [(r4, 24), (r6, 64)])
        if r == 1:
            continue
        for k, tx in enumerate(lab.transceivers, start=1):
            _, t4, _, t6 = lab.fleet_link(r, k)
            with _ipr(tx.ns) as ipr:
                link_up(ipr, f"eth{r - 1}", [(t4, 24), (t6, 64)])


def set_offloads(lab: Lab) -> None:
    # GRO on both ends: XDP_REDIRECT into a veth is delivered only if the peer
    # has an XDP program or GRO on (redirects go both ways). TX checksum off:
    # frames carry full software checksums, which XDP patches incrementally
    # (a CHECKSUM_PARTIAL pseudo-header sum would be wrong to patch).
    jobs = []
    pairs = [pair for ep in lab.endpoints for pair in ((ep.ns, ep.ifname), (lab.relay_ns, ep.relay_ifname))]
    if lab.relays > 1:
        pairs = [p for p in pairs if p != (lab.relay_ns, lab.public_ifname)]
        pairs += [(lab.edge_ns, "cl0")]
        for r in range(1, lab.relays + 1):
            pairs += [(lab.edge_ns, f"r{r}"), (lab.relay_namespace(r), lab.public_ifname)]
            if r >= 2:
                pairs += [p for k, tx in enumerate(lab.transceivers, start=1)
                          for p in ((lab.relay_namespace(r), f"tx{k}"), (tx.ns, f"eth{r - 1}"))]
    for ns, dev in pairs:
        jobs.append((ns, dev, ns_popen(ns, ["ethtool", "-K", dev, "gro", "on", "tx", "off"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
    errors = []
    for ns, dev, proc in jobs:
        _, err = proc.communicate(timeout=30)
        if proc.returncode != 0:
            errors.append(f"{ns}/{dev}: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    if errors:
        raise LabError("ethtool -K failed: " + "; ".join(errors))


def not_ready(lab: Lab) -> list[str]:
    """What is not ready yet: veth links without carrier, tentative IPv6 addresses."""
    pending = []
    for ns in lab.namespaces:
        with _ipr(ns) as ipr:
            links = ipr.link("dump")
            names = {link["index"]: link.get("IFLA_IFNAME") for link in links}
            for link in links:
                if link.get("IFLA_IFNAME") != "lo" and link.get("IFLA_OPERSTATE") != "UP":
                    pending.append(f"{ns}/{link.get('IFLA_IFNAME')} {link.get('IFLA_OPERSTATE')}")
            for a in ipr.addr("dump", family=socket.AF_INET6):
                flags = a.get("IFA_FLAGS") or a["flags"]
                if flags & _IFA_F_DADFAILED:
                    raise LabError(f"{ns}/{names.get(a['index'])}: DAD failed for {a.get('IFA_ADDRESS')}")
                if flags & _IFA_F_TENTATIVE:
                    pending.append(f"{ns}/{names.get(a['index'])} {a.get('IFA_ADDRESS')} tentative")
    return pending


def wait_ready(lab: Lab, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while pending := not_ready(lab):
        if time.monotonic() > deadline:
            raise LabError(f"not ready after {timeout:.0f}s: {', '.join(pending[:4])}")
        time.sleep(0.02)

