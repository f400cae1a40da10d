"""The XDP benchmark measures what it says it measures.

Runs the benchmark's own functions with tiny run counts and a small map and
checks verdicts and counters, never timings: a hit is a REDIRECT on every
run, an unknown STUN packet a PASS, anything else unknown a DROP.
"""

from __future__ import annotations

import ctypes
import json
import subprocess

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from manager.lab.xdp_harness import INT4, VERDICTS, VIP4, XDP_DROP, XDP_PASS, XDP_REDIRECT
from manager.relay.kernel.structs import flow_key, reverse_key
from tests.bench import bench_xdp as bx

pytestmark = pytest.mark.netns

FLOWS = 300
PLAN = bx.Plan(repeat=2_000, samples=2, fresh_calls=20, spread_frames=64)


@pytest.fixture(scope="module")
def bench():
    b = bx.setup(capacity=4096)
    try:
        assert bx.grow(b, FLOWS) == FLOWS
        yield b
    finally:
        bx.teardown(b)


@pytest.fixture(scope="module")
def results(bench):
    return bx.bench_occupancy(bench, PLAN, FLOWS)


def _one(results, case, program, repeat):
    found = [m for m in results if m.case == case and m.program == program and m.repeat == repeat]
    assert len(found) == 1, (case, program, repeat)
    return found[0]


@pytest.mark.parametrize("case,verdict,stat", [
    ("hit → REDIRECT", "REDIRECT", "fwd_in_rtp"),
    ("miss STUN → PASS", "PASS", "pass_stun_unknown"),
    ("miss other → DROP", "DROP", "drop_unknown_not_stun"),
])
def test_relay_cases_count_every_run(results, case, verdict, stat):
    m = _one(results, case, "relay", bx.TTL_RUNS)
    assert m.verdict == verdict
    assert m.stat == stat
    assert m.packets == bx.TTL_RUNS * PLAN.hit_calls * PLAN.samples
    assert m.counted == m.packets, f"{stat} rose by {m.counted}, runs measured {m.packets}"
    assert m.others == {}
    assert m.ok


def test_long_runs_only_where_the_frame_is_unchanged(results):
    """Misses leave the frame alone, so one call with a large repeat is valid;
    the hit is only ever measured TTL_RUNS runs per buffer."""
    for case, stat in (("miss STUN → PASS", "pass_stun_unknown"), ("miss other → DROP", "drop_unknown_not_stun")):
        m = _one(results, case, "relay", PLAN.repeat)
        assert m.counted == m.packets == PLAN.repeat * PLAN.samples and m.stat == stat
    assert not [m for m in results if m.case == "hit → REDIRECT" and m.repeat > bx.TTL_RUNS]


def test_fresh_frame_hits_one_flow_and_random_flows(results):
    for case in ("hit → REDIRECT, one flow", "hit → REDIRECT, random flows"):
        m = _one(results, case, "relay", 1)
        assert m.verdict == "REDIRECT" and m.counted == m.packets == PLAN.fresh_calls * PLAN.samples and m.ok


def test_ceilings(results):
    for case, program, verdict in (("redirect only", "redirect_only", "REDIRECT"),
                                   ("fib lookup + redirect", "fib_redirect", "REDIRECT"),
                                   ("pass only", "pass_only", "PASS")):
        for repeat in (bx.TTL_RUNS, PLAN.repeat):
            m = _one(results, case, program, repeat)
            assert m.verdict == verdict and m.others == {}, (case, repeat)
    # The floors: the flows4 lookup found every flow (DROP otherwise), and
    # the relay's counters did not move.
    for case in ("flows4 lookup only, one flow", "flows4 lookup only, random flows"):
        m = _one(results, case, "lookup_only", 1)
        assert m.verdict == "PASS" and m.others == {} and m.ok, case


def test_lookup_floor_misses_a_missing_flow(bench):
    """The floor program passes only on a flow it found: with the entry
    gone it drops, so a floor figure cannot come from misses."""
    addr, port, _, _ = bx.filler(3)
    dotted = ".".join(str(b) for b in addr.to_bytes(4, "big"))
    frame = bx.retuple(bx.client_frame(bx.HIT_CLIENT, bx.RTP), addr, port)
    run = lambda: bench.h.ex.call(bx._runner, bench.progs["lookup_only"], [frame], bench.h.ifindex["pub"], 1, 1)[1]  # noqa: E731
    assert run() == {XDP_PASS}
    key = flow_key((dotted, port), (VIP4, bx.VIP_PORT))
    saved = bench.dp.maps.flows.lookup(key)
    bench.dp.maps.flows.delete(key)
    try:
        assert run() == {bx.XDP_DROP}
    finally:
        bench.dp.maps.flows.update(key, saved)


