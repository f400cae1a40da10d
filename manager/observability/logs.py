"""One log format for relayd and the transceivers, with the call each line concerns.

The standard library's logging does the work; this module adds three parts:

- ``call_context(call_id=..., conn_id=...)`` binds a call to the current
  context (a ``contextvars`` variable, so asyncio tasks started inside carry
  it too). A line may also name its call with ``extra={"call_id": ...}``.
- ``JsonFormatter``: one JSON object a line (``ts``, ``level``, ``service``,
  ``logger``, ``msg``, then ``call_id`` / ``conn_id`` where known, any other
  ``extra`` fields, and ``exc`` for a traceback). ``TextFormatter`` prints the
  same fields as text, the call as ``[call=… conn=…]``.
- ``RepeatLimiter``: a filter that lets a repeated line (same logger, level,
  template and call) through ``burst`` times per ``window_s``, then drops the
  rest and says how many it dropped with the next one let through. A flood
  of refusals therefore costs a few lines, not thousands.

``configure(service, fmt, level)`` installs them on the root logger.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

FORMATS = ("text", "json")
CALL_FIELDS = ("call_id", "conn_id")

_call: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("splitrelay_call", default=None)

# Attributes every LogRecord has: anything else on a record came in through ``extra``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


@contextlib.contextmanager
def call_context(**fields: Any) -> Iterator[None]:
    """Name the call (``call_id``, ``conn_id``) of every line logged inside, tasks included."""
    merged = dict(_call.get() or {})
    merged.update({k: v for k, v in fields.items() if v is not None})
    token = _call.set(merged)
    try:
        yield
    finally:
        _call.reset(token)


def bind_call(**fields: Any) -> None:
    """Name the call for the rest of the current context (a task that serves one call)."""
    merged = dict(_call.get() or {})
    merged.update({k: v for k, v in fields.items() if v is not None})
    _call.set(merged)


def _call_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = dict(_call.get() or {})
    for name in CALL_FIELDS:
        value = getattr(record, name, None)
        if value is not None:
            fields[name] = value
    return {k: fields[k] for k in CALL_FIELDS if k in fields}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items()
            if k not in _STANDARD and k not in CALL_FIELDS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object a line; values that JSON cannot hold are written as their ``str``."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_call_fields(record))
        line.update(_extras(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """The plain format: time, service, level, the call if known, the message."""

    def __init__(self, service: str) -> None:
        super().__init__("%(asctime)s %(service)s %(levelname)s %(call)s%(message)s")
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        record.service = self.service
        call = _call_fields(record)
        record.call = ("[" + " ".join(f"{k.split('_')[0]}={v}" for k, v in call.items()) + "] ") if call else ""
        try:
            text = super().format(record)
        finally:
            del record.service, record.call
        dropped = getattr(record, "repeats_dropped", 0)
        return f"{text} (+{dropped} repeats of this line dropped)" if dropped else text


class RepeatLimiter(logging.Filter):
    """Let a repeated line through ``burst`` times a window, then count the rest."""

    def __init__(self, burst: int = 10, window_s: float = 10.0, clock=time.monotonic, max_keys: int = 4096) -> None:
        super().__init__()
        self.burst, self.window_s, self.clock, self.max_keys = burst, window_s, clock, max_keys
        self._seen: dict[tuple, list[float | int]] = {}  # key -> [window start, passed, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        call = _call_fields(record)
        key = (record.name, record.levelno, record.msg if isinstance(record.msg, str) else repr(record.msg),
               call.get("call_id"), call.get("conn_id"))
        now = self.clock()
        slot = self._seen.get(key)
        if slot is None or now - slot[0] >= self.window_s:
            dropped = int(slot[2]) if slot else 0
            if len(self._seen) >= self.max_keys:
                self._seen.clear()  # bounded memory: forgetting only lets a few extra lines through
            self._seen[key] = [now, 1, 0]
            if dropped:
                record.repeats_dropped = dropped
            return True
        if slot[1] < self.burst:
            slot[1] += 1
            return True
        slot[2] += 1
        return False


def configure(service: str, fmt: str = "text", level: str | int = "INFO", stream: TextIO | None = None,
              burst: int = 10, window_s: float = 10.0) -> logging.Handler:
    """Install the format and the repeat limit on the root logger; return the handler."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter(service))
    handler.addFilter(RepeatLimiter(burst=burst, window_s=window_s))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
