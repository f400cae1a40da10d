"""Network-namespace lab: client, relay and transceivers wired by veth pairs.

Shared by `make demo`, `relayctl lab up/down` and the test suite.

    client ns            relay ns                         transceiver ns (k = 1..N)
    eth0 10.10.1.2 ─veth─ pub0 10.10.1.1 (VIP :3478)
                          lo   10.10.0.1 (relay-internal)
                          txk  10.10.(1+k).1 ─veth─────── eth0 10.10.(1+k).2

(and the same in IPv6: fd00:10:1::/64, fd00:10::1/128, fd00:10:(1+k)::/64).

A fleet lab (relays=N >= 2) puts an edge router between the client and the
relays, which all hold the VIP; the edge routes it to one relay at a time
(route_vip), as anycast or ECMP would:

    client ns              edge ns                      relay r ns (r = 1..N)
    eth0 10.10.1.2/32 ─veth─ cl0 10.10.1.254
                             r<r> 10.10.(200+r).1 ─veth─ pub0 10.10.(200+r).2, lo: VIP 10.10.1.1,
                                                         pool 10.10.0.(1+16(r-1))..
    relay 1 reaches transceiver k as above; relay r >= 2 through its own veth
    tx<k> 10.10.n.1 ─── eth<r-1> 10.10.n.2 of transceiver k (n = 100+20(r-2)+k),
    routing tx k's owner address 10.10.(1+k).2 via 10.10.n.2; tx k routes
    relay r's pool (a /28) back the same way.
The kernel never routes between the relay's sides: only the XDP fast path and
the userspace slow path move packets across. Forwarding itself is on, because
bpf_fib_lookup refuses interfaces without it; policy rules prohibit routing
anything whose source is not a relay address (the fast path's lookups use the
relay-internal address or the VIP as source, so they are unaffected).

Links, addresses and routes go through pyroute2, sysctls through /proc/sys on
a thread inside the namespace; only offloads use a subprocess (`ethtool -K`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute, netns

from manager.lab.netns import (  # noqa: F401 - re-exported: the lab's public names
    NETNS_DIR,
    LabError,
    NetnsExecutor,
    _ipr,
    _link,
    ifindex,
    in_netns,
    mac,
    ns_popen,
    ns_run,
    ns_socket,
    run_in_netns,
)
from manager.protocol.api import one_line

T = TypeVar("T")

STATE_DIR = Path("/run/splitrelay")
MAX_PREFIX_LEN = 10
MAX_TRANSCEIVERS = 253  # 10.10.(1+k).0/24 must stay below 10.10.255.0
MAX_RELAYS = 4  # fleet labs: 10.10.(200+r).0/24 edge links, 16 pool addresses per relay
MAX_FLEET_TRANSCEIVERS = 20  # 10.10.(100+20(r-2)+k).0/24 relay r >= 2 to transceiver k
RELAY_PORT = 3478
SIGNALING_PORT = 8080
READY_TIMEOUT = 5.0

_PREFIX_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_IFA_F_NODAD = 0x02
_IFA_F_TENTATIVE = 0x40
_IFA_F_DADFAILED = 0x08


@dataclass
class Endpoint:
    """One side of the lab outside the relay: a namespace whose `eth0` is
    veth-paired with `relay_ifname` in the relay namespace."""

    name: str  # "client", "tx1", ...
    ns: str  # network namespace name
    ifname: str  # interface in `ns`
    addr4: str
    addr6: str
    relay_ifname: str  # peer interface in the relay ns ("pub0", "tx1", ...)
    relay_addr4: str  # peer addresses; also this endpoint's default gateways
    relay_addr6: str
    prefixlen4: int = 24
    prefixlen6: int = 64


@dataclass
class Lab:
    """A running (or planned) lab topology; everything the demo and tests need."""

    prefix: str
    relay_ns: str
    client: Endpoint
    transceivers: list[Endpoint]
    vip4: str = "10.10.1.1"
    vip6: str = "fd00:10:1::1"
    port: int = RELAY_PORT
    internal4: str = "10.10.0.1"  # on the relay's lo: first address of the flow-source pool
    internal6: str = "fd00:10::1"
    # Flow sources come from two addresses per family, so every lab call
    # exercises the pool (legs alternate between them).
    internal_count: int = 2
    public_ifname: str = "pub0"
    signaling_url: str = f"http://10.10.1.1:{SIGNALING_PORT}"
    created_at: float = field(default_factory=time.time)
    relays: int = 1  # >= 2: a fleet sharing the VIP behind an edge router
    host_link: bool = False  # this machine reaches the VIPs through the relay's `host0` (add_host_link)

    # --- construction -----------------------------------------------------

    @classmethod
    def plan(cls, prefix: str, transceivers: int = 2, relays: int = 1) -> Lab:
        """The topology for `prefix` with `transceivers` transceivers (no side effects)."""
        _check_prefix(prefix)
        _check_count(transceivers)
        if not 1 <= relays <= MAX_RELAYS:
            raise LabError(f"relays must be 1..{MAX_RELAYS}, got {relays}")
        if relays > 1 and transceivers > MAX_FLEET_TRANSCEIVERS:
            raise LabError(f"a lab of {relays} relays takes at most {MAX_FLEET_TRANSCEIVERS} transceivers")
        client = Endpoint(
            name="client", ns=f"{prefix}-client", ifname="eth0",
            addr4="10.10.1.2", addr6="fd00:10:1::2",
            relay_ifname="pub0", relay_addr4="10.10.1.1", relay_addr6="fd00:10:1::1",
        )
        txs = []
        for k in range(1, transceivers + 1):
            # The third IPv6 group reuses the decimal digits of the IPv4 octet
            # so that 10.10.12.2 pairs with fd00:10:12::2 (readable, still unique).
            net = 1 + k
            txs.append(Endpoint(
                name=f"tx{k}", ns=f"{prefix}-tx{k}", ifname="eth0",
                addr4=f"10.10.{net}.2", addr6=f"fd00:10:{net}::2",
                relay_ifname=f"tx{k}", relay_addr4=f"10.10.{net}.1",
                relay_addr6=f"fd00:10:{net}::1",
            ))
        return cls(prefix=prefix, relay_ns=f"{prefix}-relay", client=client, transceivers=txs, relays=relays)

    # --- a fleet of relays ---------------------------------------------------

    def relay_namespace(self, r: int) -> str:
        """Relay r's namespace (1-based; relay 1 keeps the single-relay name)."""
        if not 1 <= r <= self.relays:
            raise LabError(f"lab {self.prefix} has no relay {r} (1..{self.relays})")
        return self.relay_ns if r == 1 else f"{self.prefix}-relay{r}"

    @property
    def relay_namespaces(self) -> list[str]:
        return [self.relay_namespace(r) for r in range(1, self.relays + 1)]

    @property
    def edge_ns(self) -> str | None:
        return f"{self.prefix}-edge" if self.relays > 1 else None

    def relay_internal(self, r: int, family: int = socket.AF_INET) -> str:
        """First address of relay r's flow-source pool (relay 1: internal4/6)."""
        base = ipaddress.ip_address(self.internal6 if family == socket.AF_INET6 else self.internal4)
        return str(base + 16 * (r - 1))

    def relay_public(self, r: int, family: int = socket.AF_INET) -> str:
        """Relay r's own public address in a fleet lab (its pub0, behind the edge)."""
        return f"fd00:10:{200 + r}::2" if family == socket.AF_INET6 else f"10.10.{200 + r}.2"

    @property
    def signaling_url6(self) -> str:
        """The signaling API on the IPv6 VIP (a client with no IPv4 route)."""
        return f"http://[{self.vip6}]:{SIGNALING_PORT}"

    def relay_signaling_url(self, r: int) -> str:
        """Relay r's signaling API, whichever relay the VIP routes to."""
        if self.relays == 1:
            return self.signaling_url
        return f"http://{self.relay_public(r)}:{SIGNALING_PORT}"

    def fleet_link(self, r: int, k: int) -> tuple[str, str, str, str]:
        """(relay addr4, tx addr4, relay addr6, tx addr6) of relay r's (r >= 2) veth to transceiver k."""
        n = 100 + 20 * (r - 2) + k
        return f"10.10.{n}.1", f"10.10.{n}.2", f"fd00:10:{n}::1", f"fd00:10:{n}::2"

    def internal_pool(self, first: str) -> list[str]:
        """The pool of internal addresses that starts at `first` (internal4 or internal6)."""
        base = ipaddress.ip_address(first)
        return [str(base + i) for i in range(self.internal_count)]

    # --- names ------------------------------------------------------------

    @property
    def client_ns(self) -> str:
        return self.client.ns

    @property
    def transceiver_ns(self) -> list[str]:
        return [t.ns for t in self.transceivers]

    @property
    def internal_ifnames(self) -> list[str]:
        """Relay-side interfaces towards the transceivers (tx1, tx2, ...)."""
        return [t.relay_ifname for t in self.transceivers]

    @property
    def namespaces(self) -> list[str]:
        fleet = [*self.relay_namespaces[1:], self.edge_ns] if self.relays > 1 else []
        return [self.client.ns, self.relay_ns, *self.transceiver_ns, *fleet]

    @property
    def endpoints(self) -> list[Endpoint]:
        return [self.client, *self.transceivers]

    @property
    def state_file(self) -> Path:
        return state_file(self.prefix)

    def vip(self, family: int = socket.AF_INET) -> tuple[str, int]:
        """The relay's public address as a socket address for `family`."""
        return (self.vip6 if family == socket.AF_INET6 else self.vip4, self.port)

    def transceiver(self, k: int) -> Endpoint:
        """Transceiver k (1-based)."""
        if not 1 <= k <= len(self.transceivers):
            raise LabError(f"lab {self.prefix} has no transceiver {k} (1..{len(self.transceivers)})")
        return self.transceivers[k - 1]

    def ns(self, name: str) -> str:
        """Namespace name for a role ("client", "relay", "tx1") or a full name."""
        if name in self.namespaces:
            return name
        full = f"{self.prefix}-{name}"
        if full in self.namespaces:
            return full
        raise LabError(f"lab {self.prefix} has no namespace {name!r} "
                       f"(roles: client, relay, tx1..tx{len(self.transceivers)})")

    def exists(self) -> bool:
        """True if all of the lab's namespaces are present."""
        present = set(netns.listnetns())
        return all(n in present for n in self.namespaces)

    # --- helpers running things inside the lab -----------------------------

    def popen(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        return ns_popen(self.ns(ns), argv, **kw)

    def run(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
        return ns_run(self.ns(ns), argv, **kw)

    def executor(self, ns: str) -> NetnsExecutor:
        return NetnsExecutor(self.ns(ns))

    def socket(self, ns: str, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM,
               proto: int = 0, bind: tuple[str, int] | None = None) -> socket.socket:
        return ns_socket(self.ns(ns), family, type, proto, bind)

    def ifindex(self, ns: str, ifname: str) -> int:
        return ifindex(self.ns(ns), ifname)

    def mac(self, ns: str, ifname: str) -> str:
        return mac(self.ns(ns), ifname)

    # --- persistence ------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Lab:
        try:
            d = json.loads(text)
            d["client"] = Endpoint(**d["client"])
            d["transceivers"] = [Endpoint(**t) for t in d["transceivers"]]
            return cls(**d)
        except (ValueError, KeyError, TypeError) as e:
            raise LabError(f"malformed lab description: {e}") from None


# --- validation ---------------------------------------------------------------

def _check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or len(prefix) > MAX_PREFIX_LEN or not _PREFIX_RE.match(prefix):
        raise LabError(f"invalid lab prefix {prefix!r}: use 1-{MAX_PREFIX_LEN} characters "
                       "of a-z, 0-9 and '-', starting with a letter or digit")
    return prefix


def _check_count(transceivers: int) -> None:
    if isinstance(transceivers, bool) or not isinstance(transceivers, int) \
            or not 1 <= transceivers <= MAX_TRANSCEIVERS:
        raise LabError(f"invalid number of transceivers {transceivers!r}: use 1-{MAX_TRANSCEIVERS}")


def _check_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, veth, sysctls): run as root")


def _check_environment() -> None:
    _check_root()
    for tool in ("ip", "ethtool"):
        if shutil.which(tool) is None:
            raise LabError(f"{tool!r} not found: install iproute2 and ethtool (make setup)")


def random_prefix() -> str:
    return "sr" + secrets.token_hex(3)


def _lab_namespaces(prefix: str) -> list[str]:
    """Existing namespaces that belong to `prefix` (exact role names only, so
    prefix "sr" never matches another lab "sr-a")."""
    pat = re.compile(rf"^{re.escape(prefix)}-(client|relay|relay[0-9]+|edge|tx[0-9]+)$")
    return sorted(n for n in netns.listnetns() if pat.match(n))


# --- persistence ---------------------------------------------------------------

def state_file(prefix: str) -> Path:
    return STATE_DIR / f"lab-{prefix}.json"


def _save_state(lab: Lab) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    path = lab.state_file
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(lab.to_json())
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file


def load_lab(prefix: str) -> Lab:
    """The lab recorded by `lab_up(prefix)` (possibly from another process)."""
    _check_prefix(prefix)
    try:
        return Lab.from_json(state_file(prefix).read_text())
    except FileNotFoundError:
        raise LabError(f"no lab with prefix {prefix!r} (no {state_file(prefix)})") from None


def list_labs() -> list[Lab]:
    """Labs recorded in STATE_DIR, oldest first (malformed files are skipped)."""
    labs = []
    for path in STATE_DIR.glob("lab-*.json"):
        try:
            labs.append(Lab.from_json(path.read_text()))
        except (OSError, LabError):
            continue
    return sorted(labs, key=lambda lab: (lab.created_at, lab.prefix))


# --- bring-up -------------------------------------------------------------------

def _write_sysctls(values: dict[str, str]) -> None:
    # Runs on a NetnsExecutor thread: /proc/sys/net resolves to the calling
    # thread's namespace.
    for key, value in values.items():
        Path("/proc/sys", *key.split(".")).write_text(value)


def _set_sysctls(lab: Lab) -> None:
    # Before any interface exists, so new interfaces inherit conf.default.
    common = {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0",
              "net.ipv6.conf.default.disable_ipv6": "0"}
    # Forwarding on: bpf_fib_lookup returns FWD_DISABLED without it. The
    # kernel's own routing between the sides is stopped by _isolate_relay.
    relay = {**common, "net.ipv4.ip_forward": "1",
             "net.ipv6.conf.all.forwarding": "1", "net.ipv6.conf.default.forwarding": "1",
             # A relay's links may go down and up (a fleet lab's failover):
             # its IPv6 addresses must survive that, as IPv4 ones do.
             "net.ipv6.conf.all.keep_addr_on_down": "1", "net.ipv6.conf.default.keep_addr_on_down": "1"}
    forwarders = {*lab.relay_namespaces, lab.edge_ns}
    for ns in lab.namespaces:
        run_in_netns(ns, _write_sysctls, relay if ns in forwarders else common)


def _add_addrs(ipr: IPRoute, index: int, addrs: Sequence[tuple[str, int]]) -> None:
    for addr, plen in addrs:
        flags = _IFA_F_NODAD if ":" in addr else 0  # usable at once, no DAD wait
        ipr.addr("add", index=index, address=addr, prefixlen=plen, flags=flags)


def _configure_links(lab: Lab) -> None:
    # In a fleet lab the client hangs off the edge router (_configure_fleet_links).
    wired = lab.endpoints if lab.relays == 1 else lab.transceivers
    with _ipr(lab.relay_ns) as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        _add_addrs(ipr, lo, [*((a, 32) for a in lab.internal_pool(lab.internal4)),
                             *((a, 128) for a in lab.internal_pool(lab.internal6))])
        for ep in wired:
            # Create the pair in the relay ns with the peer born in its own ns:
            # nothing ever appears in the root namespace, so no name clashes.
            ipr.link("add", ifname=ep.relay_ifname, kind="veth",
                     peer={"ifname": ep.ifname, "net_ns_fd": ep.ns})
            idx = ipr.link_lookup(ifname=ep.relay_ifname)[0]
            ipr.link("set", index=idx, state="up")
            _add_addrs(ipr, idx, [(ep.relay_addr4, ep.prefixlen4), (ep.relay_addr6, ep.prefixlen6)])
    for ep in wired:
        with _ipr(ep.ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            idx = ipr.link_lookup(ifname=ep.ifname)[0]
            ipr.link("set", index=idx, state="up")
            _add_addrs(ipr, idx, [(ep.addr4, ep.prefixlen4), (ep.addr6, ep.prefixlen6)])
            ipr.route("add", dst="0.0.0.0/0", gateway=ep.relay_addr4, oif=idx)
            ipr.route("add", dst="::/0", gateway=ep.relay_addr6, oif=idx, family=socket.AF_INET6)


EDGE_CLIENT4, EDGE_CLIENT6 = "10.10.1.254", "fd00:10:1::fe"


def _veth(ipr: IPRoute, ifname: str, peer: str, peer_ns: str, addrs: Sequence[tuple[str, int]]) -> int:
    ipr.link("add", ifname=ifname, kind="veth", peer={"ifname": peer, "net_ns_fd": peer_ns})
    idx = ipr.link_lookup(ifname=ifname)[0]
    ipr.link("set", index=idx, state="up")
    _add_addrs(ipr, idx, addrs)
    return idx


def _up(ipr: IPRoute, ifname: str, addrs: Sequence[tuple[str, int]]) -> int:
    idx = ipr.link_lookup(ifname=ifname)[0]
    ipr.link("set", index=idx, state="up")
    _add_addrs(ipr, idx, addrs)
    return idx


def _configure_fleet_links(lab: Lab) -> None:
    """The edge router, relays 2..N and their links (see the module docstring)."""
    edge, c = lab.edge_ns, lab.client
    with _ipr(edge) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        _veth(ipr, "cl0", c.ifname, c.ns, [(EDGE_CLIENT4, 24), (EDGE_CLIENT6, 64)])
        for r in range(1, lab.relays + 1):
            _veth(ipr, f"r{r}", lab.public_ifname, lab.relay_namespace(r),
                  [(f"10.10.{200 + r}.1", 24), (f"fd00:10:{200 + r}::1", 64)])
    with _ipr(c.ns) as ipr:
        # The client's address alone (/32): the VIP, in its old subnet, must
        # not look on-link; everything goes through the edge.
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        idx = _up(ipr, c.ifname, [(c.addr4, 32), (c.addr6, 128)])
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
            _add_addrs(ipr, lo, [*vips, *pools])
            _up(ipr, lab.public_ifname, [(lab.relay_public(r), 24), (lab.relay_public(r, socket.AF_INET6), 64)])
            if r >= 2:
                for k, tx in enumerate(lab.transceivers, start=1):
                    r4, _, r6, _ = lab.fleet_link(r, k)
                    _veth(ipr, f"tx{k}", f"eth{r - 1}", tx.ns, [(r4, 24), (r6, 64)])
        _relay_routes(lab, r)
        if r == 1:
            continue
        for k, tx in enumerate(lab.transceivers, start=1):
            r4, t4, r6, t6 = lab.fleet_link(r, k)
            with _ipr(tx.ns) as ipr:
                idx = _up(ipr, f"eth{r - 1}", [(t4, 24), (t6, 64)])
                for fam, plen in ((socket.AF_INET, 28), (socket.AF_INET6, 124)):
                    net = ipaddress.ip_network(f"{lab.relay_internal(r, fam)}/{plen}", strict=False)
                    ipr.route("add", dst=str(net), gateway=r6 if fam == socket.AF_INET6 else r4, oif=idx,
                              family=fam)
    route_vip(lab, 1)


def _relay_routes(lab: Lab, r: int) -> None:
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
        while any(p.startswith(lab.relay_namespace(relay) + "/") for p in _not_ready(lab)):
            if time.monotonic() > deadline:
                raise LabError(f"relay {relay}'s links did not come back up")
            time.sleep(0.02)
        _relay_routes(lab, relay)


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


def _isolate_relay(lab: Lab) -> None:
    """Policy rules in the relay: lookups sourced from a relay address (the
    fast path's fib lookups, the slow path's own sends) use the main table;
    anything else arriving on a relay interface may not be routed. Local
    delivery is decided earlier, by the local table (pref 0)."""
    for r in range(1, lab.relays + 1):
        _isolate_one_relay(lab, r)


def _isolate_one_relay(lab: Lab, r: int) -> None:
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


def _set_offloads(lab: Lab) -> None:
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


def _not_ready(lab: Lab) -> list[str]:
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


def _wait_ready(lab: Lab, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while pending := _not_ready(lab):
        if time.monotonic() > deadline:
            raise LabError(f"not ready after {timeout:.0f}s: {', '.join(pending[:4])}")
        time.sleep(0.02)


def lab_up(prefix: str | None = None, transceivers: int = 2, relays: int = 1, *, host_link: bool = False) -> Lab:
    """Create the lab's namespaces and links, record it in STATE_DIR, return it.
    `host_link`: also connect this machine to the relay's public side (add_host_link).

    On any failure, whatever was created is removed and LabError is raised.
    """
    _check_environment()
    prefix = random_prefix() if prefix is None else _check_prefix(prefix)
    lab = Lab.plan(prefix, transceivers, relays)
    lab.host_link = host_link
    taken = _lab_namespaces(prefix)
    if taken or lab.state_file.exists():
        raise LabError(f"lab prefix {prefix!r} is already in use "
                       f"({', '.join(taken) or lab.state_file}); run `relayctl lab down {prefix}` first")
    created: list[str] = []
    step = "creating namespaces"
    try:
        for ns in lab.namespaces:
            netns.create(ns)
            created.append(ns)
        step = "setting sysctls"
        _set_sysctls(lab)
        step = "creating links"
        _configure_links(lab)
        if lab.relays > 1:
            _configure_fleet_links(lab)
        if host_link:
            step = "connecting this machine to the relay"
            add_host_link(lab)
        step = "adding policy rules"
        _isolate_relay(lab)
        step = "setting offloads"
        _set_offloads(lab)
        step = "waiting for links and addresses"
        _wait_ready(lab)
        step = "saving state"
        _save_state(lab)
    except BaseException as e:  # KeyboardInterrupt too: never leave half a lab
        _remove_namespaces(created)
        with contextlib.suppress(OSError):
            lab.state_file.unlink()
        if isinstance(e, Exception):
            raise LabError(f"lab {prefix}: {step} failed: {one_line(e) or type(e).__name__}") from e
        raise
    return lab


# --- the host's own way in ----------------------------------------------------------

HOST_IFNAME = "host0"  # in the relay namespace: a second public interface, facing this machine
HOST4, RELAY_HOST4 = "10.10.250.1", "10.10.250.2"  # /30
HOST6, RELAY_HOST6 = "fd00:10:250::1", "fd00:10:250::2"  # /64


def host_ifname(lab: Lab) -> str:
    return f"{lab.prefix}-h"  # _remove_host_link deletes it by this name


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
        _add_addrs(ipr, idx, [(RELAY_HOST4, 30), (RELAY_HOST6, 64)])
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)[0]
        ipr.link("set", index=idx, state="up")
        _add_addrs(ipr, idx, [(HOST4, 30), (HOST6, 64)])
        ipr.route("replace", dst=f"{lab.vip4}/32", gateway=RELAY_HOST4, oif=idx)
        ipr.route("replace", dst=f"{lab.vip6}/128", gateway=RELAY_HOST6, oif=idx, family=socket.AF_INET6)
    # As for every lab veth (see _set_offloads): GRO on, TX checksum off, both ends.
    subprocess.run(["ethtool", "-K", name, "gro", "on", "tx", "off"], check=True, capture_output=True, timeout=30)
    ns_run(lab.relay_ns, ["ethtool", "-K", HOST_IFNAME, "gro", "on", "tx", "off"])


# --- tear-down -------------------------------------------------------------------

def _kill_ns_processes(namespaces: Sequence[str], grace: float = 2.0) -> None:
    """Stop processes still running in the lab's namespaces (e.g. a relayd the
    demo started): they would keep the namespace, its veths and XDP alive."""
    pids = [pid for ns, ps in netns.ns_pids().items() if ns in namespaces for pid in ps
            if pid != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            if pids:
                time.sleep(0.02)
        if not pids:
            return


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a process from
    /proc/PID/stat, or None when it is gone. The start time tells a reused pid
    from the process it once named."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    # A zombie counts as gone; reaping it is its parent's business (a Popen
    # of the caller must still see the real exit status).
    st = proc_stat(pid)
    return st is not None and st[0] != "Z"


def _remove_namespaces(names: Sequence[str]) -> list[str]:
    removed = []
    for ns in names:
        try:
            netns.remove(ns)
            removed.append(ns)
        except FileNotFoundError:
            pass  # already gone
    return removed


def lab_down(lab_or_prefix: Lab | str, kill: bool = True) -> list[str]:
    """Remove a lab's namespaces (and processes in them if `kill`) and its state
    file. Tolerates missing pieces; touches only that prefix's namespaces.
    Returns the namespaces removed (empty if nothing was left)."""
    _check_root()
    if isinstance(lab_or_prefix, Lab):
        prefix, known = lab_or_prefix.prefix, lab_or_prefix.namespaces
    else:
        prefix, known = _check_prefix(lab_or_prefix), []
    present = set(netns.listnetns())
    names = sorted({*(n for n in known if n in present), *_lab_namespaces(prefix)})
    if kill and names:
        _kill_ns_processes(names)
    _remove_host_link(prefix)
    removed = _remove_namespaces(names)
    with contextlib.suppress(FileNotFoundError):
        state_file(prefix).unlink()
    return removed


def _remove_host_link(prefix: str) -> None:
    """Delete the lab's host link (add_host_link) in this namespace. Its peer
    lives in the relay namespace, but a namespace's veths are destroyed
    asynchronously after the namespace goes: deleting the pair here is done
    when lab_down returns."""
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=f"{prefix}-h")
        if idx:
            ipr.link("del", index=idx[0])


@contextlib.contextmanager
def lab(prefix: str | None = None, transceivers: int = 2, relays: int = 1) -> Iterator[Lab]:
    """`with lab() as l:` a lab that is removed on exit, whatever happens."""
    lb = lab_up(prefix, transceivers, relays)
    try:
        yield lb
    finally:
        lab_down(lb)


__all__ = [
    "Endpoint", "Lab", "LabError", "NetnsExecutor", "STATE_DIR", "ifindex", "in_netns",
    "lab", "lab_down", "lab_up", "list_labs", "load_lab", "mac", "ns_popen", "ns_run",
    "ns_socket", "proc_stat", "random_prefix", "route_vip", "run_in_netns", "state_file",
]
