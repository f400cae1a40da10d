"""Keys and credentials: the private CA for mutual TLS (`pki`) and
short-lived client tokens (`token`)."""

from __future__ import annotations

from pathlib import Path

import click

from cli.relayctl.app import Fail, Target, json_option, main, pass_target
from cli.relayctl.render import emit_json

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
    from manager.pki import read_secret_file
    from manager.protocol.client_auth import mint_token

    if key_file is None:
        cfg = t.config()
        if cfg is None or cfg.client_auth.token_key_file is None:
            raise Fail("no token key: give --key-file, or a config whose client_auth.token_key_file is set")
        key_file = str(cfg.client_auth.token_key_file)
    try:
        key = bytes.fromhex(read_secret_file(Path(key_file)).decode("ascii", "replace").strip())
        tok = mint_token(key, ttl=ttl, subject=subject)
    except ValueError as exc:
        raise Fail(str(exc) if key_file in str(exc) else f"{key_file}: {exc}") from None
    if as_json:
        emit_json({"token": tok, "ttl_s": ttl, "subject": subject})
    else:
        click.echo(tok)
