"""Traces from a real relayd and real transceivers (separate processes in a
lab) to an OTLP/HTTP receiver the test runs itself: a call is placed, moved
to the other transceiver and hung up; the spans of both kinds of process
join in one trace per set-up and one per migration."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
from collections.abc import Iterator

import pytest

from manager.lab.lifecycle import lab as lab_ctx
from manager.lab.model import Lab
from manager.lab.netns import NetnsExecutor
from manager.lab.routing import route_vip, set_relay_links
from manager.lab.services import Services
from manager.relay.control_client import ControlClient
from tests.support.lab_calls import assert_untouched, audio_flowing, migrate_away, run_call, ssrc_published
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan, start_receiver
from tests.support.waiting import eventually, eventually_async

pytestmark = [pytest.mark.netns]

OTLP_PORT = 4318


@contextlib.contextmanager
def traced_lab(prefix: str, workdir, relays: int = 1) -> Iterator[tuple[Lab, Services, OtlpReceiver]]:
    """A lab whose relayd(s) and transceivers send their traces to a receiver
    in the namespace of the last relay, on its internal address: that relayd
    reaches it there, and so do the transceivers (an earlier relay of a fleet
    cannot: its spans are not looked for)."""
    # Batches leave every 200 ms instead of 5 s: the test waits less for them.
    saved = os.environ.get("OTEL_BSP_SCHEDULE_DELAY")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "200"
    try:
        with lab_ctx(prefix=prefix, transceivers=2, relays=relays) as lab:
            with NetnsExecutor(lab.relay_namespace(relays)) as ex:
                receiver = start_receiver(lab.relay_internal(relays), OTLP_PORT, make_server=ex.call)
            svc = Services(lab, workdir=workdir, otlp_endpoint=receiver.url)
            try:
                svc.start()
                yield lab, svc, receiver
            finally:
                svc.stop()
                receiver.stop()
    finally:
        if saved is None:
            os.environ.pop("OTEL_BSP_SCHEDULE_DELAY", None)
        else:
            os.environ["OTEL_BSP_SCHEDULE_DELAY"] = saved


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with traced_lab(f"tr{secrets.token_hex(3)}", tmp_path_factory.mktemp("services")) as (lab, svc, receiver):
        yield lab, svc, ControlClient(svc.config["control_socket"]), receiver


def trace_of(receiver: OtlpReceiver, root: str, conn_id: int, needs: set[str]) -> list[ReceivedSpan] | None:
    """The spans of the trace whose root `root` names call `conn_id`, once
    they include every name in `needs` (spans arrive in batches)."""
    roots = receiver.matching(lambda s: s.name == root and s.attributes.get("conn_id") == conn_id)
    if not roots:
        return None
    spans = receiver.matching(lambda s: s.trace_id == roots[0].trace_id)
    return spans if needs <= {s.name for s in spans} else None


def one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [(s.service, s.name) for s in spans])
    return found[0]


def test_set_up_and_migration_traces_join_relayd_and_transceivers(env):
    lab, svc, ctl, receiver = env
    moved = {}

    async def migrate(pc, rep):
        await audio_flowing(pc)
        call, target, res = await migrate_away(svc, ctl, rep)
        moved.update(call, target=target, res=res)

    rep = run_call(lab, duration=2.0, messages=2, on_connected=migrate)
    assert_untouched(rep)
    assert moved["res"]["outcome"] == "moved", moved["res"]
    conn_id, source, target = moved["conn_id"], moved["transceiver_id"], moved["target"]

    # -- the set-up: offer received → placed → answered → first STUN → installed → connected
    spans = eventually(lambda: trace_of(receiver, "call.setup", conn_id, {"install", "transceiver.connect"}), 20,
                       what="the call's set-up trace from relayd and its transceiver")
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
    needs = {"resume", "transceiver.freeze", "transceiver POST /calls/import",
             "transceiver POST /calls/{conn_id}/activate"}
    spans = eventually(lambda: trace_of(receiver, "call.migrate", conn_id, needs), 20,
                       what="the migration's trace from relayd and both transceivers")
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


def test_failover_trace_joins_the_new_relay_and_the_owner(tmp_path_factory):
    """Relay 1 dies mid-call and the VIP moves to relay 2, which takes the
    client over (by its media or by its next check): relay 2's
    ``call.failover`` trace holds the owner's span of the request that moved
    the call's replies."""
    with traced_lab(f"tf{secrets.token_hex(3)}", tmp_path_factory.mktemp("fleet"), relays=2) as (lab, svc, receiver):
        route_vip(lab, 1)
        seen = {}

        async def fail(pc, rep):
            await ssrc_published(svc)
            seen["call"] = await asyncio.to_thread(svc.call, rep.call_url.rsplit("/", 1)[1])
            await asyncio.to_thread(svc.stop_one, "relayd", signal.SIGKILL)
            await asyncio.to_thread(set_relay_links, lab, 1, False)
            await asyncio.to_thread(route_vip, lab, 2)
            seen["trace"] = await eventually_async(
                lambda: failover_trace(receiver, seen["call"]["conn_id"]), 15,
                what="relay 2's failover trace with the owner's span")

        rep = run_call(lab, duration=2.0, messages=2, on_connected=fail)
        assert_untouched(rep)

    spans = seen["trace"]
    root = one(spans, "call.failover")
    assert root.service == "relayd" and root.resource["service.instance.id"] == "relay2"
    assert root.status != 2, root
    owner = str(seen["call"]["transceiver_id"])
    (served,) = [s for s in spans if s.service == "splitrelay-transceiver"]
    assert served.resource["service.instance.id"] == owner
    phase = one(spans, "check" if root.attributes["via"] == "media" else "repoint")
    assert served.parent_id == phase.span_id and phase.parent_id == root.span_id
    assert served.name in ("transceiver POST /calls/{conn_id}/media-check", "transceiver POST /calls/{conn_id}/path")
    print(f"\nfailover traced via {root.attributes['via']}: {[s.name for s in spans]}")


async def failover_trace(receiver: OtlpReceiver, conn_id: int) -> list[ReceivedSpan] | None:
    roots = receiver.matching(lambda s: s.name == "call.failover" and s.attributes.get("conn_id") == conn_id)
    for root in roots:
        spans = receiver.matching(lambda s, t=root.trace_id: s.trace_id == t)
        if any(s.service == "splitrelay-transceiver" for s in spans):
            return spans
    return None
