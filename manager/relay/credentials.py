"""Who may use the public listener: the credential check for clients, per
the configured mode (off, static API keys, or tokens minted by the operator's
backend; manager.protocol.client_auth), with keys read from 0600 files."""

from __future__ import annotations

from pathlib import Path

from manager.pki import read_secret_file
from manager.protocol.client_auth import AuthError, bearer, check_api_key, verify_token
from manager.relay.config import ClientAuthConfig


class ClientAuth:
    """Checks `Authorization: Bearer ...` on the public listener."""

    def __init__(self, mode: str, *, api_keys: list[str] | None = None, token_key: bytes | None = None) -> None:
        if mode not in ("off", "api_keys", "tokens"):
            raise ValueError(f"unknown client auth mode {mode!r}")
        if mode == "api_keys" and not api_keys:
            raise ValueError("client auth mode api_keys needs at least one key")
        if mode == "tokens" and (token_key is None or len(token_key) < 32):
            raise ValueError("client auth mode tokens needs a key of at least 32 bytes")
        self.mode = mode
        self._api_keys = list(api_keys or [])
        self._token_key = token_key

    @classmethod
    def from_config(cls, cfg: ClientAuthConfig) -> ClientAuth:
        if cfg.mode == "api_keys":
            assert cfg.api_keys_file is not None
            keys = [line.strip() for line in read_secret_file(Path(cfg.api_keys_file)).decode().splitlines()
                    if line.strip() and not line.startswith("#")]
            return cls("api_keys", api_keys=keys)
        if cfg.mode == "tokens":
            assert cfg.token_key_file is not None
            text = read_secret_file(Path(cfg.token_key_file)).decode("ascii", "replace").strip()
            try:
                key = bytes.fromhex(text)
            except ValueError:
                raise ValueError(f"{cfg.token_key_file}: the token key must be hex") from None
            return cls("tokens", token_key=key)
        return cls("off")

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
