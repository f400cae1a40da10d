"""Where call records go: a rotated JSON-lines file, and a capped Redis stream in a fleet.

The file is written through the standard library's ``RotatingFileHandler``
(size-based, ``backups`` old files kept as ``path.1`` … ``path.N``), one
record a line. In a fleet every relay also adds each record to one Redis
stream (``XADD … MAXLEN ~ cap``), so one reader sees the whole fleet.
Readers skip lines they cannot parse and count them; nothing a reader meets
stops it.
"""

from __future__ import annotations

import logging
import logging.handlers
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import ValidationError

from manager.protocol.call_record import CallRecord

log = logging.getLogger(__name__)

STREAM = "splitrelay:records"


class RecordFile:
    """Append records to a JSON-lines file, rotated by size."""

    def __init__(self, path: str | Path, max_bytes: int = 64 << 20, backups: int = 5) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = logging.handlers.RotatingFileHandler(self.path, maxBytes=max_bytes,
                                                             backupCount=backups, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(message)s"))

    def write(self, record: CallRecord) -> None:
        line = logging.LogRecord("splitrelay.records", logging.INFO, "", 0, record.to_json(), None, None)
        self._handler.emit(line)
        self._handler.flush()

    def close(self) -> None:
        self._handler.close()


class RecordStream:
    """Add records to a capped Redis stream (redis.asyncio client)."""

    def __init__(self, client, stream: str = STREAM, cap: int = 100_000) -> None:
        self.client, self.stream, self.cap = client, stream, cap

    async def write(self, record: CallRecord) -> None:
        await self.client.xadd(self.stream, {"record": record.to_json()}, maxlen=self.cap, approximate=True)

    async def read(self, since: float = 0.0, count: int = 10_000) -> list[CallRecord]:
        # Stream ids are milliseconds of the relay's clock when it added the record.
        start = f"{int(since * 1000)}-0" if since else "-"
        entries = await self.client.xrange(self.stream, min=start, max="+", count=count)
        return list(parse_lines(
            (fields.get(b"record") or fields.get("record") or b"") for _id, fields in entries))


def parse_lines(lines: Iterable[str | bytes], skipped: list[int] | None = None) -> Iterator[CallRecord]:
    """Records from JSON lines; a line that is not a record is skipped (and counted in ``skipped``)."""
    for line in lines:
        text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
        if not text.strip():
            continue
        try:
            yield CallRecord.from_json(text)
        except (ValidationError, ValueError):
            if skipped is not None:
                skipped[0] += 1


def read_file(path: str | Path, since: float = 0.0, skipped: list[int] | None = None) -> list[CallRecord]:
    """Records that ended at or after ``since`` (epoch seconds), oldest first, rotated files included."""
    path = Path(path)
    files = sorted(path.parent.glob(path.name + ".*"),
                   key=lambda p: int(p.suffix[1:]) if p.suffix[1:].isdigit() else -1, reverse=True)
    out: list[CallRecord] = []
    for f in [*files, path]:
        if not f.exists() or not (f == path or f.suffix[1:].isdigit()):
            continue
        with f.open("r", encoding="utf-8", errors="replace") as fh:
            out.extend(r for r in parse_lines(fh, skipped) if r.ended_at >= since)
    out.sort(key=lambda r: r.ended_at)
    return out
