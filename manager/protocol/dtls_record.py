"""The DTLS 1.2 record layer (RFC 6347 4.1) for AEAD cipher suites, from the
session's master secret: what a new owner needs to continue a call's DTLS
(its data channels) without the handshake that made it.

OpenSSL keeps a connection's record keys and sequence numbers to itself; but
in TLS/DTLS 1.2 the keys follow from the master secret and the two randoms
(RFC 5246 6.3 key block, TLS PRF), which pyOpenSSL exposes, and the epoch
and sequence number are in every record's header on the wire.

Layout of a record: type(1) version(2) epoch(2) sequence(6) length(2)
fragment. AES-GCM fragments carry an 8-byte explicit nonce first (RFC 5288:
we use epoch||sequence, as OpenSSL does); ChaCha20-Poly1305 has none (RFC 7905:
nonce = IV xor padded epoch||sequence). The additional data is
epoch||sequence || type || version || plaintext length (RFC 5246 6.2.3.3).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

HEADER_LEN = 13
HEADER = struct.Struct("!BHH6sH")  # type, version, epoch, sequence (48 bits), length
DTLS_1_2 = 0xFEFD
MAX_SEQ = (1 << 48) - 1
TAG_LEN = 16
EXPLICIT_NONCE_LEN = 8

CHANGE_CIPHER_SPEC = 20
ALERT = 21
HANDSHAKE = 22
APPLICATION_DATA = 23
CONTENT_TYPES = (CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE, APPLICATION_DATA)


class DtlsRecordError(ValueError):
    """A record that cannot be parsed, or does not authenticate."""


@dataclass(frozen=True)
class Suite:
    """What the record layer needs of a cipher suite."""

    name: str  # OpenSSL's name
    aead: str  # "aes-gcm" or "chacha20-poly1305"
    key_len: int
    iv_len: int  # fixed IV (salt) in the key block
    prf_hash: str  # the TLS 1.2 PRF's hash


SUITES = {s.name: s for s in (
    Suite("ECDHE-ECDSA-AES128-GCM-SHA256", "aes-gcm", 16, 4, "sha256"),
    Suite("ECDHE-RSA-AES128-GCM-SHA256", "aes-gcm", 16, 4, "sha256"),
    Suite("ECDHE-ECDSA-AES256-GCM-SHA384", "aes-gcm", 32, 4, "sha384"),
    Suite("ECDHE-RSA-AES256-GCM-SHA384", "aes-gcm", 32, 4, "sha384"),
    Suite("ECDHE-ECDSA-CHACHA20-POLY1305", "chacha20-poly1305", 32, 12, "sha256"),
    Suite("ECDHE-RSA-CHACHA20-POLY1305", "chacha20-poly1305", 32, 12, "sha256"),
)}


def suite(name: str) -> Suite:
    try:
        return SUITES[name]
    except KeyError:
        raise DtlsRecordError(f"cipher suite {name} is not supported for continuing a session "
                              f"(AEAD suites only: {', '.join(SUITES)})") from None


@dataclass(frozen=True)
class Record:
    type: int
    epoch: int
    seq: int
    fragment: bytes
    version: int = DTLS_1_2

    def serialise(self) -> bytes:
        return HEADER.pack(self.type, self.version, self.epoch, self.seq.to_bytes(6, "big"),
                           len(self.fragment)) + self.fragment

    @property
    def seq_num(self) -> bytes:
        """epoch || sequence: the 64-bit record number of the nonce and the additional data."""
        return self.epoch.to_bytes(2, "big") + self.seq.to_bytes(6, "big")


def parse_records(datagram: bytes) -> list[Record]:
    """Every record of a datagram (DTLS packs several into one)."""
    out = []
    pos = 0
    while pos < len(datagram):
        if len(datagram) - pos < HEADER_LEN:
            raise DtlsRecordError(f"truncated record header at byte {pos}: {len(datagram) - pos} of "
                                  f"{HEADER_LEN} bytes")
        rtype, version, epoch, seq, length = HEADER.unpack_from(datagram, pos)
        if rtype not in CONTENT_TYPES:
            raise DtlsRecordError(f"unknown content type {rtype} at byte {pos}")
        end = pos + HEADER_LEN + length
        if end > len(datagram):
            raise DtlsRecordError(f"record at byte {pos} claims {length} bytes, {len(datagram) - pos - HEADER_LEN} "
                                  "remain")
        out.append(Record(rtype, epoch, int.from_bytes(seq, "big"), datagram[pos + HEADER_LEN:end], version))
        pos = end
    return out


def prf(hash_name: str, secret: bytes, label: bytes, seed: bytes, length: int) -> bytes:
    """The TLS 1.2 PRF (RFC 5246 5): P_hash(secret, label + seed)."""
    seed = label + seed
    out, a = b"", seed
    while len(out) < length:
        a = hmac.new(secret, a, hash_name).digest()
        out += hmac.new(secret, a + seed, hash_name).digest()
    return out[:length]


@dataclass(frozen=True)
class KeyBlock:
    client_key: bytes
    server_key: bytes
    client_iv: bytes
    server_iv: bytes

    @classmethod
    def derive(cls, s: Suite, master_secret: bytes, client_random: bytes, server_random: bytes) -> KeyBlock:
        """RFC 5246 6.3 (no MAC keys for AEAD suites)."""
        if len(master_secret) != 48 or len(client_random) != 32 or len(server_random) != 32:
            raise DtlsRecordError("master secret must be 48 bytes and each random 32")
        hashlib.new(s.prf_hash)  # fails early on an unknown hash
        block = prf(s.prf_hash, master_secret, b"key expansion", server_random + client_random,
                    2 * s.key_len + 2 * s.iv_len)
        k, i = s.key_len, s.iv_len
        return cls(block[:k], block[k:2 * k], block[2 * k:2 * k + i], block[2 * k + i:2 * k + 2 * i])


class RecordProtection:
    """Seals and opens the records of one direction and epoch."""

    def __init__(self, s: Suite, key: bytes, iv: bytes) -> None:
        self.suite = s
        self.iv = iv
        self._aead = AESGCM(key) if s.aead == "aes-gcm" else ChaCha20Poly1305(key)

    def _nonce(self, seq_num: bytes, explicit: bytes | None) -> bytes:
        if self.suite.aead == "aes-gcm":
            return self.iv + (explicit if explicit is not None else seq_num)
        padded = bytes(4) + seq_num
        return bytes(a ^ b for a, b in zip(self.iv, padded, strict=True))

    @staticmethod
    def _aad(seq_num: bytes, rtype: int, version: int, length: int) -> bytes:
        return seq_num + struct.pack("!BHH", rtype, version, length)

    def seal(self, rtype: int, epoch: int, seq: int, plaintext: bytes) -> Record:
        if not 0 <= seq <= MAX_SEQ:
            raise DtlsRecordError(f"sequence number {seq} out of range")
        seq_num = epoch.to_bytes(2, "big") + seq.to_bytes(6, "big")
        aad = self._aad(seq_num, rtype, DTLS_1_2, len(plaintext))
        sealed = self._aead.encrypt(self._nonce(seq_num, None), plaintext, aad)
        fragment = seq_num + sealed if self.suite.aead == "aes-gcm" else sealed
        return Record(rtype, epoch, seq, fragment)

    def open(self, record: Record) -> bytes:
        fragment = record.fragment
        explicit = None
        if self.suite.aead == "aes-gcm":
            if len(fragment) < EXPLICIT_NONCE_LEN + TAG_LEN:
                raise DtlsRecordError(f"record of {len(fragment)} bytes is too short for AES-GCM")
            explicit, fragment = fragment[:EXPLICIT_NONCE_LEN], fragment[EXPLICIT_NONCE_LEN:]
        elif len(fragment) < TAG_LEN:
            raise DtlsRecordError(f"record of {len(fragment)} bytes is too short for ChaCha20-Poly1305")
        aad = self._aad(record.seq_num, record.type, record.version, len(fragment) - TAG_LEN)
        try:
            return self._aead.decrypt(self._nonce(record.seq_num, explicit), fragment, aad)
        except InvalidTag:
            raise DtlsRecordError(f"record epoch {record.epoch} sequence {record.seq} does not "
                                  "authenticate") from None


class ReplayWindow:
    """RFC 6347 4.1.2.6: a 64-record sliding window of one epoch."""

    SIZE = 64

    def __init__(self, highest: int = -1, *, earlier_seen: bool = False, bits: int | None = None) -> None:
        """`earlier_seen`: a window continued from another owner, which knew
        only the highest record: everything up to it counts as seen. `bits`:
        a window continued exactly (what `bits` read at the other owner)."""
        self.highest = highest
        if bits is not None:
            self._bits = bits & ((1 << self.SIZE) - 1) if highest >= 0 else 0
        else:
            self._bits = (1 << self.SIZE) - 1 if earlier_seen and highest >= 0 else 0  # bit i: highest - i seen

    @property
    def bits(self) -> int:
        """The window below `highest` (bit i: record highest - i seen)."""
        return self._bits

    def check(self, seq: int) -> bool:
        """True if `seq` is new (not seen and not too old)."""
        if seq > self.highest:
            return True
        offset = self.highest - seq
        return offset < self.SIZE and not (self._bits >> offset) & 1

    def mark(self, seq: int) -> None:
        if seq > self.highest:
            shift = seq - self.highest
            self._bits = ((self._bits << shift) | 1) & ((1 << self.SIZE) - 1) if shift < self.SIZE else 1
            self.highest = seq
        else:
            self._bits |= 1 << (self.highest - seq)
