"""The private CA between relayd and transceivers: issue certificates, build
TLS contexts, and read a peer's identity from its certificate.

A certificate's identity is a DNS name in its subjectAltName:

    relayd.splitrelay.internal               relayd (every relay of a fleet)
    transceiver-<N>.splitrelay.internal      transceiver N

Clients check the server's name as TLS hostname verification does (relayd
connects to transceiver N with server_hostname=transceiver_name(N)); servers
read the client's name with peer_identity(). Everything cryptographic is the
`cryptography` package and the standard library's `ssl`: nothing of our own.

Files in a PKI directory (keys 0600, never logged):

    ca.pem ca.key                   the CA (the key stays with the operator)
    <name>.pem <name>.key           one per identity, e.g. relayd, transceiver-3
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from manager.protocol.keyring import KeyRing, parse_ring

log = logging.getLogger(__name__)

DOMAIN = "splitrelay.internal"
RELAYD = "relayd"
CA_NAME = "ca"
CA_DAYS = 3650
LEAF_DAYS = 397  # what public CAs may issue; rotate with `relayctl pki issue`
MAX_TRANSCEIVER_ID = 0xFFFF  # the routing hint carries it as u16

_NAME_RE = re.compile(rf"^(relayd|transceiver-([0-9]{{1,5}}))\.{re.escape(DOMAIN)}$")


class PkiError(Exception):
    """A PKI file is missing, unreadable or not what it should be; one line."""


@dataclass(frozen=True)
class Identity:
    """Who a certificate names: relayd, or transceiver `transceiver_id`."""

    role: str  # "relayd" or "transceiver"
    transceiver_id: int | None = None

    def __str__(self) -> str:
        return RELAYD if self.role == RELAYD else f"transceiver {self.transceiver_id}"


def transceiver_name(transceiver_id: int) -> str:
    """The DNS name in transceiver N's certificate (and what relayd verifies)."""
    if isinstance(transceiver_id, bool) or not isinstance(transceiver_id, int) \
            or not 1 <= transceiver_id <= MAX_TRANSCEIVER_ID:
        raise PkiError(f"transceiver id must be an integer in 1..{MAX_TRANSCEIVER_ID}, got {transceiver_id!r}")
    return f"transceiver-{transceiver_id}.{DOMAIN}"


def relayd_name() -> str:
    return f"{RELAYD}.{DOMAIN}"


def parse_identity(dns_name: str) -> Identity | None:
    """The identity a subjectAltName DNS entry stands for, or None."""
    m = _NAME_RE.match(dns_name)
    if m is None:
        return None
    if m.group(1) == RELAYD:
        return Identity(RELAYD)
    n = int(m.group(2))
    return Identity("transceiver", n) if 1 <= n <= MAX_TRANSCEIVER_ID else None


def peer_identity(peercert: dict | None) -> Identity | None:
    """The identity in a verified peer certificate as ssl's getpeercert()
    returns it; None if it names none of ours (or there is no certificate).
    A certificate naming more than one identity is refused (None)."""
    if not peercert:
        return None
    found = {parse_identity(value) for kind, value in peercert.get("subjectAltName", ()) if kind == "DNS"}
    found.discard(None)
    return found.pop() if len(found) == 1 else None


# -- files ----------------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    """Create `path` 0600 from the first byte (never readable by others, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # A name nobody can guess, created here or not at all: a file or symlink
    # planted at a predictable name would have the key written through it.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise PkiError(f"{path}: no such key (run `relayctl pki init` first)") from None
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{path}: not a PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path}: not an EC private key")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise PkiError(f"{path}: no such certificate (run `relayctl pki init` first)") from None
    except ValueError as exc:
        raise PkiError(f"{path}: not a PEM certificate: {exc}") from None


def check_private(path: Path) -> None:
    """Refuse a secret file that others may read: its mode must be 0600 or stricter."""
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        raise PkiError(f"{path}: no such file") from None
    if mode & 0o077:
        raise PkiError(f"{path}: mode {mode:04o} lets others read a secret; chmod 600 it")


