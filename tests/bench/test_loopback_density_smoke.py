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
        assert s["holds"], s
        assert s["echo_lost"] == 0 and s["transceiver_cpu_s"] > 0
        assert res["calls_per_core"][path] == pytest.approx(s["calls_per_core"])
    assert res["highest_step_that_holds"] == {"engine": 3, "aiortc": 3}
