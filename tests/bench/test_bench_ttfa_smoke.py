"""The time-to-first-audio benchmark measures what it says: each call's
phases are in order and add up to its total, from an aiortc client and from
Chromium, with the transceiver as it was and as it is. Tiny counts; never a
timing."""

from __future__ import annotations

import pytest

from tests.bench import bench_ttfa as bt

# realtime: the first echo is heard against the wall clock.
pytestmark = [pytest.mark.netns, pytest.mark.realtime, pytest.mark.browser]


def test_each_client_reaches_the_first_echo_in_both_labs():
    res = bt.run(2)
    assert set(res["variants"]) == {"before", "after"}
    for r in res["variants"].values():
        assert set(r["clients"]) == {"aiortc", "chromium"}
        for c in r["clients"].values():
            assert c["ok"] == c["calls"] == 2, c["errors"]
            for call in c["per_call"]:
                phases = call["phases_ms"]
                assert all(v >= 0 for v in phases.values()), phases
                assert sum(phases.values()) == pytest.approx(call["total_ms"], abs=0.5)
        assert r["clients"]["aiortc"]["heard_ms"]["p50"] >= 0  # decoded after it arrived
    assert "after aiortc" in bt.table(res)


def test_phases_and_percentiles():
    marks = {"offer": 0.0, "post": 2.0, "answer": 10.0, "ice": 30.0, "dtls": 33.0, "audio": 60.0}
    assert bt.phases(marks) == {"offer_ms": 2.0, "total_ms": 58.0,
                                "phases_ms": {"answer": 8.0, "ice": 20.0, "dtls": 3.0, "audio": 27.0}}
    assert bt.percentiles(list(map(float, range(1, 101)))) == {"p50": 50.5, "p99": 100.0, "max": 100.0}
    assert bt.percentiles([]) == {"p50": None, "p99": None, "max": None}
