"""The transceiver process's runtime: uvloop and the collector's settings."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys

from manager.transceiver import runtime


def test_run_uses_uvloop_and_returns_the_result():
    async def main():
        await asyncio.sleep(0)  # one real await: the loop runs the coroutine, not a shortcut
        return runtime.loop_name()

    assert runtime.run(main()) == "uvloop"
    assert runtime.run(main(), use_uvloop=False) == "asyncio"


def test_gc_pauses_count_collections():
    pauses = runtime.GcPauses()
    pauses.install()
    try:
        gc.collect(1)
        gc.collect(2)
    finally:
        pauses.uninstall()
    info = pauses.info()
    assert info["collections"][1] >= 1 and info["collections"][2] >= 1
    assert info["max_pause_ms"] > 0 and info["total_ms"] >= info["max_pause_ms"]
    gc.collect(2)  # uninstalled: no longer counted
    assert pauses.info() == info


def test_tune_gc_freezes_what_is_alive_and_raises_the_thresholds():
    # In a child process: freezing this test process's objects would outlive the test.
    code = ("import gc; from manager.transceiver import runtime; runtime.tune_gc(); gc.collect(0); "
            "i = runtime.PAUSES.info(); "
            "assert gc.get_freeze_count() > 1000, gc.get_freeze_count(); "
            "assert gc.get_threshold() == runtime.GC_THRESHOLDS; "
            "assert i['collections'][0] >= 1, i; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
