"""Who may use the public listener: the credential check for clients, per
the configured mode (off, static API keys, or tokens minted by the operator's
backend; manager.protocol.client_auth), with keys read from 0600 files.

A token creates one call: its `jti` is spent by the call it created (a
replay is refused until the token expires), and one subject holds at most
`max_calls_per_subject` live calls on this relay."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from manager.pki import read_secret_file
from manager.protocol.api import ApiError
from manager.protocol.client_auth import MIN_KEY_LENGTH, AuthError, bearer, check_api_key, verify_token
from manager.protocol.keyring import KeyRing, parse_ring
from manager.protocol.sources import Tally
from manager.relay.config import ClientAuthConfig

MAX_SPENT = 1 << 20  # token ids remembered at once (each only until its token expires)


@dataclass
class CreateGrant:
    """A creation under way: the credential, and for a token its id and subject."""

    credential: str | None
    token_id: str | None = None
    subject: str | None = None
    expires_at: float = 0.0
    conn_id: int | None = None  # the call it created, once created


class ClientAuth:
    """Checks `Authorization: Bearer ...` on the public listener."""

    def __init__(self, mode: str, *, api_keys: list[str] | None = None, token_key: bytes | KeyRing | None = None,
                 max_calls_per_subject: int = 4, clock: Callable[[], float] = time.time) -> None:
        if mode not in ("off", "api_keys", "tokens"):
            raise ValueError(f"unknown client auth mode {mode!r}")
        if mode == "api_keys" and not api_keys:
            raise ValueError("client auth mode api_keys needs at least one key")
        ring = KeyRing.single(token_key) if isinstance(token_key, bytes) else token_key
        if mode == "tokens" and (ring is None or any(len(ring.get(k) or b"") < MIN_KEY_LENGTH for k in ring.ids)):
            raise ValueError("client auth mode tokens needs a key of at least 32 bytes")
        self.mode = mode
        self._api_keys = list(api_keys or [])
        self._token_key = ring
        self.max_calls_per_subject = max_calls_per_subject
        self._clock = clock
        self._spent: dict[str, float] = {}  # token id -> its expiry (reserved or spent)
        self._subject_calls = Tally()
        self._subject_of: dict[int, str] = {}  # conn_id -> subject, for the token-created calls
        self._next_sweep = 0.0

    @classmethod
    def from_config(cls, cfg: ClientAuthConfig) -> ClientAuth:
        if cfg.mode == "api_keys":
            return cls("api_keys", api_keys=read_api_keys(cfg))
        if cfg.mode == "tokens":
            return cls("tokens", token_key=read_token_ring(cfg), max_calls_per_subject=cfg.max_calls_per_subject)
        return cls("off")

    def reload(self, cfg: ClientAuthConfig) -> list[str]:
        """Take new keys and caps from `cfg` (same mode: a mode change needs a
        restart); tokens spent and calls counted stay. What changed, by name
        (never a key). ValueError, nothing changed, if a key file is bad."""
        if cfg.mode != self.mode:
            raise ValueError(f"client_auth.mode: changing it ({self.mode} -> {cfg.mode}) needs a restart")
        changed = []
        if self.mode == "api_keys":
            keys = read_api_keys(cfg)
            if not keys:
                raise ValueError(f"{cfg.api_keys_file}: no API key (mode api_keys needs at least one)")
            added, removed = len(set(keys) - set(self._api_keys)), len(set(self._api_keys) - set(keys))
            if added or removed:
                changed.append(f"client_auth.api_keys: {added} added, {removed} removed")
            self._api_keys = keys
        elif self.mode == "tokens":
            ring = read_token_ring(cfg)
            assert self._token_key is not None
            if ring != self._token_key:
                changed.append(f"client_auth.token_keys: {ring.change_from(self._token_key)}")
            self._token_key = ring
            if cfg.max_calls_per_subject != self.max_calls_per_subject:
                changed.append(f"client_auth.max_calls_per_subject: {self.max_calls_per_subject} -> "
                               f"{cfg.max_calls_per_subject}")
            self.max_calls_per_subject = cfg.max_calls_per_subject
        return changed

    @property
    def required(self) -> bool:
        return self.mode != "off"

    def check(self, authorization: str | None) -> str | None:
        """The caller's credential (None when auth is off); AuthError says why not."""
        if self.mode == "off":
            return None
        credential = bearer(authorization)
        if self.mode == "api_keys":
            if not check_api_key(credential, self._api_keys):
                raise AuthError("API key is not valid")
        else:
            assert self._token_key is not None
            verify_token(self._token_key, credential)
        return credential

    def begin_create(self, authorization: str | None) -> CreateGrant:
        """Check the credential of a call creation. A token's id is reserved
        (AuthError if another creation spent or holds it), and its subject
        must be under its cap (ApiError 429). end_create() always follows."""
        if self.mode != "tokens":
            return CreateGrant(self.check(authorization))
        credential = bearer(authorization)
        assert self._token_key is not None
        claims = verify_token(self._token_key, credential)
        self._forget_expired()
        if claims.token_id in self._spent:
            raise AuthError("token was already used to create a call (a token creates one call)")
        if self._subject_calls[claims.subject] >= self.max_calls_per_subject:
            raise ApiError(429, f"too many calls for this token's subject (at most {self.max_calls_per_subject} "
                                "at once)")
        self._spent[claims.token_id] = float(claims.expires_at)
        return CreateGrant(credential, claims.token_id, claims.subject, float(claims.expires_at))

    def created(self, grant: CreateGrant, conn_id: int) -> None:
        """The creation succeeded: the token stays spent, the call counts for its subject."""
        grant.conn_id = conn_id
        if grant.subject is not None:
            self._subject_calls.add(grant.subject)
            self._subject_of[conn_id] = grant.subject

    def end_create(self, grant: CreateGrant) -> None:
        """A creation that made no call gives its token back (the client may retry with it)."""
        if grant.conn_id is None and grant.token_id is not None:
            self._spent.pop(grant.token_id, None)

    def call_ended(self, conn_id: int) -> None:
        subject = self._subject_of.pop(conn_id, None)
        if subject is not None:
            self._subject_calls.remove(subject)

    def _forget_expired(self) -> None:
        now = self._clock()
        if now < self._next_sweep and len(self._spent) < MAX_SPENT:
            return  # a sweep a second at most: its cost is the ids held
        self._next_sweep = now + 1.0
        for jti in [j for j, exp in self._spent.items() if exp <= now]:
            del self._spent[jti]
        if len(self._spent) >= MAX_SPENT:
            raise ApiError(503, "too many unexpired tokens in use; retry shortly")


def read_api_keys(cfg: ClientAuthConfig) -> list[str]:
    assert cfg.api_keys_file is not None
    return [line.strip() for line in read_secret_file(Path(cfg.api_keys_file)).decode().splitlines()
            if line.strip() and not line.startswith("#")]


def read_token_ring(cfg: ClientAuthConfig) -> KeyRing:
    assert cfg.token_key_file is not None
    text = read_secret_file(Path(cfg.token_key_file)).decode("ascii", "replace")
    return parse_ring(text, min_length=MIN_KEY_LENGTH, what=str(cfg.token_key_file))
