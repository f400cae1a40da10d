"""The lab's model: client, relay and transceivers wired by veth pairs, as a
plan (addresses, names, namespaces) with no side effects; `lifecycle` builds
and removes it. Shared by `make demo`, `relayctl lab up/down` and the tests.

    client ns            relay ns                         transceiver ns (k = 1..N)
    eth0 10.10.1.2 ─veth─ pub0 10.10.1.1 (VIP :3478)
                          lo   10.10.0.1 (relay-internal)
                          txk  10.10.(1+k).1 ─veth─────── eth0 10.10.(1+k).2

(and the same in IPv6: fd00:10:1::/64, fd00:10::1/128, fd00:10:(1+k)::/64).

A fleet lab (relays=N >= 2) puts an edge router between the client and the
relays, which all hold the VIP; the edge routes it to one relay at a time
(routing.route_vip), as anycast or ECMP would:

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
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import netns

from manager.lab.netns import LabError, NetnsExecutor, ifindex, mac, ns_popen, ns_run, ns_socket

STATE_DIR = Path("/run/splitrelay")
MAX_PREFIX_LEN = 10
MAX_TRANSCEIVERS = 253  # 10.10.(1+k).0/24 must stay below 10.10.255.0
MAX_RELAYS = 4  # fleet labs: 10.10.(200+r).0/24 edge links, 16 pool addresses per relay
MAX_FLEET_TRANSCEIVERS = 20  # 10.10.(100+20(r-2)+k).0/24 relay r >= 2 to transceiver k
RELAY_PORT = 3478
SIGNALING_PORT = 8080

_PREFIX_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")


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
        check_prefix(prefix)
        check_count(transceivers)
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

def check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or len(prefix) > MAX_PREFIX_LEN or not _PREFIX_RE.match(prefix):
        raise LabError(f"invalid lab prefix {prefix!r}: use 1-{MAX_PREFIX_LEN} characters "
                       "of a-z, 0-9 and '-', starting with a letter or digit")
    return prefix


def check_count(transceivers: int) -> None:
    if isinstance(transceivers, bool) or not isinstance(transceivers, int) \
            or not 1 <= transceivers <= MAX_TRANSCEIVERS:
        raise LabError(f"invalid number of transceivers {transceivers!r}: use 1-{MAX_TRANSCEIVERS}")


def random_prefix() -> str:
    return "sr" + secrets.token_hex(3)


def state_file(prefix: str) -> Path:
    """Where `lab_up(prefix)` records the lab (manager.lab.state)."""
    return STATE_DIR / f"lab-{prefix}.json"
