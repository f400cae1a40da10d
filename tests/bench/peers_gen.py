"""Generator and sink of bench_peers: one for every row.

Generator: bpf/testing/stamp.bpf.c run with BPF_PROG_TEST_RUN live frames
(BPF_F_TEST_XDP_LIVE_FRAMES) on the relay namespace's public interface. It
rewrites each frame from a template, stamps it with bpf_ktime_get_ns(), and
tail-calls the row's XDP program (or, with none, passes the frame to the
kernel's stack as if the interface had received it).

Sink: bpf/testing/sink.bpf.c on the far end of the relay's internal veth:
counts frames and, from the stamp, each frame's latency into a histogram.
Both read CLOCK_MONOTONIC (bpf_ktime_get_ns), so the difference is the time
from the generator to the sink.

Two ways to run the generator:
- flat out (`run_max`): back-to-back calls of CHUNK frames on one core, for
  the highest offered load;
- paced (`run_paced`): bursts of B frames every B/rate seconds, for latency
  at a given load; the CPU time of each call is taken (the thread's own
  clock around the syscall), so the generator's own work can be subtracted.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from manager.relay.kernel import libbpf
from manager.relay.kernel.structs import BPF_TESTING_DIR
from tests.support.waiting import NotYet, eventually

STAMP_SRC = BPF_TESTING_DIR / "stamp.bpf.c"
SINK_SRC = BPF_TESTING_DIR / "sink.bpf.c"
TPL_LEN = 72              # stamp.bpf.c
STAMP_MAGIC = b"STMP"     # 0x504d5453 little-endian, as stamp.bpf.c writes it
SINK_OFF = 12             # sink.bpf.c: the stamp's offset in the UDP payload at the sink
NBUCKETS = 2048
CHUNK = 65_536            # frames per call when flat out
BATCH = 64                # frames per live-frames batch when flat out (the kernel's default)
# Paced runs: batches of 4 frames (a frame's latency includes the frames ahead
# of it in its batch: 64 would add ~10 µs to the relay's), one call per
# ~100 µs (~200 µs above 1 Mpps; a call costs ~20 µs of set-up here).
PACED_BATCH = 4
MAX_BURST = 512
XDP_FLAGS_DRV_MODE = 1 << 2
PR_SET_TIMERSLACK = 29


# --- histogram ---------------------------------------------------------------------------

def bucket_of(v: int) -> int:
    """sink.bpf.c's bucket index of a latency in ns (for tests of the decoding)."""
    if v < 64:
        return v
    if v >= 1 << 36:
        return NBUCKETS - 1
    e = v.bit_length() - 1
    return (e - 5) * 64 + ((v >> (e - 6)) & 63)


def bucket_range(idx: int) -> tuple[int, int]:
    """[low, high) in ns of histogram bucket idx."""
    if idx < 64:
        return idx, idx + 1
    e, m = idx // 64 + 5, idx % 64
    width = 1 << (e - 6)
    low = (64 + m) << (e - 6)
    return low, low + width


def percentiles(hist: list[int], qs: tuple[float, ...] = (0.5, 0.99, 0.999)) -> dict[float, float | None]:
    """Latency percentiles in ns from histogram counts (the bucket's middle;
    buckets are 1.6% wide above 64 ns)."""
    total = sum(hist)
    out: dict[float, float | None] = {}
    for q in qs:
        if not total:
            out[q] = None
            continue
        need, cum = q * total, 0
        for i, n in enumerate(hist):
            cum += n
            if n and cum >= need:
                lo, hi = bucket_range(i)
                out[q] = (lo + hi) / 2
                break
    return out


# --- CPU time ------------------------------------------------------------------------------

