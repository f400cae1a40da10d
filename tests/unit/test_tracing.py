"""Traces (manager.observability.tracing) through the SDK's in-memory exporter:
a call placed by relayd's signaling API on a real transceiver's control API,
the span tree and its attributes, the W3C context between the two, and that
tracing off costs not even a header."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from pydantic import ValidationError

from manager.observability import tracing
from manager.relay.config import TelemetryConfig
from manager.relay.registry import Transceiver as Registered
from manager.relay.transceiver_client import TransceiverClient
from manager.transceiver.__main__ import build_parser
from manager.transceiver.control import create_app
from manager.transceiver.transceiver import Transceiver
from tests.support.otlp_receiver import start_receiver
from tests.support.signaling import SDP, relay, run
from tests.support.waiting import eventually


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    yield exporter
    tracing.use_provider(None)


def by_name(exporter: InMemorySpanExporter) -> dict:
    return {s.name: s for s in exporter.get_finished_spans()}


def child_of(span, parent) -> bool:
    return span.parent is not None and span.parent.span_id == parent.context.span_id


async def _real_transceiver(env, tid: int = 1):
    """A real transceiver's control API, registered with the relay in place of stand-in `tid`."""
    tx = Transceiver(tid, capacity=4)
    await tx.start()
    server = TestServer(create_app(tx), host="127.0.0.1")
    await server.start_server()
    env.registry.register_transceiver(tid, str(server.make_url("")).rstrip("/"), 4)
    return tx, server


def test_call_setup_spans_join_relay_and_transceiver(spans) -> None:
    async def scenario() -> None:
        async with relay(transceivers=1) as env:
            tx, server = await _real_transceiver(env)
            try:
                _, resp = await env.place()
                assert resp.status == 201, await resp.text()
                call = env.registry.calls()[0]
                done = by_name(spans)
                # The relay's root is still open: the client's checks have not come.
                assert set(done) == {"place", "answer", "transceiver POST /calls"}, set(done)
                # What the slow path reports (manager.relay.slowpath): first STUN, installed.
                tracing.advance("setup", call.conn_id, "install")
                tracing.advance("setup", call.conn_id, "install")  # a second check: nothing new
                tracing.advance("setup", call.conn_id, None)
                resp = await env.http.delete(resp.headers["Location"])
                assert resp.status == 204
            finally:
                await server.close()
                await tx.stop()

            done = by_name(spans)
            root = done["call.setup"]
            assert root.parent is None
            assert root.attributes["call_id"] == call.call_id
            assert root.attributes["conn_id"] == call.conn_id
            assert root.attributes["transceiver_id"] == 1
            assert root.status.status_code == StatusCode.UNSET
            assert [e.name for e in root.events] == ["place done", "answer done", "ice done", "install done"]
            phases = [done[n] for n in ("place", "answer", "ice", "install")]
            assert all(child_of(p, root) for p in phases)
            # One after the other: each phase ends where the next begins.
            assert all(a.end_time == b.start_time for a, b in zip(phases, phases[1:], strict=False))
            assert phases[-1].end_time == root.end_time

            served = done["transceiver POST /calls"]
            assert child_of(served, done["answer"])  # joined by the traceparent header
            assert served.attributes["transceiver_id"] == 1
            assert served.attributes["http.response.status_code"] == 201
            connect = done["transceiver.connect"]
            assert child_of(connect, served)
            assert connect.attributes["conn_id"] == call.conn_id
            # The call was hung up before ICE could connect (the client's
            # checks go to the relay's public address, not here).
            assert connect.status.status_code == StatusCode.ERROR
            assert {s.context.trace_id for s in done.values()} == {root.context.trace_id}

    run(scenario)


def test_refused_offer_ends_its_trace_failed(spans) -> None:
    async def scenario() -> None:
        async with relay(transceivers=1) as env:
            resp = await env.http.post("/v1/calls", data="v=0\r\n", headers=SDP)
            assert resp.status == 400
        root = by_name(spans)["call.setup"]
        assert root.status.status_code == StatusCode.ERROR
        assert root.status.description.startswith("refused: 400 bad offer")
        assert by_name(spans)["place"].status.status_code == StatusCode.ERROR

    run(scenario)


def test_call_ended_before_install_ends_its_trace(spans) -> None:
    async def scenario() -> None:
        async with relay(transceivers=1) as env:
            _, resp = await env.place()
            assert resp.status == 201
            call = env.registry.calls()[0]
            env.registry.end_call(call.conn_id, "client-hangup")
            tracing.advance("setup", call.conn_id, "install")  # too late: nothing held any more
        done = by_name(spans)
        assert done["call.setup"].status.description == "client-hangup"
        assert done["ice"].status.status_code == StatusCode.ERROR
        assert "install" not in done

    run(scenario)


