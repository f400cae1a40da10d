"""A transceiver leaving without dropping its calls: on SIGTERM it asks relayd
to drain it, every call moves live to the other transceiver (audio and data
channel carry on) and it exits; what cannot move before the deadline ends
with reason drain-deadline, counted. Through the lab's relay (relayd with
XDP), aiortc clients and one Chromium."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import secrets
import signal
import subprocess
import sys
import threading

import pytest

from manager.lab.netns import NetnsExecutor
from manager.lab.services import running_lab
from manager.relay.control_client import ControlClient
from tests.support.chromium import Chromium
from tests.support.interop_clients import BrowserClient
from tests.support.lab_calls import assert_untouched, audio_flowing, run_call
from tests.support.waiting import eventually, eventually_async

# realtime: the checks count media against the wall clock.
pytestmark = [pytest.mark.netns, pytest.mark.realtime]

WAIT = 90  # the longest a call's thread waits for the test's next step


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with running_lab(f"dr{secrets.token_hex(3)}", tmp_path_factory.mktemp("services")) as (lab, svc):
        yield lab, svc, ControlClient(svc.config["control_socket"])


def relayctl(svc, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.relayctl", "--socket", svc.config["control_socket"], *args],
                          capture_output=True, text=True, timeout=120)


def on(svc, k: int) -> list[dict]:
    return [c for c in svc.calls() if c["transceiver_id"] == k and c["state"] == "active"]


def metric(svc, name: str, **labels) -> float:
    return svc.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


def restart_transceiver(svc, k: int, drain_deadline: float | None = None) -> None:
    svc.stop_one(f"tx{k}", signal.SIGKILL)
    svc.drain_deadline = drain_deadline
    svc.start_transceiver(k)
    eventually(lambda: svc.transceiver_api(k, "/health"), 20, what=f"transceiver {k}'s new process answering")
    eventually(lambda: {t["id"]: t for t in svc.transceivers()}.get(k, {}).get("healthy")
               and not {t["id"]: t for t in svc.transceivers()}[k]["draining"], 20,
               what=f"transceiver {k} registered again, taking calls")


def chromium_call(lab, ready: list, gone: threading.Event, out: dict) -> None:
    """Chromium on relayd's page: echoing before, and after the drain every
    ping sent before it is echoed, five more after, and the tone comes back."""
    url = lab.signaling_url
    client = BrowserClient(Chromium(lab.client_ns, f"{url}/?messages=1000", origin=url))

    async def until(what: str, predicate, timeout: float):
        async def check():
            r = await client.status()
            assert not r.error, f"Chromium: {r.error}"
            return r if predicate(r) else None
        return await eventually_async(check, timeout, what=f"Chromium: {what}", interval=0.25)

    async def call() -> None:
        await client.start()
        try:
            await until("connected, echoing tone and pings",
                        lambda r: r.connected and r.tone_ok and r.dc_echoed >= 3, 30)
            ready.append("chromium")
            await asyncio.to_thread(gone.wait, WAIT)
            sent = (await client.status()).dc_sent
            r = await until("every ping sent before the drain echoed, and five more",
                            lambda r: r.connected and r.dc_echoed >= sent + 5, 20)
            out["chromium"] = {"sent_before": sent, "echoed": r.dc_echoed, "sent": r.dc_sent}
            await until("the tone in the echo", lambda r: r.connected and r.tone_ok, 10)
        finally:
            out["chromium_report"] = client.last
            await client.stop()

    with NetnsExecutor(lab.client_ns) as ex:
        ex.call(asyncio.run, call())


def test_sigterm_moves_five_calls_one_of_them_chromium(env):
    lab, svc, ctl = env
    ctl.request("POST", "/transceivers/2/drain", {})  # every call on transceiver 1 (2 holds none)
    ready: list = []
    gone = threading.Event()
    out: dict = {}

    async def hold(pc, rep):
        await audio_flowing(pc)
        ready.append(rep)
        await asyncio.to_thread(gone.wait, WAIT)
        rep.mark("moved")

    try:
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            calls = [pool.submit(run_call, lab, duration=3.0, messages=3, dc_interval=0.05, on_connected=hold)
                     for _ in range(4)]
            browser = pool.submit(chromium_call, lab, ready, gone, out)
            eventually(lambda: len(ready) == 5 or any(f.done() for f in (*calls, browser)), 60,
                       what="five calls echoing")
            assert len(on(svc, 1)) == 5, svc.calls()
            moved_before = metric(svc, "splitrelay_migrations_total", outcome="moved")
            ctl.request("POST", "/transceivers/2/undrain", {})
            tx1 = svc.procs["tx1"]
            tx1.send_signal(signal.SIGTERM)
            rc = tx1.wait(40)
            gone.set()
            reps = [f.result() for f in calls]
            browser.result()
    finally:
        gone.set()
    log = svc.log_path("tx1").read_text()
    assert rc == 0 and "Traceback" not in log, log[-2000:]
    assert "5 calls moved, 0 ended" in log and "drain deadline" not in log, log[-2000:]
    assert metric(svc, "splitrelay_migrations_total", outcome="moved") - moved_before == 5
    assert metric(svc, "splitrelay_drains_total", outcome="drained") >= 1
    for rep in reps:
        assert_untouched(rep)
        assert rep.rtp_packets_lost <= 1, rep.rtp_packets_lost
        assert rep.frames_after["moved"] > 100 and rep.tone_ratio_after["moved"] > 50, rep.tone_ratio_after
        # Client → agent → client through both owners: every message once, in order.
        sent = len(rep.dc_numbered_sent_at)
        assert [n for n, _ in rep.dc_numbered_echoes] == list(range(sent)) and sent > 50
        assert rep.dc_echoed == rep.dc_sent == 3
    print(f"\n5 calls moved off transceiver 1 on SIGTERM; aiortc lost {[r.rtp_packets_lost for r in reps]} packets; "
          f"Chromium {out['chromium']}")
    restart_transceiver(svc, 1)


def test_deadline_shorter_than_a_migration_ends_the_calls(env):
    """`relayctl drain N --wait` with a deadline shorter than the migration
    under way (its target is stopped mid-import): the migration is abandoned
    (the old owner keeps the call until then), and the call ends with reason
    drain-deadline, counted; relayctl says so and exits 1."""
    lab, svc, ctl = env
    out = {}

    async def drain_now(pc, rep):
        await audio_flowing(pc)
        (call,) = await asyncio.to_thread(svc.calls)
        out["call"] = call
        k = call["transceiver_id"]
        before = await asyncio.to_thread(svc.metrics)
        target = svc.procs[f"tx{2 if k == 1 else 1}"]
        target.send_signal(signal.SIGSTOP)  # the import never answers: the migration outlasts the deadline
        try:
            out["cli"] = await asyncio.to_thread(relayctl, svc, "drain", str(k), "--wait", "--deadline", "1", "--json")
        finally:
            target.send_signal(signal.SIGCONT)
        after = await asyncio.to_thread(svc.metrics)
        out["counted"] = {name: after.get((name, labels), 0) - before.get((name, labels), 0) for name, labels in (
            ("splitrelay_drain_deadline_calls_total", ()),
            ("splitrelay_migrations_total", (("outcome", "failed"),)),
            ("splitrelay_drains_total", (("outcome", "deadline"),)))}
        await asyncio.to_thread(ctl.request, "POST", f"/transceivers/{k}/undrain", {})

    run_call(lab, duration=1.0, messages=1, hang_up=False, on_connected=drain_now)
    cli = out["cli"]
    assert cli.returncode == 1 and "Traceback" not in cli.stderr, cli.stderr
    assert "1 calls could not move before the deadline" in cli.stderr
    progress = json.loads(cli.stdout)
    assert progress["state"] == "deadline" and progress["ended_at_deadline"] == 1 and progress["moved"] == 0, progress
    assert set(out["counted"].values()) == {1}, out["counted"]
    relayd = svc.log_path("relayd").read_text()
    assert "ending them with reason drain-deadline" in relayd and "Traceback" not in relayd
    assert all(c["call_id"] != out["call"]["call_id"] for c in svc.calls())
    k = out["call"]["transceiver_id"]
    eventually(lambda: svc.transceiver_api(k, "/calls")["calls"] == [], 5,
               what=f"transceiver {k} to have hung the call up")


def test_no_other_transceiver_calls_end_at_the_deadline(env):
    """SIGTERM with no other healthy transceiver: nothing can move; at the
    deadline the calls end (reason drain-deadline, counted), one clear log
    line each side, no traceback, and the transceiver exits cleanly."""
    lab, svc, ctl = env
    restart_transceiver(svc, 1, drain_deadline=2.0)
    svc.stop_one("tx2", signal.SIGTERM)  # its last heartbeat says unhealthy
    out = {}
    try:
        eventually(lambda: not {t["id"]: t for t in svc.transceivers()}[2]["healthy"], 10,
                   what="transceiver 2 gone")

        async def sigterm(pc, rep):
            await audio_flowing(pc)
            out["before"] = await asyncio.to_thread(metric, svc, "splitrelay_drain_deadline_calls_total")
            tx1 = svc.procs["tx1"]
            tx1.send_signal(signal.SIGTERM)
            out["rc"] = await asyncio.to_thread(tx1.wait, 20)
            out["after"] = await asyncio.to_thread(metric, svc, "splitrelay_drain_deadline_calls_total")

        rep = run_call(lab, duration=1.0, messages=1, hang_up=False, on_connected=sigterm)
        assert "rc" in out, rep.error
    finally:
        svc.drain_deadline = None
        svc.start_transceiver(2)
        restart_transceiver(svc, 1)
    relayd, tx1 = svc.log_path("relayd").read_text(), svc.log_path("tx1").read_text()
    assert out["rc"] == 0 and out["after"] - out["before"] == 1
    assert "Traceback" not in relayd and "Traceback" not in tx1
    assert "could not move (no other transceiver can take calls: no healthy transceiver" in relayd, relayd[-2000:]
    assert "0 calls moved, 1 ended" in tx1, tx1[-2000:]


def test_relayctl_drain_wait_shows_progress(env):
    lab, svc, ctl = env
    out = {}

    async def drain(pc, rep):
        await audio_flowing(pc)
        (call,) = await asyncio.to_thread(svc.calls)
        out["k"] = k = call["transceiver_id"]
        rep.mark("moved")
        out["cli"] = await asyncio.to_thread(relayctl, svc, "drain", str(k), "--wait", "--deadline", "20")
        out["status"] = await asyncio.to_thread(relayctl, svc, "status")
        await asyncio.to_thread(ctl.request, "POST", f"/transceivers/{k}/undrain", {})

    rep = run_call(lab, duration=2.0, messages=2, on_connected=drain)
    cli = out["cli"]
    assert cli.returncode == 0, cli.stderr
    lines = cli.stdout.splitlines()
    assert lines[0].split(":", 1)[1].strip().startswith("0 moved, 1 left"), lines  # the first progress line
    assert f"moved from transceiver {out['k']}" in cli.stdout
    assert lines[-1].startswith(f"transceiver {out['k']} drained in") and lines[-1].endswith("1 calls moved"), lines
    assert "1 draining" in out["status"].stdout, out["status"].stdout
    assert_untouched(rep)
    assert rep.rtp_packets_lost <= 1 and rep.tone_ratio_after["moved"] > 50
