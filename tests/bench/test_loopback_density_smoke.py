"""The loopback density benchmark measures what it says: every path carries
the calls it counts, their echoes come back voiced and carrying the tone, and
the CPU it divides by is the transceiver's own; the loss run's delivered
frames are at most the frames sent. Tiny counts; never a timing."""

from __future__ import annotations

import pytest

from tests.bench import loopback_density as ld
from tests.bench import loopback_netns

# realtime: the echo is checked against the wall clock (a tone heard back).
pytestmark = pytest.mark.realtime


def test_every_path_holds_a_small_step():
    res = ld.summary(ld.run_steps(list(ld.PATHS), [3], 3.0))
    for path in ld.PATHS:
        (s,) = res["steps"][path]
        # What the step measured, not whether it was fast enough: whether a
        # step "holds" also judges its latency, which a loaded machine moves.
        assert s["connected"] == s["calls"] == 3 and s["ended_early"] == 0 and s["failed"] == 0, s
        assert s["echo_lost"] == 0 and s["transceiver_cpu_s"] > 0, s
        heard, sampled = s["tone_ok"].split("/")
        assert heard == sampled != "0", s
        assert s["added_latency_ms"]["bursts"] >= 3 and s["added_latency_ms"]["p99"] is not None, s
        assert s["generator_ms_per_call_second"] > 0, s
        if path.startswith("engine"):
            assert s["engine"]["calls"] == 3, s  # every call was carried by the engine
        if s["holds"]:
            assert res["calls_per_core"][path] == pytest.approx(s["calls_per_core"])


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel-drop", "sender-drop"])
def test_the_loss_run_counts_what_the_agent_heard(kernel):
    """Packets dropped (by the kernel on the transceiver's veth, or by the
    sender); the agent heard the rest, and on the engine some frames were
    concealed or rebuilt from FEC; no path delivers more frames than were sent."""
    assert loopback_netns.kernel_loss_available()  # the bench layer runs as root
    (engine,) = ld.run_loss("engine", [0.05], 3.0, calls=3, kernel=kernel)
    (aiortc,) = ld.run_loss("aiortc", [0.05], 3.0, calls=3, kernel=kernel)
    for r in (engine, aiortc):
        assert r["mode"] == ("kernel" if kernel else "sender")
        assert r["connected"] == 3 and r["frames_dropped"] > 0 and 0 < r["frames_real"] < 1, r
        assert r["frames_real"] <= r["frames_delivered"] <= 1.0, r
    assert engine["frames_concealed"] + engine["frames_fec"] > 0
    assert aiortc["frames_concealed"] == aiortc["frames_fec"] == aiortc["frames_expanded"] == 0  # aiortc conceals nothing


def test_at_no_loss_every_frame_is_delivered_once():
    """The frames the agent heard are the frames sent (a concealed frame
    read as real audio would count twice)."""
    (engine,) = ld.run_loss("engine", [0.0], 3.0, calls=3, kernel=False)
    assert engine["frames_dropped"] == 0, engine
    assert 0 < engine["frames_real"] <= engine["frames_delivered"] <= 1.0, engine
