"""Client tokens and API keys: round trips, and what an attacker would try."""

from __future__ import annotations

import base64
import json

import pytest

from manager.protocol import client_auth as ca
from manager.protocol.keyring import KeyRing

KEY = bytes(range(32))
NOW = 1_800_000_000.0


def test_round_trip() -> None:
    token = ca.mint_token(KEY, ttl=60, subject="user-7", now=NOW)
    claims = ca.verify_token(KEY, token, now=NOW + 59)
    assert claims.subject == "user-7"
    assert claims.expires_at - claims.issued_at == 60
    assert len(claims.token_id) == 16
    assert ca.mint_token(KEY, ttl=60, now=NOW) != ca.mint_token(KEY, ttl=60, now=NOW)  # unique ids


def test_expired_and_future_tokens() -> None:
    token = ca.mint_token(KEY, ttl=60, now=NOW)
    with pytest.raises(ca.AuthError, match="token expired 0 s ago"):
        ca.verify_token(KEY, token, now=NOW + 60)
    with pytest.raises(ca.AuthError, match="expired 3600 s ago"):
        ca.verify_token(KEY, token, now=NOW + 3660)
    future = ca.mint_token(KEY, ttl=600, now=NOW + 300)
    with pytest.raises(ca.AuthError, match="not valid yet"):
        ca.verify_token(KEY, future, now=NOW)


@pytest.mark.parametrize("attempt", range(5))  # fresh random ids, fresh tags
def test_wrong_key_and_every_flipped_bit_are_refused(attempt: int) -> None:
    token = ca.mint_token(KEY, ttl=60, now=NOW)
    with pytest.raises(ca.AuthError, match="signature is invalid"):
        ca.verify_token(bytes(32), token, now=NOW)
    raw = token.encode()
    for i in range(len(raw)):
        for bit in (1, 4, 32):
            forged = bytearray(raw)
            forged[i] ^= bit
            try:
                text = forged.decode()
            except UnicodeDecodeError:
                continue
            if text == token:
                continue
            with pytest.raises(ca.AuthError):
                ca.verify_token(KEY, text, now=NOW)


def test_extended_expiry_is_refused() -> None:
    # An attacker rewrites exp in the payload and keeps the tag.
    token = ca.mint_token(KEY, ttl=60, now=NOW)
    body, tag = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["exp"] += 86400
    forged = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode() + "." + tag
    with pytest.raises(ca.AuthError, match="signature is invalid"):
        ca.verify_token(KEY, forged, now=NOW + 120)


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "." * 2, "x" * 2000, "!!.??"])
def test_malformed(token: str) -> None:
    with pytest.raises(ca.AuthError):
        ca.verify_token(KEY, token, now=NOW)


def test_key_and_ttl_rules() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        ca.mint_token(b"short", ttl=60)
    with pytest.raises(ValueError, match="ttl"):
        ca.mint_token(KEY, ttl=0)
    with pytest.raises(ValueError, match="ttl"):
        ca.mint_token(KEY, ttl=ca.MAX_TTL + 1)


def test_bearer_and_api_keys() -> None:
    assert ca.bearer("Bearer abc") == "abc"
    assert ca.bearer("bearer  abc ") == "abc"
    for bad in (None, "", "Basic abc", "Bearer", "Bearer   "):
        with pytest.raises(ca.AuthError):
            ca.bearer(bad)
    assert ca.check_api_key("k2", ["k1", "k2"])
    assert not ca.check_api_key("k3", ["k1", "k2"])
    assert not ca.check_api_key("", [])


def test_credential_digest_binds_a_call_to_its_creator() -> None:
    d = ca.credential_digest("token-a")
    assert ca.same_credential("token-a", d)
    assert not ca.same_credential("token-b", d)
    assert b"token-a" not in d


def test_the_kid_picks_the_key_and_a_retired_key_is_refused() -> None:
    ring = KeyRing({1: KEY, 2: bytes(range(1, 33))}, signing=2)
    old = ca.mint_token(KeyRing({1: KEY}), ttl=60, now=NOW)
    new = ca.mint_token(ring, ttl=60, now=NOW)
    body = json.loads(base64.urlsafe_b64decode(new.split(".")[0] + "=="))
    assert body["kid"] == 2  # the newest signs, and says so
    assert ca.verify_token(ring, old, now=NOW).subject == ""  # every listed key verifies
    assert ca.verify_token(ring, new, now=NOW).subject == ""
    ring.replace(ring.retired(1))
    with pytest.raises(ca.AuthError, match="token key id 1 is not accepted"):
        ca.verify_token(ring, old, now=NOW)
    # A token without kid is the legacy key 0's: what minters before key ids send.
    legacy = ca.mint_token(KEY, ttl=60, now=NOW)
    assert "kid" not in json.loads(base64.urlsafe_b64decode(legacy.split(".")[0] + "=="))
    assert ca.verify_token(KeyRing({0: KEY}), legacy, now=NOW).expires_at == NOW + 60
    with pytest.raises(ca.AuthError, match="token key id 0 is not accepted"):
        ca.verify_token(ring, legacy, now=NOW)


@pytest.mark.parametrize("kid", ["1", -1, 256, True, None, 1.5])
def test_a_bad_kid_is_malformed(kid) -> None:
    body = base64.urlsafe_b64encode(json.dumps({"v": 1, "kid": kid}).encode()).rstrip(b"=").decode()
    with pytest.raises(ca.AuthError, match="malformed"):
        ca.verify_token(KeyRing({1: KEY}), f"{body}.AAAA", now=NOW)
