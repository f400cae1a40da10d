"""relayctl's command group: where relayd and its maps are (Target), and the
operator-facing errors turned into one line and exit status 1. The commands
are in the sibling modules by what they reach (calls, maps, keys, lab)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from manager.protocol.api import one_line
from manager.relay.config import ConfigError, DatapathConfig, RelaydConfig, SlowPathConfig, load_config
from manager.relay.control_client import ControlClient, ControlError


class Fail(click.ClickException):
    """A user-facing failure: one line on stderr, exit status 1."""

    def show(self, file=None) -> None:
        click.echo(f"relayctl: {self.format_message()}", err=True)


def _known_errors() -> tuple[type[BaseException], ...]:
    from manager.lab.netns import LabError
    from manager.lab.services import ServicesError
    from manager.relay.kernel.datapath import DatapathError

    return (ControlError, ConfigError, DatapathError, LabError, ServicesError, OSError)


class _Group(click.Group):
    """Turns the manager's operator-facing errors into one line + exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            msg = "; ".join(str(exc).splitlines())
            path = ctx.obj.config_path if isinstance(ctx.obj, Target) else None
            if path and not msg.startswith(str(path)):
                msg = f"{path}: {msg}"
            raise Fail(f"invalid configuration: {msg}") from None
        except _known_errors() as exc:
            raise Fail(one_line(exc, limit=1000) or type(exc).__name__) from None


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise Fail(f"{what} needs root: run relayctl as root")


@dataclass
class Target:
    """Resolved lazily: `lab` and `demo` need no relayd configuration at all."""

    config_path: str | None
    lab: str | None
    pin_dir_opt: str | None
    socket_opt: str | None
    _cfg: RelaydConfig | None = field(default=None, repr=False)
    _loaded: bool = False

    def config(self) -> RelaydConfig | None:
        if not self._loaded:
            path = self.config_path
            if self.lab and not path:
                from manager.lab.model import Lab

                Lab.plan(self.lab, 1)  # validates the prefix: it names a path
                from manager.lab.manage import lab_workdir

                path = self.config_path = str(lab_workdir(self.lab) / "relayd.toml")
                if not Path(path).exists():
                    raise Fail(f"no relayd config for lab {self.lab!r} at {path} (started with `relayctl lab up`?)")
            self._cfg = load_config(path) if path else None
            self._loaded = True
        return self._cfg

    @property
    def socket(self) -> Path:
        if self.socket_opt:
            return Path(self.socket_opt)
        cfg = self.config()
        return Path(cfg.control_socket) if cfg else RelaydConfig.model_fields["control_socket"].default

    @property
    def pin_dir(self) -> Path:
        if self.pin_dir_opt:
            return Path(self.pin_dir_opt)
        cfg = self.config()
        return Path(cfg.datapath.pin_dir) if cfg else DatapathConfig.model_fields["pin_dir"].default

    @property
    def idle_timeout(self) -> float:
        cfg = self.config()
        return cfg.slowpath.idle_timeout if cfg else SlowPathConfig().idle_timeout

    def client(self) -> ControlClient:
        return ControlClient(self.socket)

    def datapath(self):
        """The pinned maps, opened read/write without loading anything."""
        from pydantic import ValidationError

        from manager.relay.kernel.datapath import Datapath

        need_root("reading the pinned maps")
        try:
            dcfg = DatapathConfig(pin_dir=self.pin_dir)
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise Fail(f"pin dir {self.pin_dir}: {reason}") from None
        dp = Datapath(dcfg)
        dp.open_maps()
        return dp


pass_target = click.make_pass_decorator(Target)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable keys).")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, readable=False),
              envvar="SPLITRELAY_CONFIG",
              help="relayd's config file: where its pinned maps and control socket are.")
@click.option("--lab", "lab", metavar="PREFIX", help="Use the relayd of a lab started by `relayctl lab up`.")
@click.option("--pin-dir", type=click.Path(file_okay=False, readable=False), help="bpffs directory of the pinned maps.")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False, readable=False),
              help="relayd's control socket.")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, lab: str | None, pin_dir: str | None,
         socket_path: str | None) -> None:
    """Inspect and operate the splitrelay relay (relayd and its XDP fast path)."""
    ctx.obj = Target(config_path, lab, pin_dir, socket_path)
