"""The loopback density benchmark measures what it says: both paths carry
the calls it counts, their echoes come back voiced and carrying the tone, and
the CPU it divides by is the transceiver's own. Tiny counts; never a timing."""

from __future__ import annotations

import pytest

from tests.bench import loopback_density as ld

# realtime: the echo is checked against the wall clock (a tone heard back).
pytestmark = pytest.mark.realtime


def test_both_paths_hold_a_small_step():
    res = ld.summary({p: ld.run_path(p == "engine", [3], 3.0) for p in ("engine", "aiortc")})
    for path in ("engine", "aiortc"):
        (s,) = res["steps"][path]
        # What the step measured, not whether it was fast enough: whether a
        # step "holds" also judges its latency, which a loaded machine moves.
        assert s["connected"] == s["calls"] == 3 and s["ended_early"] == 0, s
        assert s["echo_lost"] == 0 and s["transceiver_cpu_s"] > 0, s
        heard, sampled = s["tone_ok"].split("/")
        assert heard == sampled != "0", s
        assert s["added_latency_ms"]["bursts"] >= 3 and s["added_latency_ms"]["p99"] is not None, s
        assert s["generator_ms_per_call_second"] > 0, s
        if s["holds"]:
            assert res["calls_per_core"][path] == pytest.approx(s["calls_per_core"])


def test_the_loss_run_counts_what_the_agent_heard():
    """Packets dropped at the sender; the agent heard the rest, and on the
    engine some frames were concealed or rebuilt from FEC."""
    (engine,) = ld.run_loss(True, [0.05], 3.0, calls=3)
    (aiortc,) = ld.run_loss(False, [0.05], 3.0, calls=3)
    for r in (engine, aiortc):
        assert r["connected"] == 3 and r["frames_dropped"] > 0 and 0 < r["frames_real"] < 1
    assert engine["frames_concealed"] + engine["frames_fec"] > 0
    assert aiortc["frames_concealed"] == aiortc["frames_fec"] == 0  # aiortc conceals nothing
