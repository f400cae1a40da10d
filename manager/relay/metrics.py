"""Prometheus metrics of the relay manager.

Fast-path counters are read from the pinned per-CPU stats map at scrape time
(the kernel counts; nothing is copied on the packet path). Slow-path, call and
transceiver figures come from the running manager's objects.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from manager.protocol.call_record import CallRecord
from manager.relay.kernel.datapath import Datapath
from manager.relay.kernel.structs import stat_labels
from manager.relay.readiness import Readiness
from manager.relay.registry import Registry
from manager.relay.slowpath import SlowPath

# First STUN seen → flow installed in the kernel; set-up is sub-millisecond to
# tens of milliseconds (the owner's answer is the bulk of it).
SETUP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
SWITCH_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class RelayCollector:
    """Reads the relay's state on every scrape: the kernel's counters, the
    slow path's (once it runs), calls and transceivers."""

    def __init__(self, registry: Registry, datapath: Datapath):
        self.registry = registry
        self.datapath = datapath
        self.slowpath: SlowPath | None = None

    def describe(self):
        return []

    def collect(self):
        labels = ["verdict", "reason", "class"]
        pk = CounterMetricFamily("splitrelay_fastpath_packets",
                                 "Packets seen by the XDP program, by verdict and reason", labels=labels)
        by = CounterMetricFamily("splitrelay_fastpath_bytes",
                                 "Bytes seen by the XDP program, by verdict and reason", labels=labels)
        if self.datapath.maps is not None:
            for name, (packets, nbytes) in self.datapath.counters().items():
                labels = list(stat_labels(name))
                pk.add_metric(labels, packets)
                by.add_metric(labels, nbytes)
        yield pk
        yield by
        sp = self.slowpath
        ev = CounterMetricFamily("splitrelay_slowpath_events", "Slow-path events and drops, by kind", labels=["event"])
        spk = CounterMetricFamily("splitrelay_slowpath_packets", "Packets forwarded in userspace", labels=["direction"])
        spb = CounterMetricFamily("splitrelay_slowpath_bytes", "Bytes forwarded in userspace", labels=["direction"])
        legs = GaugeMetricFamily("splitrelay_flows", "Client tuples known to the slow path", labels=["state"])
        queue = GaugeMetricFamily("splitrelay_slowpath_queue_bytes",
                                  "Bytes waiting in the public sockets' receive queues")
        if sp is not None:
            summary = sp.summary()
            for event, n in summary["events"].items():
                ev.add_metric([event], n)
            for direction in ("in", "out"):
                spk.add_metric([direction], summary["packets"][direction])
                spb.add_metric([direction], summary["bytes"][direction])
            for state, n in summary["legs"].items():
                legs.add_metric([state], n)
            queue.add_metric([], summary["queue_bytes"])
        yield ev
        yield spk
        yield spb
        yield legs
        yield queue
        calls = GaugeMetricFamily("splitrelay_calls", "Calls by state", labels=["state"])
        counts: dict[str, int] = {"placing": 0, "active": 0}
        for call in self.registry.calls():
            counts[call.state] = counts.get(call.state, 0) + 1
        for state, n in counts.items():
            calls.add_metric([state], n)
        yield calls
        tx = GaugeMetricFamily("splitrelay_transceivers", "Registered transceivers", labels=["healthy"])
        ts = self.registry.transceivers()
        tx.add_metric(["true"], sum(1 for t in ts if t.healthy))
        tx.add_metric(["false"], sum(1 for t in ts if not t.healthy))
        yield tx


CALL_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
MOS_BUCKETS = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 3.8, 4.0, 4.2, 4.3, 4.4, 4.5)
LOSS_BUCKETS = (0.0, 0.001, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0)
HOPS = ("client_relay", "relay_transceiver", "path")
COMMON_END_REASONS = ("client-hangup", "transceiver-closed", "idle-timeout", "operator", "placement-failed")


