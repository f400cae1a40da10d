"""Addresses: families, endpoint formatting, and where a call's owner (a
transceiver) receives the call's packets."""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import asdict, dataclass

# Linux's values, as the kernel structs carry them (bpf/structs.h).
AF_INET = 2
AF_INET6 = 10

Addr = tuple[str, int]


# Cached: the slow path asks for the same few addresses (VIPs, owners, pool
# addresses, the client of each leg) many times per leg, in families, map
# keys and datagram headers, and parsing one takes microseconds.
@functools.lru_cache(maxsize=1 << 16)
def parse_ip(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """ipaddress.ip_address of a textual address, remembered."""
    return ipaddress.ip_address(addr)


def family_of(addr: str) -> int:
    """AF_INET or AF_INET6 of a textual IP address; ValueError if it is none."""
    return AF_INET6 if parse_ip(addr).version == 6 else AF_INET


def fmt_ep(addr: str, port: int) -> str:
    """addr:port, with IPv6 addresses in brackets."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


@dataclass(frozen=True)
class OwnerAddr:
    """The transceiver's ICE socket address for one call (one or both families)."""

    addr4: str | None = None
    port4: int = 0
    addr6: str | None = None
    port6: int = 0

    def __post_init__(self) -> None:
        if self.addr4 is None and self.addr6 is None:
            raise ValueError("owner needs an IPv4 or an IPv6 address")
        for family, addr, port in ((4, self.addr4, self.port4), (6, self.addr6, self.port6)):
            if addr is None:
                if port != 0:
                    raise ValueError(f"owner port{family} is set without addr{family}")
                continue
            try:
                ip = parse_ip(addr)
            except ValueError:
                raise ValueError(f"owner addr{family} {addr!r} is not an IP address") from None
            if ip.version != family:
                raise ValueError(f"owner addr{family} {addr!r} is not an IPv{family} address")
            if ip.is_unspecified or ip.is_multicast:
                # The relay forwards to this exact address: it must be one host.
                raise ValueError(f"owner addr{family} {addr!r} is not a unicast address")
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 0xFFFF:
                raise ValueError(f"owner port{family} must be an integer in 1..65535")

    def for_family(self, family: int) -> tuple[str, int] | None:
        """The (addr, port) for AF_INET or AF_INET6, or None if absent."""
        if family == AF_INET:
            return (self.addr4, self.port4) if self.addr4 else None
        return (self.addr6, self.port6) if self.addr6 else None

    def endpoints(self) -> list[tuple[str, int]]:
        return [e for e in (self.for_family(AF_INET), self.for_family(AF_INET6)) if e]

    def to_dict(self) -> dict[str, str | int | None]:
        return asdict(self)
