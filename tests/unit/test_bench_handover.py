"""bench_handover's summary of its runs: the spread of each figure over the
runs that worked, the failed ones named, the runs over the goal counted."""

from __future__ import annotations

from tests.bench import bench_handover


def run(gap: float, sent: float) -> dict:
    return {"figures": {"restart_gap_to_client_ms": gap, "restart_gap_to_owner_ms": 22.0,
                        "move_gap_to_client_ms": 2100.0, "patch_ms": 9.0},
            "checks": {"first_sent_ms": sent, "first_at_owner_ms": sent + 0.5, "first_answered_ms": None}}


def test_the_summary_spreads_the_figures_and_counts_the_runs_over_the_goal() -> None:
    runs = [run(60.0, 50.0), run(340.0, 320.0), run(80.0, 70.0), {"error": "NotYet: the call connected"}]
    s = bench_handover.summarise(runs)
    assert (s["runs"], s["ok"], s["errors"]) == (4, 3, ["NotYet: the call connected"])
    assert s["restart_gap_to_client_ms"] == {"median": 80.0, "max": 340.0, "min": 60.0}
    assert s["checks"]["first_sent_ms"]["max"] == 320.0
    assert s["checks"]["first_answered_ms"] == {"median": None, "max": None, "min": None}  # none answered
    assert s["over_goal"] == 1 and s["goal_ms"] == 300
    assert "3/4 handovers; 1 over 300 ms" in bench_handover.table({"summary": s})


def test_each_run_moves_to_fresh_addresses() -> None:
    addrs = [bench_handover.addresses(i) for i in range(40)]
    assert len(set(addrs)) == 40
    assert all(a4.startswith("10.10.1.") and a6.startswith("fd00:10:1::") for a4, a6 in addrs)
