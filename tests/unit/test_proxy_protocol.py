"""The PROXY protocol header parser: v1 and v2, byte by byte, and what it refuses."""

from __future__ import annotations

import pytest

from manager.protocol.proxy_protocol import (
    V2_HEADER,
    V2_SIGNATURE,
    ProxyHeaderError,
    ProxyHeaderParser,
    v1_header,
    v2_header,
)

CLIENT4, CLIENT6, SERVER4, SERVER6 = ("203.0.113.7", 51000), ("2001:db8:1:2::7", 51000), ("192.0.2.1", 443), ("2001:db8::1", 443)


def parse_in_pieces(data: bytes, step: int):
    p = ProxyHeaderParser()
    for i in range(0, len(data), step):
        got = p.feed(data[i:i + step])
        if got is not None:
            return got, i + step
    return None, len(data)


@pytest.mark.parametrize(("header", "client"), [
    (v1_header(CLIENT4, SERVER4), CLIENT4), (v1_header(CLIENT6, SERVER6), CLIENT6),
    (v2_header(CLIENT4, SERVER4), CLIENT4), (v2_header(CLIENT6, SERVER6), CLIENT6),
    (v2_header(CLIENT4, SERVER4, tlvs=b"\x04\x00\x02ok"), CLIENT4),
], ids=["v1 tcp4", "v1 tcp6", "v2 tcp4", "v2 tcp6", "v2 with a TLV"])
@pytest.mark.parametrize("step", [1, 5, 4096])
def test_the_client_and_the_bytes_after(header, client, step):
    after = b"\x00\x14frame"
    (got, rest), fed = parse_in_pieces(header + after, step)
    assert got == client
    # The bytes after the header that arrived with its end, and nothing more.
    assert rest == (header + after)[len(header):fed]


def test_a_header_cut_anywhere_waits_for_the_rest():
    header = v2_header(CLIENT6, SERVER6)
    for n in range(len(header)):
        assert ProxyHeaderParser().feed(header[:n]) is None, n


def test_the_proxys_own_connections_name_no_client():
    local = V2_HEADER.pack(V2_SIGNATURE, 0x20, 0, 0)
    assert ProxyHeaderParser().feed(local + b"x") == (None, b"x")
    assert ProxyHeaderParser().feed(b"PROXY UNKNOWN\r\nx") == (None, b"x")


@pytest.mark.parametrize("data", [
    b"\x00\x14" + b"x" * 20,                                     # an RFC 4571 frame: no header at all
    b"GET / HTTP/1.1\r\n",
    b"PROXY TCP4 203.0.113.7 192.0.2.1 51000\r\n",               # a field missing
    b"PROXY TCP4 2001:db8::7 192.0.2.1 51000 443\r\n",           # the family does not match
    b"PROXY TCP4 203.0.113.7 192.0.2.1 0 443\r\n",               # port 0
    b"PROXY TCP4 203.0.113.7 192.0.2.1 +5 443\r\n",
    b"PROXY TCP4 not-an-address 192.0.2.1 51000 443\r\n",
    b"PROXY UDP4 203.0.113.7 192.0.2.1 51000 443\r\n",
    b"PROXY TCP4 \xff\xfe 192.0.2.1 51000 443\r\n",
    b"PROXY " + b"1" * 120,                                     # no CRLF within 107 bytes
    V2_HEADER.pack(V2_SIGNATURE, 0x31, 0x11, 12) + bytes(12),    # version 3
    V2_HEADER.pack(V2_SIGNATURE, 0x22, 0x11, 12) + bytes(12),    # command 2
    V2_HEADER.pack(V2_SIGNATURE, 0x21, 0x12, 12) + bytes(12),    # UDP over IPv4
    V2_HEADER.pack(V2_SIGNATURE, 0x21, 0x11, 8) + bytes(8),      # address block cut short
    V2_HEADER.pack(V2_SIGNATURE, 0x21, 0x11, 4000),              # longer than any proxy sends
    v2_header(("203.0.113.7", 0), SERVER4),                      # port 0
], ids=lambda d: repr(d[:24]))
def test_malformed_headers_are_refused(data):
    with pytest.raises(ProxyHeaderError):
        ProxyHeaderParser().feed(data)