def test_phases_of_a_migration_and_its_failure(spans) -> None:
    ok = tracing.begin("call.migrate", call_id="c1", conn_id=7, source_transceiver=1, target_transceiver=2)
    for name in ("export", "import", "flip", "resume"):
        with ok.phase(name):
            pass
    ok.end()
    ok.end("late")  # ended once
    failed = tracing.begin("call.migrate", conn_id=8)
    with failed.phase("export"):
        pass
    failed.end("transceiver 1 refused the export")
    finished = spans.get_finished_spans()
    roots = [s for s in finished if s.name == "call.migrate"]
    assert [r.attributes["conn_id"] for r in roots] == [7, 8]
    assert roots[0].status.status_code == StatusCode.UNSET
    assert [e.name for e in roots[0].events] == [f"{n} done" for n in ("export", "import", "flip", "resume")]
    assert {s.name for s in finished if child_of(s, roots[0])} == {"export", "import", "flip", "resume"}
    assert roots[1].status.description == "transceiver 1 refused the export"
    (export,) = [s for s in finished if child_of(s, roots[1])]
    assert export.status.status_code == StatusCode.ERROR


def test_held_traces_are_bounded(spans, monkeypatch) -> None:
    monkeypatch.setattr(tracing, "MAX_OPEN", 3)
    for conn_id in range(5):
        tracing.begin("call.setup", "ice", conn_id=conn_id).keep("setup", conn_id)
    abandoned = [s for s in spans.get_finished_spans() if s.name == "call.setup"]
    assert [s.attributes["conn_id"] for s in abandoned] == [0, 1]
    assert {s.status.description for s in abandoned} == {"abandoned"}
    assert len(tracing._open) == 3


async def _headers_seen(client: TransceiverClient) -> list[dict]:
    seen: list[dict] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/calls/{conn_id}/unfreeze", record)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        target = Registered(id=1, control_url=str(server.make_url("")).rstrip("/"), capacity=1)
        trace = tracing.begin("call.migrate", conn_id=1)
        with trace.phase("export"):
            await client.call_op(target, "POST", "/calls/1/unfreeze")
        await client.call_op(target, "POST", "/calls/1/unfreeze")  # outside any phase
        trace.end()
    finally:
        await client.close()
        await server.close()
    return seen


def test_requests_in_a_phase_carry_its_context(spans) -> None:
    seen = asyncio.run(_headers_seen(TransceiverClient()))
    export = by_name(spans)["export"]
    version, trace_id, span_id, flags = seen[0]["traceparent"].split("-")
    assert (int(trace_id, 16), int(span_id, 16)) == (export.context.trace_id, export.context.span_id)
    assert "traceparent" not in seen[1]


def test_off_costs_no_header_and_no_middleware() -> None:
    assert not tracing.enabled()
    seen = asyncio.run(_headers_seen(TransceiverClient()))
    assert all("traceparent" not in h for h in seen)
    assert tracing.begin("call.setup", "place") is tracing.OFF

    async def middlewares() -> int:
        async with Transceiver(1, capacity=1) as tx:
            return len(create_app(tx).middlewares)

    assert asyncio.run(middlewares()) == 1  # the error middleware alone


@pytest.mark.parametrize("bad", ["collector:4318", "ftp://collector", "http://", "http://collector:99999"])
def test_bad_endpoints_are_refused_clearly(bad: str, capsys) -> None:
    with pytest.raises(ValidationError, match="otlp_endpoint"):
        TelemetryConfig(otlp_endpoint=bad)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--id", "1", "--otlp-endpoint", bad])
    assert "OTLP endpoint" in capsys.readouterr().err


def test_configure_exports_by_otlp_http() -> None:
    """The real exporter to a receiver of our own, on loopback."""
    receiver = start_receiver()
    try:
        assert tracing.configure("relayd", receiver.url)
        trace = tracing.begin("call.setup", "place", conn_id=5)
        trace.end()
        tracing.shutdown()  # flushes the batch
        got = eventually(lambda: receiver.matching(lambda s: s.name == "call.setup"), 10,
                         what="the root span at the receiver")
        assert got[0].service == "relayd" and got[0].attributes["conn_id"] == 5
        assert {s.name for s in receiver.spans} == {"call.setup", "place"}
    finally:
        tracing.use_provider(None)
        receiver.stop()
    assert not tracing.configure("relayd", None)
    assert not tracing.enabled()


def test_off_never_loads_opentelemetry() -> None:
    """The modules with tracing calls, and relayctl, import no OpenTelemetry
    module until an endpoint switches tracing on. (relayd's daemon is left
    out: redis-py's own redis.observability imports opentelemetry.)"""
    modules = ["manager.relay.signaling", "manager.relay.migration", "manager.relay.slowpath",
               "manager.relay.config", "manager.transceiver.service", "cli.relayctl"]
    code = (f"import sys, {', '.join(modules)}; "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
