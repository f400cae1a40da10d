"""The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2)
at the start of a TCP stream: a proxy in front names the client it relays
for. No I/O.

Believe it only from a configured proxy: anyone else could name any
address and pick whose per-source limits it spends.
"""

from __future__ import annotations

import ipaddress
import struct

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = struct.Struct("!12sBBH")  # signature, version and command, family and protocol, length
V2_MAX_LEN = 1024  # addresses and TLVs; a proxy sends far less
# v2 family and transport byte: TCP over IPv4, over IPv6; address block sizes.
V2_TCP4, V2_TCP6 = 0x11, 0x21
V2_ADDRS = {V2_TCP4: struct.Struct("!4s4sHH"), V2_TCP6: struct.Struct("!16s16sHH")}


class ProxyHeaderError(ValueError):
    """A header to refuse (the connection is closed)."""


class ProxyHeaderParser:
    """The header out of the first bytes of a stream, as they come.

    feed() returns None until the header is complete, then (client, rest):
    the client's (address, port), or None when the proxy speaks for itself
    (v2 LOCAL, v1 UNKNOWN: a health check), and the bytes after the header."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> tuple[tuple[str, int] | None, bytes] | None:
        buf = self._buf = self._buf + data
        n = min(len(buf), len(V2_SIGNATURE))
        if buf[:n] == V2_SIGNATURE[:n]:
            return self._v2(buf) if n == len(V2_SIGNATURE) else None
        n = min(len(buf), len(V1_PREFIX))
        if buf[:n] == V1_PREFIX[:n]:
            return self._v1(buf) if n == len(V1_PREFIX) else None
        raise ProxyHeaderError("no PROXY protocol header")

    def _v1(self, buf: bytes) -> tuple[tuple[str, int] | None, bytes] | None:
        end = buf.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            if len(buf) >= V1_MAX:
                raise ProxyHeaderError(f"PROXY v1 line longer than {V1_MAX} bytes")
            return None
        try:
            parts = buf[:end].decode("ascii").split(" ")
        except UnicodeDecodeError:
            raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
        rest = buf[end + 2:]
        if parts[1:2] == ["UNKNOWN"]:
            return None, rest
        if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
            raise ProxyHeaderError("PROXY v1 line is not 'PROXY TCP4|TCP6 src dst sport dport'")
        try:
            src = ipaddress.ip_address(parts[2])
            ipaddress.ip_address(parts[3])
            sport = int(parts[4])
        except ValueError:
            raise ProxyHeaderError("PROXY v1 line has a bad address or port") from None
        if src.version != (4 if parts[1] == "TCP4" else 6) or not 0 < sport < 65536 or not parts[4].isdigit():
            raise ProxyHeaderError("PROXY v1 line has a bad address or port")
        return (str(src), sport), rest

    def _v2(self, buf: bytes) -> tuple[tuple[str, int] | None, bytes] | None:
        if len(buf) < V2_HEADER.size:
            return None
        _, ver_cmd, fam, length = V2_HEADER.unpack_from(buf)
        if ver_cmd >> 4 != 2 or ver_cmd & 0xF > 1:
            raise ProxyHeaderError(f"PROXY v2 version/command byte {ver_cmd:#x}")
        if length > V2_MAX_LEN:
            raise ProxyHeaderError(f"PROXY v2 header of {length} bytes (at most {V2_MAX_LEN})")
        end = V2_HEADER.size + length
        if len(buf) < end:
            return None
        rest = buf[end:]
        if ver_cmd & 0xF == 0:  # LOCAL: the proxy's own connection
            return None, rest
        addrs = V2_ADDRS.get(fam)
        if addrs is None:
            raise ProxyHeaderError(f"PROXY v2 family/protocol {fam:#x} is not TCP over IPv4 or IPv6")
        if length < addrs.size:
            raise ProxyHeaderError("PROXY v2 address block cut short")
        src, _, sport, _ = addrs.unpack_from(buf, V2_HEADER.size)
        if sport == 0:
            raise ProxyHeaderError("PROXY v2 source port 0")
        return (str(ipaddress.ip_address(src)), sport), rest


def v1_header(client: tuple[str, int], server: tuple[str, int]) -> bytes:
    """A v1 header, as a proxy sends it (tests, the lab)."""
    proto = "TCP6" if ":" in client[0] else "TCP4"
    return f"PROXY {proto} {client[0]} {server[0]} {client[1]} {server[1]}\r\n".encode()


def v2_header(client: tuple[str, int], server: tuple[str, int], tlvs: bytes = b"") -> bytes:
    """A v2 PROXY-command header, as a proxy sends it (tests, the lab)."""
    fam = V2_TCP6 if ":" in client[0] else V2_TCP4
    block = V2_ADDRS[fam].pack(ipaddress.ip_address(client[0]).packed, ipaddress.ip_address(server[0]).packed,
                               client[1], server[1]) + tlvs
    return V2_HEADER.pack(V2_SIGNATURE, 0x21, fam, len(block)) + block
