"""Log lines that concern a call name it: relayd's signaling (placed, failed,
ended against an unreachable transceiver) and a transceiver's control API,
read back as the JSON lines `--log-format json` writes."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from aiohttp.test_utils import TestClient, TestServer

from manager.observability.logs import JsonFormatter
from manager.transceiver.control import create_app
from manager.transceiver.transceiver import Transceiver
from tests.support.signaling import relay, run


@contextmanager
def json_lines(service: str) -> Iterator[list[dict]]:
    """The JSON lines logged inside the block (INFO and up), parsed."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter(service))
    # Our loggers and aiohttp's access log at INFO; no others (the root's level stays).
    root, ours = logging.getLogger(), [logging.getLogger(n) for n in ("manager", "aiohttp.access")]
    old_levels = [lg.level for lg in ours]
    root.addHandler(handler)
    for lg in ours:
        lg.setLevel(logging.INFO)
    lines: list[dict] = []
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        for lg, level in zip(ours, old_levels, strict=True):
            lg.setLevel(level)
        lines.extend(json.loads(line) for line in buf.getvalue().splitlines())


def test_relayd_lines_about_a_call_carry_its_ids() -> None:
    async def scenario() -> None:
        with json_lines("relayd") as lines:
            async with relay(transceivers=1) as env:
                _, resp = await env.place()
                assert resp.status == 201
                call = env.registry.get_call_by_id(resp.headers["Location"].rsplit("/", 1)[1])
                await env.fakes[0].server.close()  # the transceiver goes away: ending it there fails
                assert (await env.http.delete(resp.headers["Location"])).status == 204
        placed = [line for line in lines if "placed on transceiver" in line["msg"]]
        ending = [line for line in lines if line["msg"].startswith("ending conn_id")]
        assert placed and ending, lines
        for line in placed + ending:
            assert (line["call_id"], line["conn_id"]) == (call.call_id, call.conn_id), line
            assert line["service"] == "relayd" and line["logger"] == "manager.relay.signaling"
        # Lines about no call name none.
        assert all("call_id" not in line for line in lines if "registered at" in line["msg"])

    run(scenario)


def test_relayd_placement_failure_names_the_call() -> None:
    async def scenario() -> None:
        with json_lines("relayd") as lines:
            async with relay(transceivers=1, timeout=2.0) as env:
                env.fakes[0].mode = "wrong-ufrag"
                _, resp = await env.place()
                assert resp.status == 502
                (request,) = env.fakes[0].created
        (line,) = [ln for ln in lines if ln["msg"].startswith("placing conn_id")]
        assert line["conn_id"] == request["conn_id"] and len(line["call_id"]) == 32 and line["level"] == "warning"

    run(scenario)


def test_transceiver_lines_about_a_call_carry_its_conn_id() -> None:
    async def scenario() -> None:
        with json_lines("transceiver") as lines:
            async with Transceiver(1, capacity=2) as tx:
                http = TestClient(TestServer(create_app(tx)))
                await http.start_server()
                try:
                    resp = await http.post("/calls", json={"conn_id": 77, "ufrag": "AAAAbbbbCCCC",
                                                           "offer": "v=0\r\nnot an offer\r\n"})
                    assert resp.status == 400
                    assert (await http.delete("/calls/78")).status == 404
                finally:
                    await http.close()
        refused = [ln for ln in lines if ln.get("conn_id") in (77, 78)]
        assert {ln["conn_id"] for ln in refused} == {77, 78}, lines
        assert all(ln["service"] == "transceiver" for ln in refused)

    run(scenario)
