"""The one log format: JSON lines with the call, text with the call, repeats limited."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys

import pytest

from manager.observability.logs import (
    JsonFormatter,
    RepeatLimiter,
    TextFormatter,
    bind_call,
    call_context,
    configure,
)
from tests.support.paths import REPO


@pytest.fixture
def captured():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()

    def use(fmt: str, **kw) -> io.StringIO:
        configure("svc", fmt, "DEBUG", stream=stream, **kw)
        return stream

    yield use
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])


def lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line]


def test_json_line_carries_the_bound_call_and_extras(captured):
    out = captured("json")
    log = logging.getLogger("splitrelay.test")
    with call_context(call_id="c1", conn_id=42):
        log.info("placed on transceiver %d", 3, extra={"transceiver": 3})
    log.warning("no call here")
    first, second = (json.loads(line) for line in lines(out))
    assert first["msg"] == "placed on transceiver 3"
    assert (first["call_id"], first["conn_id"], first["transceiver"]) == ("c1", 42, 3)
    assert (first["level"], first["service"], first["logger"]) == ("info", "svc", "splitrelay.test")
    assert "call_id" not in second and second["level"] == "warning"


def test_extra_names_the_call_without_a_context(captured):
    out = captured("json")
    logging.getLogger("t").info("x", extra={"call_id": "c9", "conn_id": 7})
    line = json.loads(lines(out)[0])
    assert (line["call_id"], line["conn_id"]) == ("c9", 7)


def test_tasks_started_inside_a_call_context_carry_it(captured):
    out = captured("json")

    async def serve_call() -> None:
        bind_call(call_id="c2", conn_id=5)
        await asyncio.create_task(child())

    async def child() -> None:
        logging.getLogger("t").info("from a task")

    async def main() -> None:
        await asyncio.create_task(serve_call())  # a task per call, as the services run them
        logging.getLogger("t").info("outside")  # the task's binding does not leak out

    asyncio.run(main())
    inside, outside = (line for line in map(json.loads, lines(out)) if line["logger"] == "t")
    assert inside["call_id"] == "c2" and "call_id" not in outside


def test_traceback_is_one_json_field(captured):
    out = captured("json")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("t").exception("failed")
    (line,) = lines(out)
    assert "RuntimeError: boom" in json.loads(line)["exc"]


def test_text_format_names_the_call(captured):
    out = captured("text")
    with call_context(call_id="abc", conn_id=1):
        logging.getLogger("t").info("hello")
    (line,) = lines(out)
    assert line.endswith("svc INFO [call=abc conn=1] hello")


def test_repeats_are_limited_per_call_and_counted():
    now = [0.0]
    limiter = RepeatLimiter(burst=3, window_s=10.0, clock=lambda: now[0])

    def rec(msg: str, call: str) -> logging.LogRecord:
        r = logging.LogRecord("t", logging.INFO, __file__, 1, msg, ("x",), None)
        r.call_id = call
        return r

    passed = [limiter.filter(rec("refused %s", "a")) for _ in range(100)]
    assert passed.count(True) == 3
    assert limiter.filter(rec("refused %s", "b"))  # another call's line has its own budget
    now[0] = 10.0
    again = rec("refused %s", "a")
    assert limiter.filter(again) and again.repeats_dropped == 97


def test_limiter_bounds_its_memory():
    limiter = RepeatLimiter(burst=1, window_s=10.0, clock=lambda: 0.0, max_keys=16)
    for i in range(1000):
        limiter.filter(logging.LogRecord("t", logging.INFO, __file__, 1, f"line {i}", (), None))
    assert len(limiter._seen) <= 16


def test_formatters_survive_values_json_cannot_hold():
    r = logging.LogRecord("t", logging.INFO, __file__, 1, "m", (), None)
    r.addr = ("10.0.0.1", 3478)
    r.obj = object()
    line = json.loads(JsonFormatter("s").format(r))
    assert line["addr"] == ["10.0.0.1", 3478] and line["obj"].startswith("<object")
    assert TextFormatter("s").format(r).endswith("s INFO m")


def test_bad_format_is_a_clear_error():
    with pytest.raises(ValueError, match="log format must be one of text, json"):
        configure("s", "xml")


@pytest.mark.parametrize("argv", [["-m", "cli.relayd", "--log-format", "xml"],
                                  ["-m", "manager.transceiver", "--id", "1", "--log-format", "xml"]])
def test_clis_refuse_an_unknown_format(argv):
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2
    assert "xml" in proc.stderr and "Traceback" not in proc.stderr
