"""What the building blocks of the XDP hit path cost by themselves.

    .venv/bin/python -m tests.bench.bench_blocks [--repeat N] [--samples N] [--json]

One program per block (bpf/testing/blocks.bpf.c), each run with
BPF_PROG_TEST_RUN `repeat` times on one frame: a 40-byte-key LRU hash lookup
(the flows map), a 4-byte-key hash lookup (the owners map as it was), an
array lookup (the owners map as it is), the three clocks, and the per-CPU
copy of the coarse clock the relay reads. Every run must return XDP_PASS
(the block worked); the figure is the median over samples of the kernel's
ns per run, and "added" is that minus the empty program's in the same round.
Prints figures; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys

from manager.lab.xdp_harness import XDP_PASS
from manager.relay.kernel import libbpf
from manager.relay.kernel.datapath import ensure_kernel_headers
from manager.relay.kernel.structs import BPF_TESTING_DIR

BLOCKS = [  # (program, what it stands for)
    ("xdp_nothing", "empty program (the floor)"),
    ("xdp_lru40", "LRU hash lookup, 40-byte key (flows)"),
    ("xdp_hash4", "hash lookup, 4-byte key (owners by connection id, before)"),
    ("xdp_array4", "array lookup (owners by slot, now)"),
    ("xdp_ktime_ns", "bpf_ktime_get_ns"),
    ("xdp_coarse_ns", "bpf_ktime_get_coarse_ns (last-seen, before)"),
    ("xdp_jiffies", "bpf_jiffies64"),
    ("xdp_coarse_copy", "per-CPU copy of the coarse clock (now)"),
]
FRAME = bytes(224)


def load():
    """The blocks program with one entry in each map its lookups look for."""
    ensure_kernel_headers()
    from bcc import BPF

    b = BPF(src_file=str(BPF_TESTING_DIR / "blocks.bpf.c").encode())
    key = (ctypes.c_uint32 * 10)(1)
    val = (ctypes.c_uint64 * 12)(1)
    b[b"lru40"][key] = val
    b[b"hash4"][ctypes.c_uint32(1)] = val
    b[b"array4"][ctypes.c_uint32(1)] = val
    return b


def measure(b, repeat: int, samples: int) -> list[dict]:
    fds = {name: b.load_func(name.encode(), 6).fd for name, _ in BLOCKS}  # 6: BPF_PROG_TYPE_XDP
    runs: dict[str, list[int]] = {name: [] for name, _ in BLOCKS}
    verdicts: dict[str, set[int]] = {name: set() for name, _ in BLOCKS}
    for _ in range(samples):
        for name, _ in BLOCKS:  # every block once per round
            verdict, _, ns = libbpf.prog_test_run_xdp(fds[name], FRAME, repeat=repeat)
            runs[name].append(ns)
            verdicts[name].add(verdict)
    floor = runs["xdp_nothing"]
    res = []
    for name, what in BLOCKS:
        added = [x - f for x, f in zip(runs[name], floor, strict=True)]
        res.append({"program": name, "block": what, "ns": statistics.median(runs[name]),
                    "added_ns": statistics.median(added), "samples": runs[name],
                    "ok": verdicts[name] == {XDP_PASS}})
    return res


def table(res: list[dict], repeat: int) -> str:
    lines = [f"{'block':<62} {'ns/run':>7} {'added':>6}  check", "-" * 84]
    for r in res:
        lines.append(f"{r['block']:<62} {r['ns']:>7.1f} {r['added_ns']:>6.1f}  {'ok' if r['ok'] else 'FAILED'}")
    lines.append(f"(median of {len(res[0]['samples'])} samples of {repeat:,} runs each; added: minus the empty "
                 "program, per round)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.bench_blocks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=2_000_000, help="runs per sample (default 2,000,000)")
    ap.add_argument("--samples", type=int, default=7, help="rounds (default 7)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.samples < 1:
        ap.error("--repeat and --samples must be at least 1")
    b = load()
    try:
        res = measure(b, args.repeat, args.samples)
    finally:
        b.cleanup()
    print(json.dumps(res, indent=2) if args.json else table(res, args.repeat))
    return 0 if all(r["ok"] for r in res) else 1


if __name__ == "__main__":
    sys.exit(main())