def task_ns(pid: int, tid: int | None = None) -> int:
    """Time on CPU (ns, the scheduler's own sum) of one thread, or of every
    thread of a process. Without IRQ time accounting (this kernel) it includes
    the softirq work done in the task's context (XDP, the sink's NAPI run)."""
    if tid is not None:
        return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    total = 0
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((t / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that just ended
    return total


def ksoftirqd_pids() -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "comm").read_text().startswith("ksoftirqd/"):
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def cpu_ns(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += task_ns(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


# The generator thread (while it generates) and the userspace peers run at
# SCHED_FIFO priority 1, each on its own CPU, ahead of whatever else the
# machine runs (the kernel's RT throttling still leaves others 5%).
REALTIME = True
RT_PRIORITY = 1
PACED_NICE = -20


def realtime_available() -> bool:
    """Whether this process may use SCHED_FIFO (root in a container may not)."""
    return subprocess.run(["chrt", "-f", str(RT_PRIORITY), "true"], capture_output=True).returncode == 0


class _Placed:
    """The calling thread on `cpu` while inside: flat out (fifo) at SCHED_FIFO
    if REALTIME; paced at nice -20 (a spinning FIFO thread would starve the
    kworkers that release each call's page pool, and the kernel then refuses
    calls with ENOSPC once page-pool ids run out)."""

    def __init__(self, cpu: int | None, fifo: bool):
        self.cpu, self.fifo = cpu, fifo and REALTIME

    def __enter__(self) -> None:
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})
        if self.fifo:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(RT_PRIORITY))  # 0: this thread
        elif REALTIME:
            os.setpriority(os.PRIO_PROCESS, 0, PACED_NICE)  # 0: this thread (Linux)

    def __exit__(self, *exc: object) -> None:
        if self.fifo:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        elif REALTIME:
            os.setpriority(os.PRIO_PROCESS, 0, 0)


# --- generator and sink ----------------------------------------------------------------------

@dataclass
class SinkReading:
    frames: int
    stamped: int
    late_sum_ns: int
    hist: list[int] = field(default_factory=list)

    def __sub__(self, o: SinkReading) -> SinkReading:
        return SinkReading(self.frames - o.frames, self.stamped - o.stamped, self.late_sum_ns - o.late_sum_ns,
                           [a - b for a, b in zip(self.hist, o.hist, strict=True)] if self.hist and o.hist else [])


