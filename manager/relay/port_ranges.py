"""The flow-port range against the kernel's ephemeral range.

relayd's sk_lookup program takes every UDP packet for a flow source (pool
address, flow port). Were a flow port also a port the kernel hands out to
the host's own UDP clients (DNS, NTP: ip_local_port_range less
ip_local_reserved_ports), their replies would be taken too. relayd refuses
to start with such an overlap; the fix is a dedicated range outside the
ephemeral one, or reserving the flow ports (ip_local_reserved_ports).
"""

from __future__ import annotations

from pathlib import Path

PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
RESERVED_PORTS = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")


class PortRangeError(ValueError):
    """The flow ports overlap the ephemeral range; the message names both."""


def parse_port_range(text: str) -> tuple[int, int]:
    """ip_local_port_range: "low high" (tab separated)."""
    low, high = (int(x) for x in text.split())
    return low, high


def parse_reserved_ports(text: str) -> list[tuple[int, int]]:
    """ip_local_reserved_ports: "8080,10000-10010" (empty: none)."""
    out = []
    for part in text.replace("\n", ",").split(","):
        part = part.strip()
        if part:
            low, _, high = part.partition("-")
            out.append((int(low), int(high or low)))
    return out


def unreserved_overlap(flow: tuple[int, int], ephemeral: tuple[int, int],
                       reserved: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The flow ports the kernel may still hand out as ephemeral ports, as ranges."""
    low, high = max(flow[0], ephemeral[0]), min(flow[1], ephemeral[1])
    out: list[tuple[int, int]] = []
    port = low
    for r_low, r_high in sorted(reserved):
        if r_high < port or r_low > high:
            continue
        if r_low > port:
            out.append((port, r_low - 1))
        port = max(port, r_high + 1)
    if port <= high:
        out.append((port, high))
    return out


def check_flow_ports(flow: tuple[int, int], ephemeral: tuple[int, int],
                     reserved: list[tuple[int, int]]) -> None:
    """Raise PortRangeError when flow ports may be handed out as ephemeral ones."""
    overlap = unreserved_overlap(flow, ephemeral, reserved)
    if overlap:
        first = overlap[0]
        raise PortRangeError(
            f"the flow ports {flow[0]}-{flow[1]} overlap the kernel's ephemeral port range "
            f"{ephemeral[0]}-{ephemeral[1]} (net.ipv4.ip_local_port_range; {first[0]}-{first[1]} "
            f"{'is' if len(overlap) == 1 else 'and more are'} not in ip_local_reserved_ports): the relay "
            f"would take replies meant for the host's own UDP clients. Move datapath.flow_port_min/max "
            f"outside it, or reserve them (sysctl net.ipv4.ip_local_reserved_ports)")


def check_this_namespace(flow: tuple[int, int]) -> None:
    """check_flow_ports against the sysctls of the caller's network namespace."""
    check_flow_ports(flow, parse_port_range(PORT_RANGE.read_text()),
                     parse_reserved_ports(RESERVED_PORTS.read_text()))