def test_every_measurement_checks_out(results):
    assert [m for m in results if not m.ok] == []
    summary = bx.summarize({FLOWS: results}, PLAN)
    text = bx.table({FLOWS: results}, summary, PLAN, [], 4096)
    assert "CHECK FAILED" not in text
    assert f"{len([m for m in results if m.program == 'relay'])}/" in text


def test_rewritten_frame_is_a_fixed_point(bench):
    """Why repeat works for the hit: the output is again a hit that maps onto
    itself, only one TTL lower, so TTL 255 allows exactly TTL_RUNS forwards."""
    frame = bx.client_frame(bx.HIT_CLIENT, bx.RTP)
    verdict, out1, _ = bench.h.run(frame)
    assert verdict == XDP_REDIRECT
    ip = Ether(out1)[IP]
    assert (ip.src, ip[UDP].sport, ip.dst, ip[UDP].dport) == (INT4, bx.HIT_FLOW_PORT, *bx.OWNER)
    verdict, out2, _ = bench.h.run(out1)
    assert verdict == XDP_REDIRECT
    assert Ether(out2)[IP].ttl == ip.ttl - 1
    assert out2[:22] + out2[26:] == out1[:22] + out1[26:]  # all but TTL and IP checksum
    before = bench.dp.counters()
    # TTL 255 → 1 in TTL_RUNS forwards, one more leaves with 0, and 0 is dropped (RFC 8656 14).
    verdict, _, _ = bench.h.run(frame, repeat=bx.TTL_RUNS + 2)
    after = bench.dp.counters()
    moved = {k: after[k][0] - before[k][0] for k in after if after[k] != before[k]}
    assert VERDICTS[verdict] == VERDICTS[XDP_DROP]
    assert moved == {"fwd_in_rtp": bx.TTL_RUNS + 1, "drop_ttl_zero": 1}


def test_retupled_frames_are_what_scapy_builds():
    frame = bx.client_frame(bx.HIT_CLIENT, bx.RTP)
    addr, port, _, _ = bx.filler(12345)
    dotted = ".".join(str(b) for b in addr.to_bytes(4, "big"))
    assert bx.retuple(frame, addr, port) == bx.client_frame((dotted, port), bx.RTP)


def test_filler_flows_are_distinct_and_in_the_map(bench):
    tuples = {bx.filler(i)[:2] for i in range(FLOWS)}
    assert len(tuples) == FLOWS
    addr, port, conn, fport = bx.filler(7)
    dotted = ".".join(str(b) for b in addr.to_bytes(4, "big"))
    flow = bench.dp.get_flow((dotted, port), (VIP4, bx.VIP_PORT))
    assert flow is not None and flow.conn_id == conn and flow.flow_port == fport
    assert bench.dp.get_owner(conn)[0].for_family(2) == (bx.OWNER[0], bx.filler_source(7)[1])


def test_live_frames_are_all_delivered_and_forwarded(bench):
    live = bx.bench_live(bench, 2_000)
    relay = next(r for r in live if r.program == "relay")
    assert relay.forwarded == relay.delivered == 2_000 and relay.others == {}
    assert {r.program for r in live} == {"relay", "lookup_redirect", "redirect_only"}
    assert all(r.ok for r in live)


def test_fillers_are_established_flows(bench):
    """Each filler holds what an established flow holds: its return entry,
    its learned SSRC in the index, and a route cache XDP follows without a
    fib lookup, so a random-flow run measures the established path."""
    i = 31_000 % FLOWS  # any filler
    addr, port, conn, fport = bx.filler(i)
    faddr, oport = bx.filler_source(i)
    dotted = ".".join(str(b) for b in addr.to_bytes(4, "big"))
    flow = bench.dp.get_flow((dotted, port), (VIP4, bx.VIP_PORT))
    assert flow is not None and flow.ssrc == int.from_bytes(bx.filler_ssrc(i), "big")
    assert bench.dp.get_owner(conn)[0].for_family(2) == (bx.OWNER[0], oport) != bx.OWNER
    rev = bench.dp.maps.reverse.lookup(reverse_key((bx.OWNER[0], oport), fport, faddr))
    assert rev is not None and rev.conn_id == conn
    raw = ctypes.c_uint32(int.from_bytes(bx.filler_ssrc(i), "little"))  # the key is as in the packet
    assert bytes(bench.dp.maps.ssrcs.lookup(raw)) == bytes(
        flow_key((dotted, port), (VIP4, bx.VIP_PORT)))
    before = bench.dp.counters()
    verdict, out, _ = bench.h.run(bx.retuple(bx.client_frame(bx.HIT_CLIENT, bx.RTP), addr, port))
    moved = {k: bench.dp.counters()[k][0] - before[k][0] for k in before
             if bench.dp.counters()[k] != before[k]}
    assert verdict == XDP_REDIRECT and moved == {"fwd_in_rtp": 1}
    ip = Ether(out)[IP]
    assert (ip.dst, ip[UDP].dport) == (bx.OWNER[0], oport)
    assert Ether(out).dst == bytes(bx.NextHop.from_buffer_copy(bench.nh).dmac).hex(":")
    # XDP followed the installed cache (owner and checksum changes from it, no
    # owners read): a lookup of its own would have rewritten it.
    info = bench.dp.maps.flows.lookup(flow_key((dotted, port), (VIP4, bx.VIP_PORT)))
    assert bytes(info.nh) == bx.filler_nh(bench.nh, i)
    # The filler's cache carries its own checksum changes: the frame leaves
    # with the checksums scapy computes for it afresh.
    fresh = Ether(out)
    del fresh[IP].chksum, fresh[UDP].chksum
    assert Ether(bytes(fresh)) == Ether(out)