class GenSink:
    """The stamp program (kept in the kernel's XDP dispatcher by an attachment
    to a down veth: without it every call with repeat > 1 costs an RCU grace
    period) and the sink on `sink_dev`, both in the namespace of `ex`."""

    def __init__(self, ex, ns: str, ifindex: int, sink_dev: str):
        from bcc import BPF
        from bcc.libbcc import lib as bcclib

        self.ex, self.ns, self.ifindex = ex, ns, ifindex
        self._gen = BPF(src_file=str(STAMP_SRC).encode())
        self._sink = BPF(src_file=str(SINK_SRC).encode(), cflags=[f"-DSINK_OFF={SINK_OFF}"])
        self.fd = self._gen.load_func(b"xdp_stamp", BPF.XDP).fd
        self.drop_fd = self._gen.load_func(b"xdp_drop_all", BPF.XDP).fd
        sink_fd = self._sink.load_func(b"xdp_sink", BPF.XDP).fd
        self._tpl, self._next = self._gen[b"tpl"], self._gen[b"next"]
        self._count = self._gen[b"gen_count"]
        self._stats, self._hist = self._sink[b"sink_stats"], self._sink[b"sink_hist"]
        import subprocess

        subprocess.run(["ip", "-n", ns, "link", "add", "gdisp", "type", "veth", "peer", "gdispp"],
                       check=True, capture_output=True)
        for dev, fd in ((b"gdisp", self.fd), (sink_dev.encode(), sink_fd)):
            rc = ex.call(bcclib.bpf_attach_xdp, dev, fd, XDP_FLAGS_DRV_MODE)
            if rc < 0:
                raise RuntimeError(f"cannot attach XDP to {dev.decode()} in {ns}: {rc}")
        self.frame = b""
        self.call_errors: dict[str, int] = {}  # generator calls the kernel cut short, by errno

    def cleanup(self) -> None:
        for b in (self._gen, self._sink):
            try:
                b.cleanup()
            except Exception:
                pass

    # set-up per row

    def set_template(self, frame: bytes, stamp_off: int) -> None:
        """The row's frame; the generator's stamp goes at frame offset stamp_off."""
        if len(frame) < TPL_LEN or stamp_off + 12 > TPL_LEN or frame[stamp_off:stamp_off + 4] != STAMP_MAGIC:
            raise ValueError("frame too short, or no stamp placeholder at stamp_off")
        v = self._tpl.Leaf()
        ctypes.memmove(ctypes.addressof(v), frame, TPL_LEN)
        v.stamp_off = stamp_off
        self._tpl[ctypes.c_int(0)] = v
        self.frame = frame

    def set_next(self, prog_fd: int | None) -> None:
        """The XDP program the generator tail-calls (None: pass to the stack)."""
        if prog_fd is None:
            try:
                del self._next[ctypes.c_int(0)]
            except KeyError:
                pass
        else:
            self._next[ctypes.c_int(0)] = ctypes.c_int(prog_fd)

    # readings

    def generated(self) -> int:
        return self._count.sum(ctypes.c_int(0)).value

    def sink(self, hist: bool = False) -> SinkReading:
        vals = self._stats[ctypes.c_int(0)]
        r = SinkReading(sum(v.frames for v in vals), sum(v.stamped for v in vals), sum(v.late_sum_ns for v in vals))
        if hist:
            per_cpu = self._hist[ctypes.c_int(0)]
            r.hist = [sum(h.b[i] for h in per_cpu) for i in range(NBUCKETS)]
        return r

    def settle(self, timeout: float = 2.0, quiet: float = 0.1) -> SinkReading:
        """Wait until the sink stops counting (frames still in a peer's socket
        queue), at most `timeout`; returns the last reading."""
        seen = {"reading": self.sink(), "at": time.monotonic()}

        def quiet_for_a_while() -> bool:
            cur = self.sink()
            if cur.frames != seen["reading"].frames:
                seen.update(reading=cur, at=time.monotonic())
            return time.monotonic() - seen["at"] >= quiet

        with contextlib.suppress(NotYet):  # still counting: the last reading will do
            eventually(quiet_for_a_while, timeout, what="the sink to stop counting")
        return seen["reading"]

    # running

    def _call(self, repeat: int, batch: int = BATCH) -> None:
        try:
            libbpf.prog_test_run_xdp(self.fd, self.frame, ingress_ifindex=self.ifindex, repeat=repeat,
                                     flags=libbpf.BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=batch)
        except libbpf.BpfError as exc:
            # Now and then a live-frames call whose frames go up the stack
            # stops early with ENOSPC (seen once in several runs here).
            # The frames it ran are counted (gen_count) like any others, and
            # the row's check accounts for them; the call is counted here.
            if exc.errno not in (errno.ENOSPC, errno.ENOMEM):
                raise
            self.call_errors[errno.errorcode[exc.errno]] = self.call_errors.get(errno.errorcode[exc.errno], 0) + 1

    def start_max(self, stop: threading.Event, cpu: int | None) -> tuple[object, dict]:
        """Generate flat out on the namespace thread until `stop`; returns the
        future and a dict that receives the thread's id."""
        info: dict = {}

        def loop() -> None:
            info["tid"] = threading.get_native_id()
            with _Placed(cpu, fifo=True):
                while not stop.is_set():
                    self._call(CHUNK)

        return self.ex.submit(loop), info

    def run_paced(self, rate: float, seconds: float, cpu: int | None) -> dict:
        """Bursts of B frames every B/rate s for `seconds` (about one burst per
        100 µs, 200 µs above 1 Mpps; at least 2 frames: a call with repeat=1
        takes another, slower path in the kernel), in batches of PACED_BATCH.
        Returns what was offered and the generator thread's CPU time inside
        its calls."""
        window = 200e-6 if rate >= 1e6 else 100e-6
        burst = int(min(MAX_BURST, max(2, round(rate * window))))

        def loop() -> dict:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)  # sleep to the µs
            calls = sent = forgiven = 0
            in_calls = 0
            # Spinning to each burst's time (an idle vCPU here takes up to a
            # millisecond to wake from a sleep), at nice -20. A token bucket:
            # a call sends what is owed, at most 2 bursts; a generator that
            # fell further behind (preempted) forgives the rest rather than
            # send a far larger burst. Every frame is stamped as it is
            # generated, so a pause between bursts adds no latency.
            with _Placed(cpu, fifo=False):
                t0 = time.perf_counter()
                end = t0 + seconds
                while True:
                    now = time.perf_counter()
                    if now >= end:
                        break
                    owed = int((now - t0) * rate) - sent
                    if owed < burst:
                        wake = t0 + (sent + burst) / rate
                        if wake - now > 1e-3:
                            time.sleep(wake - now - 1e-3)  # pacing (the last ms spins)
                        while time.perf_counter() < wake:
                            pass
                        continue
                    if owed > 2 * burst:
                        forgiven += owed - 2 * burst
                        sent += owed - 2 * burst
                        owed = 2 * burst
                    c0 = time.thread_time_ns()
                    self._call(owed, PACED_BATCH)
                    in_calls += time.thread_time_ns() - c0
                    calls += 1
                    sent += owed
                wall = time.perf_counter() - t0
            frames = sent - forgiven
            return {"burst": burst, "batch": PACED_BATCH, "calls": calls, "frames": frames, "wall_s": wall,
                    "offered_pps": frames / wall, "target_pps": rate, "gen_cpu_ns": in_calls,
                    "forgiven": forgiven}

        return self.ex.call(loop)
