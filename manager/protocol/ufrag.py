"""Routing hints carried in the server-side ICE username fragment (ufrag).

The relay mints the server ufrag of every call. The client echoes it in the
USERNAME of its STUN binding requests ("<server ufrag>:<client ufrag>", RFC
8445 section 7.2.2), so the relay's slow path can route the first packet of a
call by decoding the ufrag alone: no lookup, no shared state. A MAC over the
routing fields means a forged or altered hint never reaches a transceiver.

Layout (18 bytes, then standard base64 without padding = 24 ice-chars):

    offset  size  field
    0       1     version (1)
    1       2     transceiver id (u16, big endian, nonzero)
    3       4     connection id (u32, big endian, nonzero)
    7       1     key id: which key of the hint key ring made the MAC
    8       3     nonce (random: RFC 8445 wants >= 24 bits of randomness)
    11      7     HMAC-SHA256(key, DOMAIN || bytes 0..10), truncated

The key id took the nonce's first byte, so the ufrag kept its length and
version (XDP checks both, bpf/stun.h). Verification takes the key the id
names (manager.protocol.keyring); ufrags minted before key ids carry a random
byte there, which the legacy key 0 verifies while it is listed.

18 bytes is a multiple of 3, so the base64 text has no padding and no unused
bits: every character carries exactly 6 bits of the hint, hence any change to
the text changes the decoded bytes (and then fails the MAC or the version).
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import os
import re
import struct
from dataclasses import dataclass

from manager.protocol.keyring import LEGACY_ID, KeyRing

VERSION = 1
NONCE_LENGTH = 3
MAC_LENGTH = 7
MIN_KEY_LENGTH = 16
# Binds the MAC to this use of the key: a MAC computed for anything else
# (another protocol sharing the secret, a future layout) never verifies here.
DOMAIN = b"splitrelay/ufrag/v1\x00"

_HEADER = struct.Struct("!BHIB")  # version, transceiver id, connection id, key id
_BODY_LENGTH = _HEADER.size + NONCE_LENGTH  # the MAC'd fields
HINT_LENGTH = _BODY_LENGTH + MAC_LENGTH  # 18 bytes
UFRAG_LENGTH = HINT_LENGTH * 4 // 3  # 24 characters

# RFC 8445 section 5.3: ufrag = 4*256ice-char, ice-char = ALPHA / DIGIT / "+" / "/"
ICE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
UFRAG_MIN_LENGTH = 4
UFRAG_MAX_LENGTH = 256
_ICE_CHARS_RE = re.compile(r"[A-Za-z0-9+/]+")


class UfragError(ValueError):
    """A ufrag (or STUN USERNAME) that does not carry a valid routing hint."""


@dataclass(frozen=True)
class RoutingHint:
    version: int
    transceiver_id: int
    conn_id: int
    nonce: bytes
    key_id: int = LEGACY_ID  # the key that verified it


HintKeys = bytes | KeyRing  # a bare key is the ring {0: key}


def _check_key(key: bytes) -> None:
    # A configuration error, not a bad packet: plain ValueError, so that a
    # slow path catching UfragError per packet does not swallow it.
    if not isinstance(key, (bytes, bytearray)) or len(key) < MIN_KEY_LENGTH:
        raise ValueError(f"hint key must be at least {MIN_KEY_LENGTH} bytes")


def _ring(keys: HintKeys) -> KeyRing:
    if isinstance(keys, KeyRing):
        for kid in keys.ids:
            _check_key(keys.get(kid))  # type: ignore[arg-type]
        return keys
    _check_key(keys)
    return KeyRing.single(bytes(keys))


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, DOMAIN + body, hashlib.sha256).digest()[:MAC_LENGTH]


def encode_ufrag(
    keys: HintKeys, transceiver_id: int, conn_id: int, *, nonce: bytes | None = None
) -> str:
    """Mint a server ufrag that routes to `transceiver_id` / `conn_id`, with
    the ring's signing key (and its id)."""
    ring = _ring(keys)
    key, key_id = ring.signing_key, ring.signing_id
    if isinstance(transceiver_id, bool) or not isinstance(transceiver_id, int):
        raise ValueError("transceiver id must be an integer")
    if not 1 <= transceiver_id <= 0xFFFF:
        raise ValueError("transceiver id must be in 1..65535")
    if isinstance(conn_id, bool) or not isinstance(conn_id, int):
        raise ValueError("connection id must be an integer")
    if not 1 <= conn_id <= 0xFFFFFFFF:
        raise ValueError("connection id must be in 1..4294967295")
    if nonce is None:
        nonce = os.urandom(NONCE_LENGTH)
    elif len(nonce) != NONCE_LENGTH:
        raise ValueError(f"nonce must be {NONCE_LENGTH} bytes")
    body = _HEADER.pack(VERSION, transceiver_id, conn_id, key_id) + bytes(nonce)
    return binascii.b2a_base64(body + _mac(key, body), newline=False).decode("ascii")


