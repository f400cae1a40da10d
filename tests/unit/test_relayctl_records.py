"""`relayctl calls records`: reads a records file since a time, as a table or
JSON; a bad --since or nothing to read is one line, never a traceback."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.relayctl import main
from cli.relayctl.records import parse_since
from manager.protocol.call_record import CallRecord, Move
from manager.relay.call_records import RecordFile


def test_since_takes_durations_and_iso_times():
    assert parse_since("10m", now=1000.0) == 400.0
    assert parse_since("1.5h", now=10_000.0) == 10_000.0 - 5400
    assert parse_since("2026-12-05T22:00:00+00:00") == 1796508000.0
    for bad in ("ten minutes", "10y", "", "-5m"):
        with pytest.raises(ValueError, match="duration back from now"):
            parse_since(bad)


def write(path: Path, *ended: float) -> None:
    f = RecordFile(path)
    for i, t in enumerate(ended):
        rec = CallRecord(call_id=f"call{i}", conn_id=i + 1, created_at=t - 30, ended_at=t, end_reason="client-hangup",
                         transceivers=[1, 2], moves=[Move(kind="migration", at=t - 10, gap_ms=12.0)])
        rec.path.uplink.loss_fraction = 0.03
        rec.mos.min = 4.1
        f.write(rec)
    f.close()


def run(*args: str):
    return CliRunner().invoke(main, list(args), env={"SPLITRELAY_CONFIG": None})


def test_records_since_from_a_file(tmp_path: Path):
    path = tmp_path / "records.jsonl"
    now = time.time()
    write(path, now - 3600, now - 60)
    res = run("calls", "records", "--file", str(path), "--since", "10m", "--json")
    assert res.exit_code == 0, res.output
    assert [r["call_id"] for r in json.loads(res.stdout)] == ["call1"]
    res = run("calls", "records", "--file", str(path), "--since", "2h")
    assert res.exit_code == 0 and "call0" in res.stdout and "call1" in res.stdout and "3.00" in res.stdout
    res = run("calls", "records", "--file", str(path), "--since", "10s")
    assert res.exit_code == 0 and res.stdout.startswith("no call ended since")


def test_mistakes_are_one_line(tmp_path: Path):
    res = run("calls", "records", "--file", str(tmp_path / "x"), "--since", "ten minutes")
    assert res.exit_code == 1 and "--since 'ten minutes'" in res.output and "Traceback" not in res.output
    res = run("calls", "records")
    assert res.exit_code == 1 and "no records to read" in res.output
    assert len(res.output.strip().splitlines()) == 1
