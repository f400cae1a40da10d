"""Client credentials for the public signaling API (WHIP-style bearer tokens,
RFC 9725 section 4.5): static API keys, or short-lived tokens an operator's
backend mints with a shared key, the way a realtime API hands a browser an
ephemeral key. No I/O.

A token is two base64url parts joined by a dot:

    payload   = {"v": 1, "kid": <key id>, "sub": <subject>, "iat": <unix s>, "exp": <unix s>, "jti": <16 hex>}
    token     = b64url(payload JSON) "." b64url(HMAC-SHA256(key, DOMAIN || b64url(payload JSON)))

`kid` names the key of the token key ring that signed (manager.protocol.keyring;
absent: the legacy key 0). Verification reads it from the payload, takes that
key, recomputes the MAC over the received payload text, compares its base64url
text with hmac.compare_digest, and then checks the times; a token is bound to nothing
else (it authorises creating calls until it expires). Minting one elsewhere
takes ten lines in any language: see docs/security.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from manager.protocol.keyring import LEGACY_ID, MAX_ID, KeyRing

VERSION = 1
DOMAIN = b"splitrelay/client-token/v1\x00"
MIN_KEY_LENGTH = 32
MAX_TOKEN_LENGTH = 1024
MAX_TTL = 24 * 3600.0
CLOCK_SKEW = 30.0  # seconds a token's iat may lie in the future (clocks differ)


class AuthError(ValueError):
    """A credential was refused; str() is the one-line reason for a 401."""


@dataclass(frozen=True)
class TokenClaims:
    subject: str
    issued_at: int
    expires_at: int
    token_id: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) < MIN_KEY_LENGTH:
        raise ValueError(f"token key must be at least {MIN_KEY_LENGTH} bytes")


def _mac(key: bytes, payload_b64: str) -> bytes:
    return hmac.new(key, DOMAIN + payload_b64.encode("ascii"), hashlib.sha256).digest()


TokenKeys = bytes | KeyRing  # a bare key is the ring {0: key}


def mint_token(keys: TokenKeys, *, ttl: float, subject: str = "", now: float | None = None) -> str:
    """A token valid for `ttl` seconds from `now` (default: the clock),
    signed by the ring's signing key (a bare key: no `kid`, the legacy key)."""
    key, kid = (keys.signing_key, keys.signing_id) if isinstance(keys, KeyRing) else (keys, None)
    _check_key(key)
    if not 0 < ttl <= MAX_TTL:
        raise ValueError(f"ttl must be in (0, {MAX_TTL:g}] seconds")
    if len(subject) > 128:
        raise ValueError("subject must be at most 128 characters")
    iat = int(time.time() if now is None else now)
    payload = {"v": VERSION, "sub": subject, "iat": iat, "exp": iat + max(1, int(ttl)),
               "jti": secrets.token_hex(8)}
    if kid is not None:
        payload["kid"] = kid
    body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    return f"{body}.{_b64(_mac(key, body))}"


def verify_token(keys: TokenKeys, token: str, *, now: float | None = None) -> TokenClaims:
    """The token's claims; AuthError saying what is wrong with it."""
    ring = keys if isinstance(keys, KeyRing) else KeyRing.single(keys)
    for kid in ring.ids:
        _check_key(ring.get(kid))  # type: ignore[arg-type]
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH or token.count(".") != 1:
        raise AuthError("token is malformed")
    body, tag = token.split(".")
    # The key id is read before the MAC is checked (bounded by
    # MAX_TOKEN_LENGTH): it only picks the key the MAC is checked with.
    try:
        payload = json.loads(_unb64(body))
        kid = payload.get("kid", LEGACY_ID)
    except (binascii.Error, ValueError, AttributeError, TypeError):
        raise AuthError("token is malformed") from None
    if isinstance(kid, bool) or not isinstance(kid, int) or not 0 <= kid <= MAX_ID:
        raise AuthError("token is malformed (kid)")
    key = ring.get(kid)
    if key is None:
        raise AuthError(f"token key id {kid} is not accepted (retired or unknown)")
    # Compared as text: base64's spare bits would let two spellings of one
    # tag pass a comparison of the decoded bytes.
    if not hmac.compare_digest(tag.encode("utf-8", "replace"), _b64(_mac(key, body)).encode()):
        raise AuthError("token signature is invalid")
    try:
        claims = TokenClaims(str(payload["sub"]), int(payload["iat"]), int(payload["exp"]), str(payload["jti"]))
        version = payload["v"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise AuthError("token is malformed") from None
    if version != VERSION:
        raise AuthError(f"token version {version!r} is not supported")
    t = time.time() if now is None else now
    if t >= claims.expires_at:
        raise AuthError(f"token expired {int(t - claims.expires_at)} s ago")
    if claims.issued_at > t + CLOCK_SKEW:
        raise AuthError("token is not valid yet (issued in the future)")
    return claims


def check_api_key(presented: str, keys: list[str] | tuple[str, ...]) -> bool:
    """Whether `presented` is one of `keys`, compared in constant time each."""
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(presented.encode(), k.encode())
    return ok


def bearer(authorization: str | None) -> str:
    """The credential of an `Authorization: Bearer <credential>` header."""
    if not authorization:
        raise AuthError("missing Authorization: Bearer credential")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise AuthError("Authorization must be 'Bearer <credential>'")
    return value.strip()


def credential_digest(credential: str) -> bytes:
    """What a call keeps of the credential that created it (never the credential
    itself), to check the one that ends or updates it."""
    return hashlib.sha256(DOMAIN + credential.encode()).digest()


def same_credential(credential: str, digest: bytes) -> bool:
    return hmac.compare_digest(credential_digest(credential), digest)
