"""The private CA: real TLS handshakes on loopback between contexts built from
issued certificates, and every refusal an attacker would try."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest

from manager import pki


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    pki.init_ca(d)
    pki.issue(d, pki.relayd_name())
    pki.issue(d, pki.transceiver_name(3))
    return d


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str,
              ) -> tuple[dict | None, Exception | None, Exception | None]:
    """One TLS handshake over a loopback TCP connection: (the server's view of
    the client certificate, the server's error, the client's error)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: dict = {"cert": None, "error": None}

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                seen["cert"] = tls.getpeercert()
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            seen["error"] = exc

    t = threading.Thread(target=serve)
    t.start()
    client_error = None
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
            tls.recv(2)
    except (ssl.SSLError, OSError) as exc:
        client_error = exc
    t.join(5)
    listener.close()
    return seen["cert"], seen["error"], client_error


def test_mutual_tls_names_both_sides(ca: Path) -> None:
    server = pki.server_context(pki.paths(ca, "relayd"))
    client = pki.client_context(pki.paths(ca, "transceiver-3"))
    cert, server_err, client_err = handshake(server, client, pki.relayd_name())
    assert server_err is None and client_err is None
    assert pki.peer_identity(cert) == pki.Identity("transceiver", 3)
    assert str(pki.peer_identity(cert)) == "transceiver 3"


def test_client_checks_the_server_is_the_transceiver_it_meant(ca: Path) -> None:
    # relayd connecting to transceiver 4's control URL finds transceiver 3 there.
    server = pki.server_context(pki.paths(ca, "transceiver-3"))
    client = pki.client_context(pki.paths(ca, "relayd"))
    _, _, client_err = handshake(server, client, pki.transceiver_name(4))
    assert isinstance(client_err, ssl.SSLCertVerificationError)
    assert "mismatch" in str(client_err) or "match" in str(client_err)
    _, server_err, client_err = handshake(server, client, pki.transceiver_name(3))
    assert server_err is None and client_err is None


def test_server_refuses_a_client_without_certificate(ca: Path) -> None:
    server = pki.server_context(pki.paths(ca, "relayd"))
    client = ssl.create_default_context(cafile=str(ca / "ca.pem"))  # verifies the server, shows nothing
    _, server_err, _ = handshake(server, client, pki.relayd_name())
    assert isinstance(server_err, ssl.SSLError)
    assert "certificate" in str(server_err).lower()


def test_server_refuses_a_certificate_from_another_ca(ca: Path, tmp_path: Path) -> None:
    rogue = tmp_path / "rogue"
    pki.init_ca(rogue)
    pki.issue(rogue, pki.transceiver_name(3))
    # The rogue trusts our CA for the server, but its own certificate is not ours.
    (rogue / "ca.pem").write_bytes((ca / "ca.pem").read_bytes())
    server = pki.server_context(pki.paths(ca, "relayd"))
    client = pki.client_context(pki.paths(rogue, "transceiver-3"))
    cert, server_err, _ = handshake(server, client, pki.relayd_name())
    assert cert is None
    assert isinstance(server_err, ssl.SSLCertVerificationError)


def test_keys_are_private_and_a_readable_key_is_refused(ca: Path) -> None:
    for name in ("ca.key", "relayd.key", "transceiver-3.key"):
        assert stat.S_IMODE((ca / name).stat().st_mode) == 0o600
    (ca / "relayd.key").chmod(0o644)
    with pytest.raises(pki.PkiError, match="mode 0644 lets others read a secret"):
        pki.server_context(pki.paths(ca, "relayd"))


def test_init_keeps_an_existing_ca(ca: Path) -> None:
    before = (ca / "ca.pem").read_bytes()
    pki.init_ca(ca)
    assert (ca / "ca.pem").read_bytes() == before
    pki.init_ca(ca, force=True)
    assert (ca / "ca.pem").read_bytes() != before


@pytest.mark.parametrize(("san", "expected"), [
    ([("DNS", "relayd.splitrelay.internal")], pki.Identity("relayd")),
    ([("DNS", "transceiver-65535.splitrelay.internal")], pki.Identity("transceiver", 65535)),
    ([("DNS", "transceiver-0.splitrelay.internal")], None),
    ([("DNS", "transceiver-65536.splitrelay.internal")], None),
    ([("DNS", "transceiver-3.splitrelay.internal.evil")], None),
    ([("DNS", "xtransceiver-3.splitrelay.internal")], None),
    ([("DNS", "transceiver-3.splitrelay.internal"), ("DNS", "relayd.splitrelay.internal")], None),
    ([("IP Address", "10.0.0.1")], None),
    ([], None),
])
def test_peer_identity(san: list, expected: pki.Identity | None) -> None:
    assert pki.peer_identity({"subjectAltName": tuple(san)}) == expected


def test_bad_names_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(pki.PkiError, match="not relayd"):
        pki.issue(tmp_path, "evil.example.com")
    with pytest.raises(pki.PkiError, match="run `relayctl pki init` first"):
        pki.issue(tmp_path, pki.relayd_name())
    with pytest.raises(pki.PkiError, match="1..65535"):
        pki.transceiver_name(0)


def test_relayctl_pki_and_token(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cli.relayctl import main
    from manager.protocol.client_auth import verify_token

    run = CliRunner().invoke
    d = tmp_path / "pki"
    res = run(main, ["pki", "init", "--dir", str(d), "--json"])
    assert res.exit_code == 0, res.output
    res = run(main, ["pki", "issue", "--dir", str(d), "--transceiver", "3"])
    assert res.exit_code == 0 and "transceiver-3.splitrelay.internal" in res.output
    assert stat.S_IMODE((d / "transceiver-3.key").stat().st_mode) == 0o600
    res = run(main, ["pki", "issue", "--dir", str(d)])
    assert res.exit_code == 1 and "give exactly one of --transceiver N and --relayd" in res.output
    res = run(main, ["pki", "issue", "--dir", str(tmp_path / "none"), "--relayd"])
    assert res.exit_code == 1 and "run `relayctl pki init` first" in res.output

    key = tmp_path / "token.key"
    key.write_text("ab" * 32)
    key.chmod(0o600)
    res = run(main, ["token", "--key-file", str(key), "--ttl", "60", "--subject", "web"])
    assert res.exit_code == 0
    assert verify_token(bytes.fromhex("ab" * 32), res.output.strip()).subject == "web"
    key.chmod(0o644)
    res = run(main, ["token", "--key-file", str(key)])
    assert res.exit_code == 1 and "mode 0644 lets others read a secret" in res.output


def test_private_keys_are_never_written_through_a_planted_file(tmp_path: Path, monkeypatch) -> None:
    """Someone who can write to the directory plants a symlink where the key's
    temporary file would go: the key must not be written through it."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    key = tmp_path / "pki" / "relayd.key"
    key.parent.mkdir()
    (key.parent / ".relayd.key.tmp").symlink_to(victim)  # the old, predictable name
    pki._write_private(key, b"KEY")
    assert victim.read_text() == "precious"
    assert key.read_bytes() == b"KEY" and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert sorted(p.name for p in key.parent.iterdir()) == [".relayd.key.tmp", "relayd.key"]
    # Even a name guessed right is refused (O_EXCL|O_NOFOLLOW), not followed.
    monkeypatch.setattr(pki.secrets, "token_hex", lambda n: "guessed")
    (key.parent / ".relayd.key.guessed.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        pki._write_private(key, b"NEW")
    assert victim.read_text() == "precious" and key.read_bytes() == b"KEY"
