"""Every metric the Grafana dashboard queries is one relayd's Prometheus registry
exports (read from the registry itself, before any call: the call metrics'
series exist from the start), and a call record is observed into them."""

from __future__ import annotations

import json
import re

from prometheus_client import generate_latest

from manager.protocol.call_record import CallRecord, Move
from manager.relay.config import DatapathConfig
from manager.relay.kernel.datapath import Datapath
from manager.relay.metrics import Metrics
from manager.relay.migration import Migrator
from manager.relay.registry import Registry
from tests.support.paths import REPO

DASHBOARD = REPO / "docs" / "grafana-dashboard.json"


def exported_names(metrics: Metrics) -> set[str]:
    """Every series name the registry exports, whether or not it has a sample yet
    (the kernel's counters have none without maps: a counter's series is its name + _total)."""
    names = set()
    for family in metrics.prometheus.collect():
        names |= {s.name for s in family.samples}
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def relay_metrics() -> Metrics:
    registry = Registry()
    metrics = Metrics(registry, Datapath(DatapathConfig()))
    # The migrator registers its own metrics into relayd's registry.
    Migrator(registry, None, None, None, metrics_registry=metrics.prometheus)  # type: ignore[arg-type]
    return metrics


def test_every_dashboard_query_names_an_exported_metric():
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"]] + [q for p in dash["panels"] for q in p.get("panels", [])]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    referenced = {m for e in exprs for m in re.findall(r"\bsplitrelay_[a-z0-9_]+", e)}
    exported = exported_names(relay_metrics())
    assert referenced and referenced <= exported, f"not exported: {sorted(referenced - exported)}"
    for needed in ("splitrelay_call_connect_seconds_bucket", "splitrelay_call_first_audio_seconds_bucket",
                   "splitrelay_call_mos_bucket", "splitrelay_call_move_gap_seconds_bucket",
                   "splitrelay_call_loss_ratio_bucket", "splitrelay_calls_ended_total"):
        assert needed in referenced, needed


def test_a_record_is_observed_into_the_call_metrics():
    metrics = relay_metrics()
    rec = CallRecord(call_id="c", created_at=0.0, ended_at=10.0, end_reason="client-hangup", connect_ms=350.0,
                     first_audio_ms=600.0, moves=[Move(kind="migration", at=5.0, gap_ms=20.0)])
    rec.mos.min = 3.9
    rec.path.uplink.loss_fraction = 0.03
    metrics.calls.observe(rec)
    text = generate_latest(metrics.prometheus).decode()
    assert 'splitrelay_calls_ended_total{reason="client-hangup"} 1.0' in text
    assert "splitrelay_call_connect_seconds_count 1.0" in text and "splitrelay_call_mos_sum 3.9" in text
    assert 'splitrelay_call_move_gap_seconds_sum{kind="migration"} 0.02' in text
    assert 'splitrelay_call_loss_ratio_bucket{direction="uplink",hop="path",le="0.03"} 1.0' in text
