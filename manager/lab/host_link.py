"""This machine's own way into a lab: a veth from the root namespace to the
relay's public side, so a browser here can call the agent."""

from __future__ import annotations

import socket
import subprocess

from pyroute2 import IPRoute

from manager.lab.links import add_addrs
from manager.lab.model import Lab
from manager.lab.netns import LabError, _ipr, ns_run

HOST_IFNAME = "host0"  # in the relay namespace: a second public interface, facing this machine
HOST4, RELAY_HOST4 = "10.10.250.1", "10.10.250.2"  # /30
HOST6, RELAY_HOST6 = "fd00:10:250::1", "fd00:10:250::2"  # /64


def host_ifname(lab: Lab) -> str:
    return f"{lab.prefix}-h"  # remove_host_link deletes it by this name


def add_host_link(lab: Lab) -> None:
    """Connect this machine (the root namespace) to the relay's public side:
    a veth to `host0` in the relay namespace (relayd treats it as a public
    interface) and routes to both VIPs through it, so a browser here can
    call the agent. Routes are replaced: one lab with a host link at a time."""
    if lab.relays != 1:
        raise LabError("a host link is for a single-relay lab")
    name = host_ifname(lab)
    with IPRoute() as ipr:  # created here, its peer born in the relay namespace
        ipr.link("add", ifname=name, kind="veth", peer={"ifname": HOST_IFNAME, "net_ns_fd": lab.relay_ns})
    with _ipr(lab.relay_ns) as ipr:
        idx = ipr.link_lookup(ifname=HOST_IFNAME)[0]
        ipr.link("set", index=idx, state="up")
        add_addrs(ipr, idx, [(RELAY_HOST4, 30), (RELAY_HOST6, 64)])
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)[0]
        ipr.link("set", index=idx, state="up")
        add_addrs(ipr, idx, [(HOST4, 30), (HOST6, 64)])
        ipr.route("replace", dst=f"{lab.vip4}/32", gateway=RELAY_HOST4, oif=idx)
        ipr.route("replace", dst=f"{lab.vip6}/128", gateway=RELAY_HOST6, oif=idx, family=socket.AF_INET6)
    # As for every lab veth (see links.set_offloads): GRO on, TX checksum off, both ends.
    subprocess.run(["ethtool", "-K", name, "gro", "on", "tx", "off"], check=True, capture_output=True, timeout=30)
    ns_run(lab.relay_ns, ["ethtool", "-K", HOST_IFNAME, "gro", "on", "tx", "off"])


def remove_host_link(prefix: str) -> None:
    """Delete the lab's host link (add_host_link) in this namespace. Its peer
    lives in the relay namespace, but a namespace's veths are destroyed
    asynchronously after the namespace goes: deleting the pair here is done
    when lab_down returns."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=f"{prefix}-h")
        if idx:
            ipr.link("del", index=idx[0])
