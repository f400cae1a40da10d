"""The density benchmark measures what it says: the calls it counts
connected and echoed, and the CPU it divides by is the transceiver's own
(from /proc, rising while the calls run). Tiny counts; never a timing."""

from __future__ import annotations

import pytest

from tests.bench import bench_density as bd

# realtime: the echo is checked against the wall clock (a tone heard back).
pytestmark = [pytest.mark.netns, pytest.mark.realtime]


def test_one_step_counts_a_connected_echoing_call():
    res = bd.run([1], 3.0)
    (s,) = res["steps"]
    assert s["calls"] == s["connected"] == 1
    assert s["audio_frames_min"] > 0 and s["tone_ratio_min"] > 10  # the tone came back
    assert s["transceiver_cpu_s"] > 0
    assert s["calls_per_core"] == pytest.approx(3.0 / s["transceiver_cpu_s"], rel=0.05)
    assert res["idle_cpu_ms_per_s"] >= 0
    assert "calls/core" in bd.table(res)