def read_secret_file(path: Path) -> bytes:
    """A secret's file: it must exist and be readable by its owner only."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
    if st.st_mode & 0o077:
        raise ValueError(f"{path}: mode {st.st_mode & 0o777:04o} lets others read a secret; chmod 600 it")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from None


def read_hint_key(path: Path | None, environ: dict[str, str]) -> KeyRing | KeyRingFile:
    """The routing-hint keys: a key ring file (mode 0600, followed as it
    changes: KeyRingFile), or one hex key from SPLITRELAY_HINT_KEY."""
    if path is not None:
        return KeyRingFile(Path(path), min_length=16)
    text = environ.get("SPLITRELAY_HINT_KEY", "").strip()
    if not text:
        raise ValueError("no routing-hint key: give --hint-key-file (mode 0600) or SPLITRELAY_HINT_KEY")
    return parse_ring(text, min_length=16, what="the routing-hint key (SPLITRELAY_HINT_KEY)")


class KeyRingFile:
    """A key ring file that a process follows: current() reads it again when
    it changed (a stat a call), so a transceiver takes a rotation without a
    restart. A changed file that does not parse keeps the last good ring."""

    def __init__(self, path: Path, *, min_length: int) -> None:
        self.path = path
        self.min_length = min_length
        self._seen: tuple[int, int, int] | None = None
        self._ring = self._read()  # the first read's errors are the caller's

    def _read(self) -> KeyRing:
        # Stat first: a change between the stat and the read is read again next time.
        try:
            st = self.path.stat()
        except OSError:
            st = None  # read_secret_file says why
        ring = parse_ring(read_secret_file(self.path).decode("ascii", "replace"), min_length=self.min_length,
                          what=str(self.path))
        self._seen = None if st is None else (st.st_mtime_ns, st.st_size, st.st_ino)
        return ring

    def __call__(self) -> KeyRing:
        return self.current()

    def current(self) -> KeyRing:
        try:
            st = self.path.stat()
            seen = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            return self._ring
        if seen != self._seen:
            try:
                self._ring = self._read()
            except ValueError as exc:
                log.warning("%s; keeping the keys read before", exc)
                self._seen = seen  # warned once per change
        return self._ring


@dataclass(frozen=True)
class Paths:
    """The files of one identity in a PKI directory."""

    ca: Path
    cert: Path
    key: Path


def paths(pki_dir: str | Path, name: str) -> Paths:
    """`name` is relayd or transceiver-N (the file stem)."""
    d = Path(pki_dir)
    return Paths(d / f"{CA_NAME}.pem", d / f"{name}.pem", d / f"{name}.key")


def init_ca(pki_dir: str | Path, *, force: bool = False) -> Path:
    """Create the CA in `pki_dir` (ca.pem, ca.key 0600). An existing CA is
    kept unless `force`: replacing it invalidates every certificate issued."""
    d = Path(pki_dir)
    cert_path, key_path = d / f"{CA_NAME}.pem", d / f"{CA_NAME}.key"
    if cert_path.exists() and key_path.exists() and not force:
        return cert_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"splitrelay CA {os.urandom(4).hex()}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def issue(pki_dir: str | Path, dns_name: str, *, ip_addresses: tuple[str, ...] = (),
          days: int = LEAF_DAYS) -> Paths:
    """Issue a certificate for `dns_name` (relayd_name() or transceiver_name(N))
    signed by the CA in `pki_dir`; usable as TLS server and client. Written
    as <stem>.pem and <stem>.key (0600), replacing an older one."""
    identity = parse_identity(dns_name)
    if identity is None:
        raise PkiError(f"{dns_name!r} is not relayd.{DOMAIN} or transceiver-N.{DOMAIN}")
    d = Path(pki_dir)
    ca_key = _load_key(d / f"{CA_NAME}.key")
    ca_cert = _load_cert(d / f"{CA_NAME}.pem")
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(dns_name)]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    stem = dns_name.removesuffix(f".{DOMAIN}")
    p = paths(d, stem)
    _write_private(p.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    p.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return p


# -- TLS contexts -----------------------------------------------------------------------------


def _context(purpose: ssl.Purpose, p: Paths) -> ssl.SSLContext:
    for f in (p.ca, p.cert):
        if not f.exists():
            raise PkiError(f"{f}: no such file (run `relayctl pki init` / `relayctl pki issue`)")
    check_private(p.key)
    ctx = ssl.create_default_context(purpose, cafile=str(p.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(p.cert), str(p.key))
    except ssl.SSLError as exc:
        raise PkiError(f"{p.cert}: does not match {p.key}: {exc.reason}") from None
    return ctx


def server_context(p: Paths) -> ssl.SSLContext:
    """A server that requires a client certificate from our CA (mutual TLS)."""
    ctx = _context(ssl.Purpose.CLIENT_AUTH, p)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(p: Paths) -> ssl.SSLContext:
    """A client that presents its certificate and verifies the server's chain
    and name (pass server_hostname=transceiver_name(N) or relayd_name())."""
    ctx = _context(ssl.Purpose.SERVER_AUTH, p)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
