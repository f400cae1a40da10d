"""Who a per-source limit counts: a client address reduced to its prefix
(IPv4 /32, IPv6 /64 by default, as XDP keys its per-source buckets), the
counters and token buckets kept per such key, and the X-Forwarded-For rule
for trusted proxies. No I/O.

An IPv6 client is handed a whole /64 (RFC 6177); keyed by exact address, one
host could hold 2^64 buckets' worth of connections. Every per-source limit of
the relay (slow path, ICE-TCP bridge, HTTP create and pending) keys by
SourceKey, so one /64 is one source everywhere.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

DEFAULT_PREFIX_V4 = 32
DEFAULT_PREFIX_V6 = 64


class SourceKey:
    """addr → the source it counts as: "a.b.c.d/32", "2001:db8:1:2::/64".
    Something that is not an IP address counts as itself (one source)."""

    def __init__(self, prefix_v4: int = DEFAULT_PREFIX_V4, prefix_v6: int = DEFAULT_PREFIX_V6) -> None:
        if not 0 <= prefix_v4 <= 32:
            raise ValueError(f"IPv4 source prefix must be 0..32, got {prefix_v4}")
        if not 0 <= prefix_v6 <= 128:
            raise ValueError(f"IPv6 source prefix must be 0..128, got {prefix_v6}")
        self.prefix_v4 = prefix_v4
        self.prefix_v6 = prefix_v6
        # Per instance: the slow path asks for the same few clients per packet.
        self._key = functools.lru_cache(maxsize=1 << 16)(self._compute)

    def _compute(self, addr: str) -> str:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return addr
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:a.b.c.d is the IPv4 client a.b.c.d
        prefix = self.prefix_v4 if ip.version == 4 else self.prefix_v6
        return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))

    def __call__(self, addr: str) -> str:
        return self._key(addr)

    def __repr__(self) -> str:
        return f"SourceKey(v4=/{self.prefix_v4}, v6=/{self.prefix_v6})"


class Tally:
    """How many of something each key holds; a key at zero is forgotten (the
    map holds only keys that hold something)."""

    def __init__(self) -> None:
        self._n: dict[Hashable, int] = {}

    def __getitem__(self, key: Hashable) -> int:
        return self._n.get(key, 0)

    def add(self, key: Hashable) -> int:
        n = self._n.get(key, 0) + 1
        self._n[key] = n
        return n

    def remove(self, key: Hashable) -> None:
        n = self._n.get(key, 0) - 1
        if n > 0:
            self._n[key] = n
        else:
            self._n.pop(key, None)

    def __len__(self) -> int:
        return len(self._n)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._n

    def total(self) -> int:
        return sum(self._n.values())


@dataclass
class _Bucket:
    tokens: float
    at: float


class TokenBuckets:
    """A token bucket per key (`rate` per second, `burst` at once), at most
    `max_keys` of them: the least recently used go first (a forgotten key
    starts full again, which only errs towards admitting)."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 65536) -> None:
        if rate < 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be >= 0, burst >= 1 and max_keys >= 1")
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[Hashable, _Bucket] = OrderedDict()

    def take(self, key: Hashable, now: float, cost: float = 1.0) -> bool:
        """Spend `cost` tokens of `key`'s bucket; False (nothing spent) if it has too few."""
        b = self._buckets.pop(key, None)
        if b is None:
            b = _Bucket(self.burst, now)
        else:
            b.tokens = min(self.burst, b.tokens + max(0.0, now - b.at) * self.rate)
            b.at = now
        self._buckets[key] = b
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        if b.tokens < cost:
            return False
        b.tokens -= cost
        return True

    def __len__(self) -> int:
        return len(self._buckets)


class TrustedProxies:
    """The peers whose X-Forwarded-For is believed (operator-configured
    prefixes). From anyone else the header is ignored: a client could write
    any address there and pick its own bucket."""

    def __init__(self, prefixes: Iterable[str] = ()) -> None:
        self.networks = [ipaddress.ip_network(p, strict=False) for p in prefixes]

    def trusts(self, peer: str) -> bool:
        if not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(peer)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)

    def client_of(self, peer: str, forwarded_for: list[str] | tuple[str, ...] = ()) -> str:
        """The client a request comes from: `peer` itself, or, when `peer` is
        a trusted proxy, the right-most X-Forwarded-For entry that is not one
        of the trusted proxies (the left part is the client's to forge).
        `forwarded_for`: every X-Forwarded-For header's value, in order."""
        if not self.trusts(peer):
            return peer
        hops = [h.strip() for value in forwarded_for for h in value.split(",") if h.strip()]
        for hop in reversed(hops):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                return peer  # a malformed chain: the proxy is the only source we know
            if not self.trusts(hop):
                return hop
        return hops[0] if hops else peer
