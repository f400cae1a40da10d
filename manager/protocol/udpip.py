"""IPv4/IPv6 + UDP headers for datagrams sent from an arbitrary source port
through a raw socket (RFC 791, RFC 8200, RFC 768).

The slow path sends from any flow source without holding a socket on each;
the kernel sends such a datagram as it is, so the headers and the UDP
checksum are ours. Symmetric: parse_datagram reads back what build_datagram
wrote.
"""

from __future__ import annotations

import array
import functools
import ipaddress
import struct
import sys
from dataclasses import dataclass

from manager.protocol.addresses import parse_ip

IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")  # ver/ihl, tos, total length, id, flags/frag, ttl, proto, csum, src, dst
IPV6_HEADER = struct.Struct("!IHBB16s16s")    # ver/class/flow, payload length, next header, hop limit, src, dst
UDP_HEADER = struct.Struct("!HHHH")           # source port, destination port, length, checksum
IPPROTO_UDP = 17
DEFAULT_TTL = 64
MAX_UDP_PAYLOAD = 65535 - UDP_HEADER.size


class DatagramError(ValueError):
    """Bytes that are not an IPv4/IPv6 UDP datagram this module wrote."""


@dataclass(frozen=True)
class Datagram:
    src: tuple[str, int]
    dst: tuple[str, int]
    payload: bytes


def checksum(data: bytes) -> int:
    """Internet checksum (RFC 1071). The sum is taken in native byte order,
    which gives the right bytes in native order (its byte-order independence)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(array.array("H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    value = ~total & 0xFFFF
    return value if sys.byteorder == "big" else int.from_bytes(value.to_bytes(2, "little"), "big")


def _udp(src_ip: bytes, dst_ip: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    length = UDP_HEADER.size + len(payload)
    if len(src_ip) == 4:
        pseudo = struct.pack("!4s4sBBH", src_ip, dst_ip, 0, IPPROTO_UDP, length)
    else:
        pseudo = struct.pack("!16s16sIxxxB", src_ip, dst_ip, length, IPPROTO_UDP)
    csum = checksum(pseudo + UDP_HEADER.pack(sport, dport, length, 0) + payload)
    return UDP_HEADER.pack(sport, dport, length, csum or 0xFFFF) + payload  # 0 means "none": sent as 0xffff


@functools.lru_cache(maxsize=1 << 16)
def _text(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


def build_datagram(src: tuple[str, int], dst: tuple[str, int], payload: bytes, *, ttl: int = DEFAULT_TTL) -> bytes:
    """An IP packet carrying one UDP datagram from src to dst (same family)."""
    s, d = parse_ip(src[0]), parse_ip(dst[0])
    if s.version != d.version:
        raise DatagramError(f"source {src[0]} and destination {dst[0]} are of different families")
    if len(payload) > MAX_UDP_PAYLOAD:
        raise DatagramError(f"payload of {len(payload)} bytes does not fit a UDP datagram")
    udp = _udp(s.packed, d.packed, src[1], dst[1], payload)
    if s.version == 4:
        total = IPV4_HEADER.size + len(udp)
        if total > 65535:
            raise DatagramError(f"payload of {len(payload)} bytes does not fit an IPv4 packet")
        head = IPV4_HEADER.pack(0x45, 0, total, 0, 0, ttl, IPPROTO_UDP, 0, s.packed, d.packed)
        head = head[:10] + checksum(head).to_bytes(2, "big") + head[12:]
        return head + udp
    return IPV6_HEADER.pack(6 << 28, len(udp), IPPROTO_UDP, ttl, s.packed, d.packed) + udp


def parse_datagram(data: bytes) -> Datagram:
    """The addresses, ports and payload of a packet build_datagram wrote."""
    if not data:
        raise DatagramError("empty packet")
    version = data[0] >> 4
    if version == 4:
        if len(data) < IPV4_HEADER.size:
            raise DatagramError(f"IPv4 packet of {len(data)} bytes is shorter than its header")
        vihl, _, total, _, _, _, proto, _, s, d = IPV4_HEADER.unpack_from(data)
        ihl = (vihl & 0xF) * 4
        if checksum(data[:ihl]) != 0:
            raise DatagramError("IPv4 header checksum is wrong")
        src_ip, dst_ip, start, end = s, d, ihl, total
    elif version == 6:
        if len(data) < IPV6_HEADER.size:
            raise DatagramError(f"IPv6 packet of {len(data)} bytes is shorter than its header")
        _, plen, proto, _, s, d = IPV6_HEADER.unpack_from(data)
        src_ip, dst_ip, start, end = s, d, IPV6_HEADER.size, IPV6_HEADER.size + plen
    else:
        raise DatagramError(f"IP version {version} is neither 4 nor 6")
    if proto != IPPROTO_UDP:
        raise DatagramError(f"protocol {proto} is not UDP")
    if end > len(data) or end - start < UDP_HEADER.size:
        raise DatagramError("length fields disagree with the packet")
    sport, dport, length, csum = UDP_HEADER.unpack_from(data, start)
    if length != end - start:
        raise DatagramError(f"UDP length {length} disagrees with the IP length {end - start}")
    payload = data[start + UDP_HEADER.size:end]
    if csum and _udp(src_ip, dst_ip, sport, dport, payload)[6:8] != data[start + 6:start + 8]:
        raise DatagramError("UDP checksum is wrong")
    return Datagram(src=(_text(bytes(src_ip)), sport), dst=(_text(bytes(dst_ip)), dport),
                    payload=payload)