def _filler_packets(bench, i: int) -> int:
    addr, port, _, _ = bx.filler(i)
    dotted = ".".join(str(b) for b in addr.to_bytes(4, "big"))
    return bench.dp.get_flow((dotted, port), (VIP4, bx.VIP_PORT)).packets_in


def test_random_flows_rotate_through_every_frame(bench):
    """A round starting at `start` goes on through the frames from there
    (wrapping), so rounds together visit every flow once before any twice."""
    frames = [bx.retuple(bx.client_frame(bx.HIT_CLIENT, bx.RTP), *bx.filler(i)[:2]) for i in range(10)]
    before = {i: _filler_packets(bench, i) for i in range(10)}
    _, verdicts = bench.h.ex.call(bx._runner, bench.progs["relay"], frames, bench.h.ifindex["pub"], 1, 4, 8)
    assert verdicts == {XDP_REDIRECT}
    moved = {i: _filler_packets(bench, i) - before[i] for i in range(10)}
    assert moved == {i: 1 if i in (8, 9, 0, 1) else 0 for i in range(10)}


def test_memory_report_reads_the_kernels_accounting(bench):
    mem = bx.map_memory(bench)
    out = subprocess.run(["bpftool", "-j", "map", "show", "pinned", f"{bench.dp.cfg.pin_dir}/flows4"],
                         check=True, capture_output=True, text=True).stdout
    flows = json.loads(out)
    assert mem["maps"]["flows4"]["bytes"] == flows["bytes_memlock"] > 0
    assert mem["maps"]["flows4"]["max_entries"] == 4096
    # at least the key and value of each entry
    assert mem["maps"]["flows4"]["bytes_per_entry"] >= ctypes.sizeof(bx.FlowKey4) + ctypes.sizeof(bx.FlowInfo)
    assert mem["bytes_per_flow"] == pytest.approx(sum(mem["maps"][n]["bytes_per_entry"] for n in bx.FLOW_MAPS))


def test_every_filler_forwards_and_a_missing_one_shows(bench):
    every = bx.forward_every_filler(bench)
    assert every.ok and every.runs == every.flows == every.forwarded == FLOWS - bx.FIXED_FLOWS
    assert every.moved == {"fwd_in_rtp": every.runs}
    # Take one filler's flow away: the check must say so.
    addr, port, _, _ = bx.filler(5)
    key = flow_key((".".join(str(b) for b in addr.to_bytes(4, "big")), port), (VIP4, bx.VIP_PORT))
    saved = bench.dp.maps.flows.lookup(key)
    bench.dp.maps.flows.delete(key)
    try:
        broken = bx.forward_every_filler(bench)
        assert not broken.ok and broken.verdicts != "REDIRECT" and broken.forwarded == every.flows - 1
    finally:
        bench.dp.maps.flows.update(key, saved)


def test_blocks_benchmark_checks_every_block_worked():
    """bench_blocks: each block's program passes only when its lookup found
    the entry (or its clock read non-zero); an emptied map fails its row."""
    from tests.bench import bench_blocks as bb

    b = bb.load()
    try:
        res = bb.measure(b, repeat=50, samples=2)
        assert [r["program"] for r in res] == [name for name, _ in bb.BLOCKS]
        assert all(r["ok"] for r in res), [r for r in res if not r["ok"]]
        assert all(len(r["samples"]) == 2 for r in res)
        b[b"hash4"].clear()
        res = {r["program"]: r for r in bb.measure(b, repeat=50, samples=1)}
        assert res["xdp_hash4"]["ok"] is False and res["xdp_lru40"]["ok"] is True
    finally:
        b.cleanup()