def decode_ufrag(keys: HintKeys, ufrag: str) -> RoutingHint:
    """Decode and authenticate a server ufrag with the key its id names;
    raise UfragError if it is not ours."""
    ring = _ring(keys)
    if not isinstance(ufrag, str):
        raise UfragError("ufrag must be a string")
    if len(ufrag) != UFRAG_LENGTH:
        raise UfragError(f"ufrag length is not {UFRAG_LENGTH} characters")
    # fullmatch on str, not binascii's own check: it also rejects non-ASCII
    # characters and base64 padding, which are not ice-chars either.
    if not _ICE_CHARS_RE.fullmatch(ufrag):
        raise UfragError("ufrag contains characters outside ice-chars")
    data = binascii.a2b_base64(ufrag.encode("ascii"), strict_mode=True)
    body, mac = data[:_BODY_LENGTH], data[_BODY_LENGTH:]
    version, transceiver_id, conn_id, key_id = _HEADER.unpack_from(body)
    if version != VERSION:
        raise UfragError("ufrag has unknown version")
    key = ring.verifier(key_id)
    verified_by = key_id if ring.get(key_id) is not None else LEGACY_ID
    if key is None:
        raise UfragError(f"ufrag key id {key_id} is not in the key ring (retired or unknown)")
    if not hmac.compare_digest(mac, _mac(key, body)):
        # One more MAC only while the legacy key is listed: a ufrag minted
        # before key ids whose random byte happens to name a newer key.
        legacy = ring.get(LEGACY_ID)
        if verified_by == LEGACY_ID or legacy is None or not hmac.compare_digest(mac, _mac(legacy, body)):
            raise UfragError("ufrag MAC does not match")
        verified_by = LEGACY_ID
    # Only reachable with a key that minted a zero id, i.e. never: encode refuses.
    if transceiver_id == 0 or conn_id == 0:
        raise UfragError("ufrag has a zero routing id")
    return RoutingHint(
        version=version,
        transceiver_id=transceiver_id,
        conn_id=conn_id,
        nonce=body[_HEADER.size :],
        key_id=verified_by,
    )


def is_ice_ufrag(value: str) -> bool:
    """True if `value` satisfies the RFC 8445 ufrag grammar (4-256 ice-chars)."""
    return (
        isinstance(value, str)
        and UFRAG_MIN_LENGTH <= len(value) <= UFRAG_MAX_LENGTH
        and _ICE_CHARS_RE.fullmatch(value) is not None
    )


def parse_stun_username(username: str) -> tuple[str, str]:
    """Split a binding request USERNAME into (server ufrag, client ufrag).

    The request from the client to the relay carries "<server>:<client>"
    (RFC 8445 section 7.2.2); both halves must be valid ufrags.
    """
    if not isinstance(username, str):
        raise UfragError("STUN USERNAME must be a string")
    if ":" not in username:
        raise UfragError("STUN USERNAME has no ':' separator")
    server, client = username.split(":", 1)
    if ":" in client:
        raise UfragError("STUN USERNAME has more than one ':' separator")
    if not is_ice_ufrag(server):
        raise UfragError("STUN USERNAME server ufrag is not 4-256 ice-chars")
    if not is_ice_ufrag(client):
        raise UfragError("STUN USERNAME client ufrag is not 4-256 ice-chars")
    return server, client
