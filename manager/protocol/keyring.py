"""Key rings: the routing-hint key and the client-token key as lists of
accepted keys, each with an id. One key signs (mints ufrags or tokens); every
listed key verifies what carries its id, so verification picks its key by the
id alone. Rotating is: add a key, make it sign, retire the old one. No I/O.

Text form (a 0600 file, edited by `relayctl keys`):

    # comments and blank lines are ignored
    <id> <hex key> [sign]

Ids are 0..255 (one byte on the wire). At most one line says `sign`; with
none, the newest (highest id) signs. A file holding nothing but one hex key,
the form from before key ids, is the ring {0: that key}: key 0 is the legacy
key, which also verifies ufrags minted before ids existed (their id byte was
random nonce; manager.protocol.ufrag).
"""

from __future__ import annotations

import hashlib
import re

LEGACY_ID = 0
MAX_ID = 255
_LINE = re.compile(r"(\d{1,3})\s+([0-9A-Fa-f]+)(?:\s+(sign))?")


class KeyRing:
    """Keys by id and the one that signs. Mutable in place (replace()), so
    that every component holding the ring sees a reload at once."""

    def __init__(self, keys: dict[int, bytes], signing: int | None = None) -> None:
        self._set(keys, signing)

    def _set(self, keys: dict[int, bytes], signing: int | None) -> None:
        if not keys:
            raise ValueError("a key ring needs at least one key")
        for kid in keys:
            if not 0 <= kid <= MAX_ID:
                raise ValueError(f"key id {kid} is outside 0..{MAX_ID}")
        signing = max(keys) if signing is None else signing
        if signing not in keys:
            raise ValueError(f"signing key id {signing} is not in the ring")
        self._keys = dict(sorted(keys.items()))
        self._signing = signing

    @classmethod
    def single(cls, key: bytes) -> KeyRing:
        """One key, the legacy id 0 (a plain key from before key ids)."""
        return cls({LEGACY_ID: bytes(key)})

    @property
    def ids(self) -> list[int]:
        return list(self._keys)

    @property
    def signing_id(self) -> int:
        return self._signing

    @property
    def signing_key(self) -> bytes:
        return self._keys[self._signing]

    def get(self, key_id: int) -> bytes | None:
        """The key with exactly this id."""
        return self._keys.get(key_id)

    def verifier(self, key_id: int) -> bytes | None:
        """The key that verifies what carries `key_id`: that key, or, for an
        id no key holds, the legacy key 0 while it is listed."""
        key = self._keys.get(key_id)
        return key if key is not None else self._keys.get(LEGACY_ID)

    def replace(self, other: KeyRing) -> None:
        self._set(other._keys, other._signing)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeyRing) and (self._keys, self._signing) == (other._keys, other._signing)

    __hash__ = None  # type: ignore[assignment]  # mutable

    # --- rotation steps (each returns a new ring; the file is the caller's) ---

    def next_id(self) -> int:
        """The id a new key gets: after the newest, wrapping past 255 to the
        lowest free one (a retired id may come back: the old key's MACs fail
        under the new key, so nothing it signed verifies again)."""
        free = [i for i in range(1, MAX_ID + 1) if i not in self._keys]
        if not free:
            raise ValueError(f"the ring holds {len(self._keys)} keys; retire one first")
        after = [i for i in free if i > max(self._keys)]
        return after[0] if after else free[0]

    def added(self, key: bytes, *, sign: bool) -> KeyRing:
        kid = self.next_id()
        return KeyRing({**self._keys, kid: bytes(key)}, kid if sign else self._signing)

    def signing_with(self, key_id: int) -> KeyRing:
        if key_id not in self._keys:
            raise ValueError(f"no key {key_id} in the ring (ids: {', '.join(map(str, self._keys))})")
        return KeyRing(self._keys, key_id)

    def retired(self, key_id: int) -> KeyRing:
        if key_id not in self._keys:
            raise ValueError(f"no key {key_id} in the ring (ids: {', '.join(map(str, self._keys))})")
        if key_id == self._signing:
            raise ValueError(f"key {key_id} signs: make another key sign first (relayctl keys sign)")
        return KeyRing({k: v for k, v in self._keys.items() if k != key_id}, self._signing)

    # --- text ---

    def to_text(self) -> str:
        lines = ["# splitrelay key ring: <id> <hex key> [sign] (relayctl keys)"]
        lines += [f"{kid} {key.hex()}" + (" sign" if kid == self._signing else "") for kid, key in self._keys.items()]
        return "\n".join(lines) + "\n"

    def summary(self) -> str:
        """The ids, the signing one starred ('1,2*'): what a log line shows."""
        return ",".join(f"{k}{'*' if k == self._signing else ''}" for k in self._keys)

    def change_from(self, old: KeyRing) -> str:
        """What a log line says of a new ring: '0* -> 0,1*', and any id whose key was replaced."""
        replaced = [k for k in self._keys if k in old._keys and old._keys[k] != self._keys[k]]
        return f"{old.summary()} -> {self.summary()}" + "".join(f" (key {k} replaced)" for k in replaced)

    def describe(self) -> list[dict]:
        """Per key: id, whether it signs, and a fingerprint (never the key)."""
        return [{"id": kid, "signing": kid == self._signing, "legacy": kid == LEGACY_ID,
                 "fingerprint": fingerprint(key)} for kid, key in self._keys.items()]


def fingerprint(key: bytes) -> str:
    """A short name of a key that reveals nothing of it."""
    return hashlib.sha256(b"splitrelay/key-fingerprint\x00" + key).hexdigest()[:12]


def parse_ring(text: str, *, min_length: int, what: str) -> KeyRing:
    """A ring from its text form (or a bare hex key: the ring {0: key});
    ValueError naming the line and what is wrong with it."""
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if len(lines) == 1 and " " not in lines[0][1] and "\t" not in lines[0][1]:
        return KeyRing.single(_hex(lines[0][1], min_length, what, "the key"))
    keys: dict[int, bytes] = {}
    signing = []
    for n, line in lines:
        m = _LINE.fullmatch(line)
        if m is None:
            raise ValueError(f"{what}: line {n}: expected '<id> <hex key> [sign]'")
        kid = int(m.group(1))
        if kid > MAX_ID:
            raise ValueError(f"{what}: line {n}: key id {kid} is outside 0..{MAX_ID}")
        if kid in keys:
            raise ValueError(f"{what}: line {n}: key id {kid} is listed twice")
        keys[kid] = _hex(m.group(2), min_length, what, f"line {n}")
        if m.group(3):
            signing.append(kid)
    if not keys:
        raise ValueError(f"{what}: no key")
    if len(signing) > 1:
        raise ValueError(f"{what}: keys {signing[0]} and {signing[1]} both say 'sign'; one key signs")
    return KeyRing(keys, signing[0] if signing else None)


def _hex(text: str, min_length: int, what: str, where: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{what}: {where}: the key must be hexadecimal") from None
    if len(key) < min_length:
        raise ValueError(f"{what}: {where}: the key must be at least {min_length} bytes ({2 * min_length} hex "
                         f"digits), got {len(key)}")
    return key