class CallMetrics:
    """What each call record says, observed once as it is written (call_journal)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.connect = Histogram("splitrelay_call_connect_seconds", "Offer received to ICE and DTLS connected",
                                 buckets=CALL_BUCKETS, registry=registry)
        self.first_audio = Histogram("splitrelay_call_first_audio_seconds",
                                     "Offer received to the first RTP packet sent to the client",
                                     buckets=CALL_BUCKETS, registry=registry)
        self.mos = Histogram("splitrelay_call_mos", "Lowest E-model MOS estimate of a call, at its end",
                             buckets=MOS_BUCKETS, registry=registry)
        self.gap = Histogram("splitrelay_call_move_gap_seconds", "Media gap of a migration or failover",
                             ["kind"], buckets=SWITCH_BUCKETS, registry=registry)
        self.loss = Histogram("splitrelay_call_loss_ratio", "A call's packet loss over its life, per hop and "
                              "direction", ["hop", "direction"], buckets=LOSS_BUCKETS, registry=registry)
        self.ended = Counter("splitrelay_calls_ended", "Calls ended, by reason", ["reason"], registry=registry)
        # Series exist from the start (a dashboard's query finds them, at zero, before the first end).
        for kind in ("migration", "failover"):
            self.gap.labels(kind)
        for hop in HOPS:
            for direction in ("uplink", "downlink"):
                self.loss.labels(hop, direction)
        for reason in COMMON_END_REASONS:
            self.ended.labels(reason)

    def observe(self, record: CallRecord) -> None:
        self.ended.labels(record.end_reason).inc()
        if record.connect_ms is not None:
            self.connect.observe(record.connect_ms / 1000)
        if record.first_audio_ms is not None:
            self.first_audio.observe(record.first_audio_ms / 1000)
        if record.mos.min is not None:
            self.mos.observe(record.mos.min)
        for move in record.moves:
            if move.gap_ms is not None:
                self.gap.labels(move.kind).observe(move.gap_ms / 1000)
        for hop in HOPS:
            figures = getattr(record, hop)
            for direction in ("uplink", "downlink"):
                loss = getattr(figures, direction).loss_fraction
                if loss is not None:
                    self.loss.labels(hop, direction).observe(loss)


class Metrics:
    """relayd's Prometheus registry: the collector above plus the histograms
    the components observe into (the migrator registers its own here)."""

    def __init__(self, registry: Registry, datapath: Datapath):
        self.prometheus = CollectorRegistry()
        self._collector = RelayCollector(registry, datapath)
        self.prometheus.register(self._collector)
        self.flow_setup = Histogram("splitrelay_flow_setup_seconds",
                                    "First STUN from a client tuple to its kernel entry",
                                    buckets=SETUP_BUCKETS, registry=self.prometheus)
        self.rebind = Histogram("splitrelay_rebind_seconds",
                                "A client's first packet from a new address to its flow moved there",
                                buckets=SETUP_BUCKETS, registry=self.prometheus)
        self.calls = CallMetrics(self.prometheus)

    def watch_slowpath(self, slowpath: SlowPath) -> None:
        """Report this slow path's counters (it is built after the metrics,
        since it observes into flow_setup)."""
        self._collector.slowpath = slowpath

    def render(self) -> bytes:
        return generate_latest(self.prometheus)

    def app(self, readiness: Readiness | None = None) -> web.Application:
        """/metrics, and the probes an orchestrator uses: /livez (the event
        loop answers) and /readyz (every part of `readiness` holds; the body
        names each part, as JSON with ?format=json)."""
        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def livez(request: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        async def readyz(request: web.Request) -> web.Response:
            # In a thread: the XDP check reads netlink through pyroute2, whose
            # synchronous API refuses to run inside a running event loop.
            ready, parts = await asyncio.to_thread(readiness.evaluate) if readiness is not None else (True, [])
            status = 200 if ready else 503
            if request.query.get("format") == "json":
                return web.json_response({"ready": ready, "parts": [p.to_dict() for p in parts]}, status=status)
            return web.Response(status=status, text=Readiness.render_text(parts) or "ok\n")

        app = web.Application()
        app.router.add_get("/metrics", handler)
        app.router.add_get("/livez", livez)
        app.router.add_get("/readyz", readyz)
        return app
