"""Traces from a real relayd and real transceivers (separate processes in a
lab) to an OTLP/HTTP receiver the test runs itself: a call is placed, moved
to the other transceiver and hung up; the spans of both kinds of process
join in one trace per set-up and one per migration."""

from __future__ import annotations

import asyncio
import os
import secrets

import pytest

from manager.lab.lifecycle import lab as lab_ctx
from manager.lab.netns import NetnsExecutor
from manager.lab.services import Services
from manager.relay.control_client import ControlClient
from tests.support.lab_calls import assert_untouched, audio_flowing, run_call
from tests.support.otlp_receiver import ReceivedSpan, start_receiver
from tests.support.waiting import eventually

pytestmark = [pytest.mark.netns]

OTLP_PORT = 4318


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # Batches leave every 200 ms instead of 5 s: the test waits less for them.
    saved = os.environ.get("OTEL_BSP_SCHEDULE_DELAY")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "200"
    with lab_ctx(prefix=f"tr{secrets.token_hex(3)}", transceivers=2) as lab:
        # The receiver listens in the relay's namespace, on its internal
        # address: relayd reaches it there, and so do the transceivers.
        with NetnsExecutor(lab.relay_namespace(1)) as ex:
            receiver = start_receiver(lab.relay_internal(1), OTLP_PORT, make_server=ex.call)
        svc = Services(lab, workdir=tmp_path_factory.mktemp("services"), otlp_endpoint=receiver.url)
        try:
            svc.start()
            yield lab, svc, ControlClient(svc.config["control_socket"]), receiver
        finally:
            svc.stop()
            receiver.stop()
            if saved is None:
                os.environ.pop("OTEL_BSP_SCHEDULE_DELAY", None)
            else:
                os.environ["OTEL_BSP_SCHEDULE_DELAY"] = saved


def one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [(s.service, s.name) for s in spans])
    return found[0]


def test_set_up_and_migration_traces_join_relayd_and_transceivers(env):
    lab, svc, ctl, receiver = env
    moved = {}

    async def migrate(pc, rep):
        await audio_flowing(pc)
        call_id = rep.call_url.rsplit("/", 1)[1]
        call = await asyncio.to_thread(svc.call, call_id)
        target = 2 if call["transceiver_id"] == 1 else 1
        moved.update(call, target=target, res=await asyncio.to_thread(
            ctl.request, "POST", f"/sessions/{call_id}/migrate", {"to": target}))

    rep = run_call(lab, duration=2.0, messages=2, on_connected=migrate)
    assert_untouched(rep)
    assert moved["res"]["outcome"] == "moved", moved["res"]
    conn_id, source, target = moved["conn_id"], moved["transceiver_id"], moved["target"]

    # -- the set-up: offer received → placed → answered → first STUN → installed → connected
    def setup_trace() -> list[ReceivedSpan] | None:
        roots = receiver.matching(lambda s: s.name == "call.setup" and s.attributes.get("conn_id") == conn_id)
        if not roots:
            return None
        spans = receiver.matching(lambda s: s.trace_id == roots[0].trace_id)
        return spans if any(s.name == "transceiver.connect" for s in spans) else None

    spans = eventually(setup_trace, 20, what="the call's set-up trace from relayd and its transceiver")
    root = one(spans, "call.setup")
    assert root.service == "relayd" and root.parent_id == ""
    assert root.attributes["call_id"] == moved["call_id"]
    assert root.attributes["transceiver_id"] == source
    assert root.status != 2
    assert root.events == ["place done", "answer done", "ice done", "install done"]
    phases = [one(spans, n) for n in ("place", "answer", "ice", "install")]
    assert all(p.parent_id == root.span_id and p.service == "relayd" for p in phases)
    served = one(spans, "transceiver POST /calls")
    assert served.service == "splitrelay-transceiver"
    assert served.resource["service.instance.id"] == str(source)
    assert served.parent_id == one(spans, "answer").span_id  # the traceparent crossed the process boundary
    assert served.attributes["transceiver_id"] == source
    connect = one(spans, "transceiver.connect")
    assert connect.parent_id == served.span_id and connect.status != 2
    # Connected after the relay installed the flow: the client's check the
    # owner answered is what installs it; DTLS follows.
    assert connect.end_ns >= one(spans, "install").end_ns

    # -- the migration: freeze → export → import → flip → resume
    def migration_trace() -> list[ReceivedSpan] | None:
        roots = receiver.matching(lambda s: s.name == "call.migrate" and s.attributes.get("conn_id") == conn_id)
        if not roots:
            return None
        spans = receiver.matching(lambda s: s.trace_id == roots[0].trace_id)
        names = {s.name for s in spans}
        return spans if {"transceiver.freeze", "transceiver POST /calls/import"} <= names else None

    spans = eventually(migration_trace, 20, what="the migration's trace from relayd and both transceivers")
    root = one(spans, "call.migrate")
    assert (root.attributes["source_transceiver"], root.attributes["target_transceiver"]) == (source, target)
    assert root.events == ["export done", "import done", "flip done", "resume done"]
    export, imported = one(spans, "export"), one(spans, "import")
    exported_at = one(spans, "transceiver POST /calls/{conn_id}/export")
    assert exported_at.parent_id == export.span_id
    assert exported_at.resource["service.instance.id"] == str(source)
    assert exported_at.attributes["conn_id"] == conn_id
    assert one(spans, "transceiver.freeze").parent_id == exported_at.span_id
    imported_at = one(spans, "transceiver POST /calls/import")
    assert imported_at.parent_id == imported.span_id
    assert imported_at.resource["service.instance.id"] == str(target)
    activated = one(spans, "transceiver POST /calls/{conn_id}/activate")
    assert activated.parent_id == one(spans, "resume").span_id
    # relayd and both transceivers in the one trace.
    assert {s.resource.get("service.instance.id") for s in spans if s.service != "relayd"} == {str(source),
                                                                                             str(target)}
