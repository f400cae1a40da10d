"""relayd's graceful stop: SIGTERM while a placement is in flight (its
transceiver is stopped mid-answer). relayd refuses new connections at once,
the placement still completes (201), its call reaches the kernel, and after
relayd has exited the call goes on through XDP."""

from __future__ import annotations

import asyncio
import secrets
import signal
import threading
import urllib.error
import urllib.request

import pytest

from manager.lab.lifecycle import lab as lab_ctx
from manager.lab.netns import NetnsExecutor
from manager.lab.services import Services
from tests.support.lab_calls import assert_untouched, audio_flowing, run_call
from tests.support.waiting import eventually

# realtime: the checks count media against the wall clock.
pytestmark = [pytest.mark.netns, pytest.mark.realtime]


def post_offer(url: str) -> str:
    """A new POST /v1/calls: how it was refused (or the status it got)."""
    req = urllib.request.Request(f"{url}/v1/calls", data=b"v=0\r\n", method="POST",
                                 headers={"Content-Type": "application/sdp"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return f"HTTP {r.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except urllib.error.URLError as exc:
        return f"refused: {exc.reason}" if isinstance(exc.reason, ConnectionRefusedError) else f"error: {exc}"


def forwarded(svc) -> int:
    dp = svc.open_datapath(1)
    try:
        return sum(v[0] for k, v in dp.counters().items() if k.startswith("fwd_"))
    finally:
        dp.close()


def test_sigterm_finishes_the_placement_in_flight_and_leaves_the_call_to_xdp(tmp_path):
    with lab_ctx(prefix=f"gs{secrets.token_hex(3)}") as lab:
        # A short transceiver drain: at teardown relayd is gone, nothing can move.
        svc = Services(lab, workdir=tmp_path, drain_deadline=1.0)
        try:
            svc.start()
            svc.control.request("POST", "/transceivers/2/drain", {})  # the call goes to transceiver 1
            relayd, tx1 = svc.procs["relayd"], svc.procs["tx1"]
            info: dict = {}
            exited = threading.Event()

            def stop_relayd_mid_placement() -> None:
                try:
                    eventually(lambda: any(c["state"] == "placing" for c in svc.calls()), 10,
                               what="a placement in flight")
                    relayd.send_signal(signal.SIGTERM)
                    eventually(lambda: "no new calls" in svc.log_path("relayd").read_text(), 10,
                               what="relayd to stop accepting")
                    with NetnsExecutor(lab.client_ns) as ex:
                        info["new_post"] = ex.call(post_offer, lab.signaling_url)
                except Exception as exc:  # reported by the test below
                    info["error"] = f"{type(exc).__name__}: {exc}"
                finally:
                    tx1.send_signal(signal.SIGCONT)  # the answer comes: the placement completes
                info["rc"] = relayd.wait(30)
                exited.set()

            async def after_relayd(pc, rep):
                await audio_flowing(pc)
                await asyncio.to_thread(exited.wait, 40)
                info["fwd_before"] = await asyncio.to_thread(forwarded, svc)
                rep.mark("relayd gone")

            tx1.send_signal(signal.SIGSTOP)  # (briefly: it stays healthy for heartbeat_timeout)
            stopper = threading.Thread(target=stop_relayd_mid_placement)
            stopper.start()
            try:
                rep = run_call(lab, duration=3.0, messages=3, hang_up=False, on_connected=after_relayd)
            finally:
                tx1.send_signal(signal.SIGCONT)
                stopper.join(60)
            fwd_after = forwarded(svc)
        finally:
            svc.stop()
    log = svc.log_path("relayd").read_text()
    assert "error" not in info, (info, log[-2000:])
    assert rep.status == 201 and info["rc"] == 0, (rep.status, rep.error, log[-2000:])
    assert info["new_post"].startswith("refused") or info["new_post"] == "HTTP 503", info
    assert "placements in flight finished" in log and "fast path left running" in log
    assert "Traceback" not in log
    assert_untouched(rep)
    assert rep.frames_after["relayd gone"] > 100 and rep.tone_ratio_after["relayd gone"] > 50, rep
    assert rep.dc_echoed == rep.dc_sent == 3
    # The kernel carried the call with no relayd: a call's 50 packets/s each way for 3 s.
    assert fwd_after - info["fwd_before"] > 200, (info["fwd_before"], fwd_after)
    print(f"\nnew POST during the stop: {info['new_post']}; XDP forwarded {fwd_after - info['fwd_before']} "
          f"packets after relayd exited")
