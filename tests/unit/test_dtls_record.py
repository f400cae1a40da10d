"""The DTLS 1.2 record layer against OpenSSL itself: a real DTLS handshake
between two pyOpenSSL connections (memory BIOs, as aiortc drives them);
keys derived from the master secret and randoms pyOpenSSL exposes; records
OpenSSL sealed are opened here and records sealed here are accepted by
OpenSSL, continuing its sequence numbers."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from manager.protocol import dtls_record as dr


def _cert():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert, key


def _pair(cipher: str):
    """A client and a server SSL.Connection with the DTLS handshake done."""
    conns = []
    for accept in (False, True):
        ctx = SSL.Context(SSL.DTLS_METHOD)
        ctx.set_options(SSL.OP_NO_TICKET)
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *a: True)
        cert, key = _cert()
        ctx.use_certificate(cert)
        ctx.use_privatekey(key)
        ctx.set_cipher_list(cipher.encode())
        c = SSL.Connection(ctx)
        c.set_accept_state() if accept else c.set_connect_state()
        conns.append(c)
    client, server = conns
    for _ in range(20):
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            while True:
                try:
                    b.bio_write(a.bio_read(65536))
                except SSL.WantReadError:
                    break
        if client.get_cipher_name() and server.get_cipher_name():
            try:
                client.do_handshake()
                server.do_handshake()
                break
            except SSL.WantReadError:
                continue
    assert client.get_cipher_name() == cipher
    return client, server


def _datagrams(conn) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(conn.bio_read(65536))
        except SSL.WantReadError:
            return out


@pytest.mark.parametrize("cipher", ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305",
                                    "ECDHE-ECDSA-AES256-GCM-SHA384"])
def test_records_cross_between_openssl_and_the_derived_keys(cipher: str) -> None:
    client, server = _pair(cipher)
    s = dr.suite(cipher)
    keys = dr.KeyBlock.derive(s, client.master_key(), client.client_random(), client.server_random())
    from_client = dr.RecordProtection(s, keys.client_key, keys.client_iv)
    from_server = dr.RecordProtection(s, keys.server_key, keys.server_iv)

    # OpenSSL (the client) seals, we open: the epoch and sequence are on the wire.
    client.send(b"sctp packet one")
    (datagram,) = _datagrams(client)
    (record,) = dr.parse_records(datagram)
    assert record.type == dr.APPLICATION_DATA and record.epoch == 1
    assert record.serialise() == datagram  # symmetric parse/serialise
    assert from_client.open(record) == b"sctp packet one"

    # We continue the server's sequence: OpenSSL (the client) accepts it.
    server.send(b"from the server")
    (last,) = dr.parse_records(_datagrams(server)[0])
    ours = from_server.seal(dr.APPLICATION_DATA, last.epoch, last.seq + 1, b"from the new owner")
    client.bio_write(ours.serialise())
    assert client.recv(1500) == b"from the new owner"

    # A flipped bit, a wrong sequence number: refused, with the record named.
    bad = dr.Record(record.type, record.epoch, record.seq, record.fragment[:-1] + bytes([record.fragment[-1] ^ 1]))
    with pytest.raises(dr.DtlsRecordError, match="does not authenticate"):
        from_client.open(bad)
    with pytest.raises(dr.DtlsRecordError, match="does not authenticate"):
        from_client.open(dr.Record(record.type, record.epoch, record.seq + 1, record.fragment))


def test_parse_refuses_what_is_not_a_record() -> None:
    rec = dr.Record(dr.APPLICATION_DATA, 1, 5, b"x" * 30).serialise()
    assert dr.parse_records(rec + rec) == [dr.parse_records(rec)[0]] * 2
    with pytest.raises(dr.DtlsRecordError, match="truncated record header"):
        dr.parse_records(rec + rec[:5])
    with pytest.raises(dr.DtlsRecordError, match="claims 30 bytes"):
        dr.parse_records(rec[:-1])
    with pytest.raises(dr.DtlsRecordError, match="unknown content type 99"):
        dr.parse_records(bytes([99]) + rec[1:])
    with pytest.raises(dr.DtlsRecordError, match="not supported"):
        dr.suite("ECDHE-ECDSA-AES128-SHA")


def test_prf_matches_the_tls12_test_vector() -> None:
    # The widely used TLS 1.2 PRF (SHA-256) test vector (IETF TLS list, 2009).
    secret = bytes.fromhex("9bbe436ba940f017b17652849a71db35")
    seed = bytes.fromhex("a0ba9f936cda311827a6f796ffd5198c")
    out = dr.prf("sha256", secret, b"test label", seed, 100)
    assert out.hex().startswith("e3f229ba727be17b8d122620557cd453c2aab21d07c3d495329b52d4e61edb5a6b301791e90d35c9c9a46b4e"
                                "14baf9af0fa022f7077def17abfd3797c0564bab4fbc91666e9def9b97fce34f796789baa48082d122ee42c5a7"
                                "2e5a5110fff70187347b66")


def test_replay_window() -> None:
    w = dr.ReplayWindow()
    for seq in (5, 3, 7):
        assert w.check(seq)
        w.mark(seq)
    assert not w.check(5) and not w.check(7) and w.check(6) and w.check(4)
    w.mark(200)
    assert not w.check(100)  # too old
    continued = dr.ReplayWindow(50, earlier_seen=True)
    assert not continued.check(50) and not continued.check(10) and continued.check(51)
