"""Call records: the schema round-trips, the file rotates and reads back, bad lines are skipped."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from manager.protocol.call_record import CallRecord, Move, anonymise
from manager.relay.call_records import RecordFile, parse_lines, read_file


def record(i: int, ended: float = 1000.0) -> CallRecord:
    return CallRecord(call_id=f"call-{i}", conn_id=i, created_at=ended - 10, connected_at=ended - 9.5,
                      ended_at=ended, end_reason="client-closed",
                      moves=[Move(kind="migration", at=ended - 5, from_transceiver=1, to_transceiver=2, gap_ms=0.0)])


def test_record_round_trips_through_json():
    r = record(1)
    r.client_relay.uplink.lost = 3
    r.mos.min = 3.9
    text = r.to_json()
    assert json.loads(text)["schema"] == 1
    assert CallRecord.from_json(text) == r


def test_record_refuses_unknown_fields_and_missing_ones():
    with pytest.raises(ValidationError):
        CallRecord.model_validate({"call_id": "x", "created_at": 1, "ended_at": 2, "end_reason": "x", "bogus": 1})
    with pytest.raises(ValidationError):
        CallRecord.model_validate({"call_id": "x"})


@pytest.mark.parametrize("address, mode, expected", [
    ("192.0.2.77", "full", "192.0.2.77"),
    ("192.0.2.77", "prefix", "192.0.2.0/24"),
    ("2001:db8:1:2::5", "prefix", "2001:db8:1::/48"),
    ("192.0.2.77", "none", None),
    (None, "full", None),
])
def test_anonymise(address, mode, expected):
    assert anonymise(address, mode) == expected


def test_file_rotates_and_reads_back_in_order(tmp_path):
    path = tmp_path / "records" / "calls.jsonl"
    f = RecordFile(path, max_bytes=2000, backups=50)
    for i in range(40):
        f.write(record(i, ended=1000.0 + i))
    f.close()
    assert len(list(path.parent.glob("calls.jsonl.*"))) >= 2  # rotated
    got = read_file(path)
    assert [r.call_id for r in got] == [f"call-{i}" for i in range(40)]
    assert [r.call_id for r in read_file(path, since=1035.0)] == [f"call-{i}" for i in range(35, 40)]


def test_rotation_keeps_at_most_backups_files(tmp_path):
    path = tmp_path / "calls.jsonl"
    f = RecordFile(path, max_bytes=500, backups=2)
    for i in range(50):
        f.write(record(i))
    f.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calls.jsonl", "calls.jsonl.1", "calls.jsonl.2"]


def test_bad_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "calls.jsonl"
    path.write_text(record(1).to_json() + "\nnot json\n{\"call_id\": 5}\n\n" + record(2, 1001).to_json() + "\n")
    skipped = [0]
    assert [r.call_id for r in read_file(path, skipped=skipped)] == ["call-1", "call-2"]
    assert skipped == [2]
    assert list(parse_lines([b"\xff\xfe"], skipped)) == [] and skipped == [3]
