"""A lab's routing: a fleet lab's routes, the VIP's route at the edge (moved
to fail over, as anycast or ECMP would), a relay's links down and up, and the
policy rules that keep the kernel from routing between a relay's sides."""

from __future__ import annotations

import ipaddress
import socket
import time

from manager.lab.host_link import HOST_IFNAME
from manager.lab.links import READY_TIMEOUT, not_ready
from manager.lab.model import Lab
from manager.lab.netns import LabError, _ipr


def add_fleet_routes(lab: Lab) -> None:
    """A fleet lab's routes, once its links are up: each relay's towards the
    client's side and the transceivers, each transceiver's back to relay r's
    pool, and the VIP to relay 1."""
    for r in range(1, lab.relays + 1):
        relay_routes(lab, r)
        if r == 1:
            continue
        for k, tx in enumerate(lab.transceivers, start=1):
            r4, t4, r6, t6 = lab.fleet_link(r, k)
            with _ipr(tx.ns) as ipr:
                idx = ipr.link_lookup(ifname=f"eth{r - 1}")[0]
                for fam, plen in ((socket.AF_INET, 28), (socket.AF_INET6, 124)):
                    net = ipaddress.ip_network(f"{lab.relay_internal(r, fam)}/{plen}", strict=False)
                    ipr.route("add", dst=str(net), gateway=r6 if fam == socket.AF_INET6 else r4, oif=idx,
                              family=fam)
    route_vip(lab, 1)


def relay_routes(lab: Lab, r: int) -> None:
    """Relay r's routes in a fleet lab: the client's side via the edge, and
    (r >= 2) each transceiver's owner address via its own veth. Idempotent:
    also what brings a relay back after its links were down (the kernel drops
    a link's gateway routes when it goes down)."""
    with _ipr(lab.relay_namespace(r)) as ipr:
        pub = ipr.link_lookup(ifname=lab.public_ifname)[0]
        ipr.route("replace", dst="10.10.1.0/24", gateway=f"10.10.{200 + r}.1", oif=pub)
        ipr.route("replace", dst="fd00:10:1::/64", gateway=f"fd00:10:{200 + r}::1", oif=pub,
                  family=socket.AF_INET6)
        if r == 1:
            return
        for k, tx in enumerate(lab.transceivers, start=1):
            _, t4, _, t6 = lab.fleet_link(r, k)
            idx = ipr.link_lookup(ifname=f"tx{k}")[0]
            ipr.route("replace", dst=f"{tx.addr4}/32", gateway=t4, oif=idx)
            ipr.route("replace", dst=f"{tx.addr6}/128", gateway=t6, oif=idx, family=socket.AF_INET6)


def route_vip(lab: Lab, relay: int) -> None:
    """Send the VIP (both families) to relay N: the edge's routes move, as an
    anycast or ECMP fabric would after a relay's failure."""
    if lab.relays < 2:
        raise LabError(f"lab {lab.prefix} has one relay: there is no VIP route to move")
    lab.relay_namespace(relay)  # checks the index
    with _ipr(lab.edge_ns) as ipr:
        for fam, dst, gw in ((socket.AF_INET, f"{lab.vip4}/32", f"10.10.{200 + relay}.2"),
                             (socket.AF_INET6, f"{lab.vip6}/128", f"fd00:10:{200 + relay}::2")):
            ipr.route("replace", dst=dst, gateway=gw, family=fam)


def set_relay_links(lab: Lab, relay: int, up: bool) -> None:
    """All of relay N's links down (its node is lost: not even its XDP can
    forward) or up again."""
    with _ipr(lab.relay_namespace(relay)) as ipr:
        for link in ipr.link("dump"):
            if link.get("IFLA_IFNAME") != "lo":
                ipr.link("set", index=link["index"], state="up" if up else "down")
    if up:
        deadline = time.monotonic() + READY_TIMEOUT
        while any(p.startswith(lab.relay_namespace(relay) + "/") for p in not_ready(lab)):
            if time.monotonic() > deadline:
                raise LabError(f"relay {relay}'s links did not come back up")
            time.sleep(0.02)
        relay_routes(lab, relay)


def vip_route(lab: Lab) -> int | None:
    """Which relay the edge sends the VIP to now (from the kernel's table)."""
    with _ipr(lab.edge_ns) as ipr:
        for route in ipr.route("get", dst=lab.vip4):
            gw = route.get("RTA_GATEWAY")
            if gw and gw.startswith("10.10.2") and gw.endswith(".2"):
                return int(gw.split(".")[2]) - 200
    return None


RULE_PREF_RELAY_SOURCE = 90
RULE_PREF_PROHIBIT = 100


def isolate_relay(lab: Lab) -> None:
    """Policy rules in the relay: lookups sourced from a relay address (the
    fast path's fib lookups, the slow path's own sends) use the main table;
    anything else arriving on a relay interface may not be routed. Local
    delivery is decided earlier, by the local table (pref 0)."""
    for r in range(1, lab.relays + 1):
        isolate_one_relay(lab, r)


def isolate_one_relay(lab: Lab, r: int) -> None:
    pool4 = lab.internal_pool(lab.relay_internal(r, socket.AF_INET))
    pool6 = lab.internal_pool(lab.relay_internal(r, socket.AF_INET6))
    with _ipr(lab.relay_namespace(r)) as ipr:
        for fam, addrs, plen in ((socket.AF_INET, (*pool4, lab.vip4), 32),
                                 (socket.AF_INET6, (*pool6, lab.vip6), 128)):
            for addr in addrs:
                ipr.rule("add", family=fam, priority=RULE_PREF_RELAY_SOURCE, table=254, src=addr, src_len=plen)
            host = [HOST_IFNAME] if lab.host_link and r == 1 else []
            for ifname in [lab.public_ifname, *host, *lab.internal_ifnames]:
                ipr.rule("add", family=fam, priority=RULE_PREF_PROHIBIT, iifname=ifname, action="FR_ACT_PROHIBIT")

