"""The DTLS cipher policy of a call (manager/transceiver/dtls_policy.py,
installed by aiortc_hooks.dtls_cipher_policy): RSA-certificate peers shake
hands, only ECDHE + AEAD suites are offered, DTLS 1.2 at least, and the
fingerprint is still checked."""

from __future__ import annotations

import asyncio

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from OpenSSL import SSL

from manager.protocol import dtls_record
from manager.transceiver import aiortc_hooks as hooks
from manager.transceiver import dtls_policy
from tests.support.dtls_peers import (
    handshake,
    peer_context,
    rsa_certificate,
    stock_context,
    transceiver_context,
    use_certificate,
)
from tests.support.waiting import eventually_async

TLS13_SUITES = ("TLS_AES_", "TLS_CHACHA20_")  # set apart by OpenSSL (set_ciphersuites), not DTLS 1.2 suites
DTLS1_VERSION = 0xFEFF


@pytest.fixture(scope="module")
def rsa_peer():
    return rsa_certificate(2048)


def test_the_cipher_list_is_ecdhe_aead_only() -> None:
    offered = [c for c in SSL.Connection(transceiver_context()).get_cipher_list() if not c.startswith(TLS13_SUITES)]
    assert offered == list(dtls_policy.CIPHERS)
    for name in offered:
        assert name.startswith(("ECDHE-ECDSA-", "ECDHE-RSA-")), f"{name}: not ECDHE (static RSA?)"
        assert "GCM" in name or "CHACHA20-POLY1305" in name, f"{name}: not an AEAD cipher (CBC?)"
        dtls_record.suite(name)  # a session on any of them can migrate (raises if not)
    assert any(name.startswith("ECDHE-RSA-") for name in offered)


def test_an_rsa_2048_peer_completes_the_handshake(rsa_peer) -> None:
    """The transceiver answers actpass offers as the DTLS client, so an RSA
    peer is the server and picks an ECDHE-RSA suite from our list."""
    ours, theirs = handshake(transceiver_context(), peer_context(rsa_peer))
    assert ours.get_protocol_version_name() == "DTLSv1.2"
    assert ours.get_cipher_name() == "ECDHE-RSA-AES128-GCM-SHA256"
    assert ours.get_selected_srtp_profile() == b"SRTP_AEAD_AES_128_GCM"
    assert ours.get_peer_certificate(as_cryptography=True).public_key().key_size == 2048
    # The other way round (the RSA peer as the DTLS client) too.
    theirs, ours = handshake(peer_context(rsa_peer), transceiver_context())
    assert ours.get_cipher_name() in dtls_policy.CIPHERS and ours.get_cipher_name().startswith("ECDHE-ECDSA-")


def test_aiortcs_own_list_fails_with_an_rsa_peer(rsa_peer) -> None:
    """What the policy fixes (webrtcbin's 'no shared cipher')."""
    with pytest.raises(SSL.Error, match="no shared cipher|handshake failure"):
        handshake(stock_context(), peer_context(rsa_peer))


@pytest.mark.parametrize("ciphers", [b"ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA", b"AES128-GCM-SHA256"],
                         ids=["cbc", "static-rsa"])
def test_a_peer_with_only_cbc_or_static_rsa_is_refused(rsa_peer, ciphers: bytes) -> None:
    with pytest.raises(SSL.Error):
        handshake(transceiver_context(), peer_context(rsa_peer, ciphers=ciphers + b":@SECLEVEL=0"))


def test_dtls_1_0_is_refused(rsa_peer) -> None:
    with pytest.raises(SSL.Error):
        handshake(transceiver_context(),
                  peer_context(rsa_peer, ciphers=b"DEFAULT:@SECLEVEL=0", max_version=DTLS1_VERSION))


def _answerer_with_policy(pc: RTCPeerConnection) -> None:
    for t in pc.getTransceivers():
        hooks.dtls_cipher_policy(t.receiver.transport, dtls_policy.configure)


async def _call(tamper_fingerprint: bool) -> tuple[str, str | None]:
    """An aiortc peer with an RSA certificate offers; an answerer with the
    transceiver's policy answers (and so is the DTLS client). Returns the
    answerer's DTLS state and negotiated suite."""
    offerer, answerer = RTCPeerConnection(RTCConfiguration(iceServers=[])), RTCPeerConnection(RTCConfiguration(iceServers=[]))
    use_certificate(offerer, rsa_certificate(2048))
    try:
        offerer.addTransceiver("audio")
        await offerer.setLocalDescription(await offerer.createOffer())
        sdp = offerer.localDescription.sdp
        if tamper_fingerprint:
            line = next(x for x in sdp.splitlines() if x.startswith("a=fingerprint:sha-256 "))
            sdp = sdp.replace(line, line[:-2] + ("00" if not line.endswith("00") else "11"))
        await answerer.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        _answerer_with_policy(answerer)
        await answerer.setLocalDescription(await answerer.createAnswer())
        await offerer.setRemoteDescription(answerer.localDescription)
        dtls = answerer.getTransceivers()[0].receiver.transport
        await eventually_async(lambda: dtls.state in ("connected", "failed"), timeout=10,
                               what="the DTLS handshake to finish")
        secrets = hooks.dtls_session_secrets(dtls)
        return dtls.state, secrets.cipher if secrets else None
    finally:
        await offerer.close()
        await answerer.close()


def test_an_aiortc_peer_with_an_rsa_certificate_connects_and_its_fingerprint_is_checked() -> None:
    assert asyncio.run(_call(tamper_fingerprint=False)) == ("connected", "ECDHE-RSA-AES128-GCM-SHA256")
    state, _ = asyncio.run(_call(tamper_fingerprint=True))
    assert state == "failed"
