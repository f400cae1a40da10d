"""`relayctl calls`: a live call's figures (from relayd) and the records of
ended calls (from the records file, or in a fleet the Redis stream, read
directly: they can be read while relayd is down)."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime

import click

from cli.relayctl.app import Fail, Target, json_option, main, pass_target
from cli.relayctl.render import emit_json, record_lines, record_row, table
from manager.protocol.call_record import CallRecord
from manager.relay.call_records import RecordStream, read_file
from manager.relay.control_client import ControlError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """Epoch seconds from a duration back from now (``90s``, ``10m``, ``2h``, ``1d``)
    or an ISO 8601 time; ValueError with what is accepted."""
    now = time.time() if now is None else now
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ValueError(f"--since {text!r}: give a duration back from now (30s, 10m, 2h, 1d) "
                         "or an ISO 8601 time (2026-12-05T22:00:00+00:00)") from None


@main.group()
def calls() -> None:
    """Per-call figures: a live call's, and the records of ended calls."""


@calls.command()
@click.argument("call")
@json_option
@pass_target
def show(t: Target, call: str, as_json: bool) -> None:
    """A live call's figures (CALL: its call id or connection id)."""
    try:
        res = t.client().request("GET", f"/calls/{call}")
    except ControlError as exc:
        if exc.status == 404:
            raise Fail(f"unknown call {call!r}: not live on this relay (see `relayctl sessions`; ended calls: "
                       "`relayctl calls records`)") from None
        raise
    if as_json:
        emit_json(res)
        return
    rec = CallRecord.model_validate(res["record"])
    click.echo(f"call {rec.call_id} (conn_id {rec.conn_id}), {res['state']}")
    for line in record_lines(rec):
        click.echo("  " + line)


def _read_stream(cfg, since: float) -> list[CallRecord]:
    """The fleet's stream; Redis (and what redis-py imports) loaded only here."""
    from redis.exceptions import RedisError

    from manager.relay.fleet import redact_text, redact_url

    try:
        return asyncio.run(_read(cfg, since))
    except RedisError as exc:
        raise Fail(f"cannot read the records stream from Redis at {redact_url(cfg.registry.url)}: "
                   f"{redact_text(str(exc), cfg.registry.url)}") from None


async def _read(cfg, since: float) -> list[CallRecord]:
    from manager.relay.fleet import RedisFleet
    from manager.relay.registry import Registry

    fleet = RedisFleet(cfg.registry, Registry())
    client = fleet.new_client()
    try:
        return await RecordStream(client, f"{cfg.registry.key_prefix}:records").read(since)
    finally:
        await client.aclose()


@calls.command()
@click.option("--since", "since_text", default="1h", show_default=True,
              help="Records of calls that ended since: a duration back from now (30s, 10m, 2h, 1d) or an ISO time.")
@click.option("--file", "path", type=click.Path(dir_okay=False), help="Read this records file (default: [records] "
              "path; in a fleet the Redis stream).")
@json_option
@pass_target
def records(t: Target, since_text: str, path: str | None, as_json: bool) -> None:
    """Records of ended calls, oldest first."""
    try:
        since = parse_since(since_text)
    except ValueError as exc:
        raise Fail(str(exc)) from None
    cfg = t.config()
    skipped = [0]
    if path is not None:
        found = read_file(path, since, skipped)
    elif cfg is not None and cfg.registry.backend == "redis" and cfg.records.stream:
        found = _read_stream(cfg, since)
    elif cfg is not None and cfg.records.path is not None:
        found = read_file(cfg.records.path, since, skipped)
    else:
        raise Fail("no records to read: give --file, or a relayd config (--config) with a [records] path")
    if as_json:
        emit_json([r.model_dump(by_alias=True) for r in found])
    elif not found:
        click.echo(f"no call ended since {datetime.fromtimestamp(since).isoformat(timespec='seconds')}")
    else:
        click.echo(table(["ENDED", "CALL_ID", "REASON", "SECONDS", "TX", "MOVES", "MOS_MIN", "LOSS_UP_%",
                          "LOSS_DOWN_%", "RTT_MS", "CONNECT_MS"], [record_row(r) for r in found]))
    if skipped[0]:
        click.echo(f"warning: {skipped[0]} lines were not records and were skipped", err=True)
