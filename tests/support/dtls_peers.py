"""DTLS peers for the cipher policy tests: RSA certificates as GStreamer's
webrtcbin makes them, in-memory handshakes, and aiortc peers that use them."""

from __future__ import annotations

from aiortc import RTCPeerConnection
from aiortc.rtcdtlstransport import SRTP_PROFILES, RTCCertificate, RTCDtlsTransport, generate_certificate
from aiortc.rtcicetransport import RTCIceGatherer, RTCIceTransport
from cryptography.hazmat.primitives.asymmetric import rsa
from OpenSSL import SSL

from manager.transceiver import aiortc_hooks as hooks
from manager.transceiver import dtls_policy


def rsa_certificate(bits: int = 2048) -> RTCCertificate:
    """A self-signed RSA certificate, webrtcbin's default kind."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return RTCCertificate(key=key, cert=generate_certificate(key))  # type: ignore[arg-type]


def transceiver_context(certificate: RTCCertificate | None = None) -> SSL.Context:
    """The SSL context a call's DTLS transport builds, with the transceiver's policy installed."""
    certificate = certificate or RTCCertificate.generateCertificate()
    dtls = RTCDtlsTransport(RTCIceTransport(RTCIceGatherer()), [certificate])
    hooks.dtls_cipher_policy(dtls, dtls_policy.configure)
    return certificate._create_ssl_context(SRTP_PROFILES)  # what RTCDtlsTransport.start() calls


def stock_context(certificate: RTCCertificate | None = None) -> SSL.Context:
    """aiortc's own context, without the policy."""
    return (certificate or RTCCertificate.generateCertificate())._create_ssl_context(SRTP_PROFILES)


def peer_context(certificate: RTCCertificate, *, ciphers: bytes = b"DEFAULT",
                 max_version: int | None = None) -> SSL.Context:
    """A plain OpenSSL DTLS endpoint (a webrtcbin stand-in): `ciphers`, SRTP, a peer certificate asked for."""
    ctx = SSL.Context(SSL.DTLS_METHOD)
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *args: True)
    ctx.use_certificate(certificate._cert)
    ctx.use_privatekey(certificate._key)
    ctx.set_cipher_list(ciphers)
    ctx.set_tlsext_use_srtp(b"SRTP_AEAD_AES_128_GCM:SRTP_AES128_CM_SHA1_80")
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    return ctx


def handshake(client_ctx: SSL.Context, server_ctx: SSL.Context) -> tuple[SSL.Connection, SSL.Connection]:
    """Run a DTLS handshake in memory; SSL.Error (from either side) if it fails."""
    client, server = SSL.Connection(client_ctx), SSL.Connection(server_ctx)
    client.set_connect_state()
    server.set_accept_state()
    done = {client: False, server: False}
    for _ in range(20):
        for me, peer in ((client, server), (server, client)):
            if not done[me]:
                try:
                    me.do_handshake()
                    done[me] = True
                except SSL.WantReadError:
                    pass
            try:
                peer.bio_write(me.bio_read(65536))
            except SSL.WantReadError:
                pass
        if all(done.values()):
            return client, server
    raise AssertionError("the handshake made no progress")


def use_certificate(pc: RTCPeerConnection, certificate: RTCCertificate, *, rsa_suites: bool = True) -> None:
    """Make an aiortc peer use `certificate`, before its first description
    (its DTLS transports made so far too). An RSA certificate needs the
    ECDHE-RSA suites (aiortc offers ECDSA ones only) for this peer to be a
    DTLS server: the transceiver's policy is used."""
    pc._RTCPeerConnection__certificates = [certificate]  # type: ignore[attr-defined]
    transports = {t.receiver.transport for t in pc.getTransceivers()}
    if pc.sctp is not None:
        transports.add(pc.sctp.transport)
    for dtls in transports:
        dtls._RTCDtlsTransport__local_certificate = certificate
    if rsa_suites:
        original = certificate._create_ssl_context

        def create(srtp_profiles: list) -> SSL.Context:
            ctx = original(srtp_profiles)
            dtls_policy.configure(ctx)
            return ctx

        certificate._create_ssl_context = create  # type: ignore[method-assign]
