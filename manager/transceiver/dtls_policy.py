"""The DTLS handshake a call accepts: which cipher suites and versions.

aiortc's own list has ECDSA suites only (and two CBC ones), so a peer with an
RSA certificate (GStreamer's webrtcbin by default) finds no shared cipher
when it is the DTLS server. The list here is explicit: every suite is ECDHE
(forward secrecy, no static RSA key exchange) with an AEAD cipher (no CBC),
for ECDSA and RSA certificates alike; these are exactly the suites the
migration record layer (manager/protocol/dtls_record.py) continues.
Curves, the certificate, SRTP profiles and the fingerprint check stay aiortc's.
"""

from __future__ import annotations

from OpenSSL import SSL

# In preference order: ECDSA first (browsers), AES-128-GCM first (the cheapest).
CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-CHACHA20-POLY1305", "ECDHE-RSA-AES256-GCM-SHA384",
)
DTLS1_2_VERSION = 0xFEFD  # OpenSSL's DTLS1_2_VERSION (pyOpenSSL names only the TLS ones)


def configure(ctx: SSL.Context) -> None:
    """Offer CIPHERS only, DTLS 1.2 or later, on an aiortc-built context."""
    ctx.set_cipher_list(":".join(CIPHERS).encode())
    ctx.set_min_proto_version(DTLS1_2_VERSION)
