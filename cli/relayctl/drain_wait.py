"""`relayctl drain N --wait`: a drain with a deadline (manager.relay.drain),
followed until the transceiver holds no call or the deadline has passed."""

from __future__ import annotations

import time

import click

from cli.relayctl.app import Fail, Target
from cli.relayctl.render import emit_json, migration_line

POLL = 0.25  # pacing of the progress requests


def progress_line(p: dict) -> str:
    return (f"{p['elapsed_s']:5.1f} s: {p['moved']} moved, {p['calls_left']} left"
            + (f", {p['failed_attempts']} failed attempts" if p["failed_attempts"] else "")
            + (f", {p['remaining_s']:.1f} s to the deadline" if p["state"] == "draining" else ""))


def summary(p: dict) -> str:
    if p["state"] == "drained":
        return f"transceiver {p['transceiver']} drained in {p['elapsed_s']:.1f} s: {p['moved']} calls moved"
    return (f"transceiver {p['transceiver']}: drain deadline ({p['deadline_s']:g} s) reached; {p['moved']} calls "
            f"moved, {p['ended_at_deadline']} ended with reason drain-deadline"
            + (f" ({p['problem']})" if p["problem"] else ""))


def wait_for_drain(t: Target, transceiver_id: int, deadline_s: float, as_json: bool) -> None:
    client = t.client()
    p = client.request("POST", "/drains", {"transceiver": transceiver_id, "deadline_s": deadline_s})
    shown = None
    while p["state"] == "draining":
        line = progress_line(p)
        if not as_json and line.split(":", 1)[1] != shown:  # one line per change, not per poll
            click.echo(line)
            shown = line.split(":", 1)[1]
        time.sleep(POLL)
        p = client.request("GET", f"/drains/{transceiver_id}")
    if as_json:
        emit_json(p)
    else:
        for r in p["results"]:
            click.echo("  " + migration_line(r))
        click.echo(summary(p))
    if p["ended_at_deadline"]:
        raise Fail(f"{p['ended_at_deadline']} calls could not move before the deadline")
