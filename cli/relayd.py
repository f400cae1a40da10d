"""relayd: run the relay manager (click over manager.daemon.run)."""

from __future__ import annotations

import asyncio
import os
import sys

import click

from manager.observability.logs import FORMATS
from manager.observability.logs import configure as configure_logs
from manager.pki import PkiError
from manager.relay.config import ConfigError, load_config
from manager.relay.kernel.datapath import DatapathError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), envvar="SPLITRELAY_CONFIG",
              help="TOML or YAML config file (SPLITRELAY__SECTION__FIELD variables override it).")
@click.option("--detach-on-exit/--keep-on-exit", default=None,
              help="On stop, remove the XDP fast path, or leave it forwarding established calls (default).")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", default="text", envvar="SPLITRELAY_LOG_FORMAT", type=click.Choice(list(FORMATS)),
              help="text, or json: one object a line with call_id/conn_id where a line concerns a call.")
def main(config_path: str | None, detach_on_exit: bool | None, log_level: str, log_format: str) -> None:
    """Run the splitrelay relay manager until SIGTERM/SIGINT; SIGHUP reloads the config file."""
    configure_logs("relayd", log_format, log_level)
    # The config is checked first: a mistake in it is named whoever runs this.
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(f"invalid configuration:\n{exc}") from None
    if os.geteuid() != 0:
        raise click.ClickException("relayd must run as root (it loads XDP programs)")
    if detach_on_exit is not None:
        cfg.detach_on_exit = detach_on_exit
    from manager.relay.daemon import run

    try:
        asyncio.run(run(cfg, config_path=config_path))
    except (DatapathError, PkiError, OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
