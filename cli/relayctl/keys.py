"""Keys and credentials: the private CA for mutual TLS (`pki`), short-lived
client tokens (`token`), and the key rings of the routing-hint and token keys
(`keys`: list, add, sign, retire; docs/operations.md has the rotation)."""

from __future__ import annotations

from pathlib import Path

import click

from cli.relayctl.app import Fail, Target, json_option, main, pass_target
from cli.relayctl.render import emit_json, table, yes

DEFAULT_PKI_DIR = "/etc/splitrelay/pki"


@main.group()
def pki() -> None:
    """The private CA for mutual TLS between relayd and transceivers."""


@pki.command("init")
@click.option("--dir", "pki_dir", type=click.Path(file_okay=False), default=DEFAULT_PKI_DIR, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing CA (every certificate it issued stops working).")
@json_option
def pki_init(pki_dir: str, force: bool, as_json: bool) -> None:
    """Create the CA (ca.pem, ca.key 0600) and relayd's certificate."""
    from manager import pki as pkimod

    existed = (Path(pki_dir) / "ca.pem").exists() and not force
    ca = pkimod.init_ca(pki_dir, force=force)
    relayd = pkimod.issue(pki_dir, pkimod.relayd_name())
    out = {"ca": str(ca), "ca_reused": existed, "relayd_cert": str(relayd.cert), "relayd_key": str(relayd.key)}
    if as_json:
        emit_json(out)
        return
    click.echo(f"CA {'kept' if existed else 'created'}: {ca}")
    click.echo(f"relayd: {relayd.cert} (key {relayd.key}, mode 0600)")


@pki.command("issue")
@click.option("--dir", "pki_dir", type=click.Path(file_okay=False), default=DEFAULT_PKI_DIR, show_default=True)
@click.option("--transceiver", "transceiver_id", type=click.IntRange(1, 65535), default=None,
              help="Issue transceiver N's certificate (its identity: it can register only as N).")
@click.option("--relayd", "for_relayd", is_flag=True, help="Issue relayd's certificate again.")
@json_option
def pki_issue(pki_dir: str, transceiver_id: int | None, for_relayd: bool, as_json: bool) -> None:
    """Issue (or renew) a certificate from the CA in --dir."""
    from manager import pki as pkimod

    if (transceiver_id is None) == (not for_relayd):
        raise Fail("give exactly one of --transceiver N and --relayd")
    name = pkimod.relayd_name() if for_relayd else pkimod.transceiver_name(transceiver_id)
    try:
        paths = pkimod.issue(pki_dir, name)
    except pkimod.PkiError as exc:
        raise Fail(str(exc)) from None
    out = {"name": name, "cert": str(paths.cert), "key": str(paths.key), "ca": str(paths.ca)}
    if as_json:
        emit_json(out)
        return
    click.echo(f"{name}: {paths.cert} (key {paths.key}, mode 0600); trust {paths.ca}")


@main.command()
@click.option("--ttl", type=click.FloatRange(1, 86400), default=300.0, show_default=True,
              help="Seconds the token is valid.")
@click.option("--subject", default="", help="Who the token is for (shown in logs).")
@click.option("--key-file", type=click.Path(dir_okay=False), default=None,
              help="The token key (hex, mode 0600); default: client_auth.token_key_file of the config.")
@json_option
@pass_target
def token(t: Target, ttl: float, subject: str, key_file: str | None, as_json: bool) -> None:
    """Mint a short-lived client token (for `Authorization: Bearer`)."""
    from manager.protocol.client_auth import mint_token

    path = Path(key_file) if key_file is not None else _ring_file(t, "token")
    ring = _read_ring(path, "token")
    tok = mint_token(ring, ttl=ttl, subject=subject)
    if as_json:
        emit_json({"token": tok, "ttl_s": ttl, "subject": subject, "kid": ring.signing_id})
    else:
        click.echo(tok)


# --- key rings: the routing-hint key and the client-token key ---------------------------

KINDS = {"hint": 16, "token": 32}  # kind -> minimum key length (bytes)
kind_argument = click.argument("kind", type=click.Choice(list(KINDS)))
file_option = click.option("--file", "ring_file", type=click.Path(dir_okay=False), default=None,
                           help="The ring's file (mode 0600); default: hint_key_file or client_auth.token_key_file "
                                "of the config.")


def _ring_file(t: Target, kind: str) -> Path:
    cfg = t.config()
    path = None if cfg is None else (cfg.hint_key_file if kind == "hint" else cfg.client_auth.token_key_file)
    if path is None:
        setting = "hint_key_file" if kind == "hint" else "client_auth.token_key_file"
        raise Fail(f"no {kind} key file: give --file, or a config (-c) whose {setting} is set")
    return Path(path)


def _read_ring(path: Path, kind: str):
    from manager.pki import read_secret_file
    from manager.protocol.keyring import parse_ring

    try:
        return parse_ring(read_secret_file(path).decode("ascii", "replace"), min_length=KINDS[kind], what=str(path))
    except ValueError as exc:
        raise Fail(str(exc)) from None


def _write_ring(path: Path, ring) -> None:
    """Replace the file at once (a reader sees the old ring or the new), mode 0600."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:  # mkstemp makes it 0600
            f.write(ring.to_text())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _show(kind: str, path: Path, ring, as_json: bool, done: str | None = None) -> None:
    if as_json:
        emit_json({"kind": kind, "file": str(path), "signing": ring.signing_id, "keys": ring.describe(),
                   **({"done": done} if done else {})})
        return
    if done:
        click.echo(f"{done}; apply it: relayctl reload (or SIGHUP relayd)")
    click.echo(table(["ID", "SIGNS", "FINGERPRINT"], [[k["id"], yes(k["signing"]), k["fingerprint"]]
                                                      for k in ring.describe()]))


@main.group()
def keys() -> None:
    """Key rings of the routing-hint key and the client-token key (rotation).

    The signing key mints, every listed key verifies; relayd takes a changed
    ring on `relayctl reload`, transceivers when the file changes."""


@keys.command("list")
@kind_argument
@file_option
@json_option
@pass_target
def keys_list(t: Target, kind: str, ring_file: str | None, as_json: bool) -> None:
    """The ring's key ids, which signs, and fingerprints (never the keys)."""
    path = Path(ring_file) if ring_file else _ring_file(t, kind)
    _show(kind, path, _read_ring(path, kind), as_json)


@keys.command("add")
@kind_argument
@file_option
@click.option("--sign/--no-sign", default=True, show_default=True,
              help="Make the new key the signing one; --no-sign only adds it to those that verify (a fleet: "
                   "every relay and transceiver first has it, then `keys sign`).")
@json_option
@pass_target
def keys_add(t: Target, kind: str, ring_file: str | None, sign: bool, as_json: bool) -> None:
    """Add a new random key (32 bytes) under the next key id."""
    import secrets

    def done(old, new) -> str:
        added = next(k for k in new.ids if k not in old.ids)
        return f"{kind} key {added} added" + (", signing" if sign else ", verifying only")

    _step(t, kind, ring_file, as_json, lambda ring: ring.added(secrets.token_bytes(32), sign=sign), done)


def _step(t: Target, kind: str, ring_file: str | None, as_json: bool, change, done) -> None:
    """One rotation step on the ring file: read, change (ValueError: refused), write,
    show; done(old ring, new ring) says what was done."""
    path = Path(ring_file) if ring_file else _ring_file(t, kind)
    old = _read_ring(path, kind)
    try:
        new = change(old)
    except ValueError as exc:
        raise Fail(str(exc)) from None
    _write_ring(path, new)
    _show(kind, path, new, as_json, done(old, new))


def _on_key(f):
    """The arguments of a step on one key: KIND KEY_ID [--file] [--json]."""
    for deco in (pass_target, json_option, file_option, click.argument("key_id", type=click.IntRange(0, 255)),
                 kind_argument):
        f = deco(f)
    return f


@keys.command("sign")
@_on_key
def keys_sign(t: Target, kind: str, key_id: int, ring_file: str | None, as_json: bool) -> None:
    """Make key KEY_ID the signing one (the others keep verifying)."""
    _step(t, kind, ring_file, as_json, lambda ring: ring.signing_with(key_id),
          lambda old, new: f"{kind} key {key_id} signs")


@keys.command("retire")
@_on_key
def keys_retire(t: Target, kind: str, key_id: int, ring_file: str | None, as_json: bool) -> None:
    """Remove key KEY_ID: what it signed is refused from the next reload on."""
    _step(t, kind, ring_file, as_json, lambda ring: ring.retired(key_id),
          lambda old, new: f"{kind} key {key_id} retired")
