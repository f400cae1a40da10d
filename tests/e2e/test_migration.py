"""Live call migration through the real relay: an unmodified aiortc client,
relayd with XDP, transceivers as separate processes. The call moves while
audio flows both ways at the normal 50 packets/s."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import secrets
import signal

import pytest

from manager.lab.services import Services, running_lab
from manager.relay.control_client import ControlClient, ControlError
from tests.support.lab_calls import (
    assert_untouched,
    audio_flowing,
    run_call,
)
from tests.support.waiting import eventually_async

# realtime: the checks count media against the wall clock.
pytestmark = [pytest.mark.netns, pytest.mark.realtime]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with running_lab(f"mg{secrets.token_hex(3)}", tmp_path_factory.mktemp("services")) as (lab, svc):
        yield lab, svc, ControlClient(svc.config["control_socket"])


def call_of(svc: Services, rep) -> dict:
    call_id = rep.call_url.rsplit("/", 1)[1]
    return next(c for c in svc.calls() if c["call_id"] == call_id)


def transceiver_call(svc, k: int, conn_id: int) -> dict | None:
    """A transceiver's own view of a call (its migration counters), over mutual TLS as relayd."""
    return svc.transceiver_api(k, f"/calls/{conn_id}")






def test_migrate_live_call(env):
    lab, svc, ctl = env
    result = {}

    async def migrate(pc, rep):
        await audio_flowing(pc)
        call = await asyncio.to_thread(call_of, svc, rep)
        result["from"] = call["transceiver_id"]
        target = 2 if call["transceiver_id"] == 1 else 1
        rep.mark("switch")
        result["res"] = await asyncio.to_thread(
            ctl.request, "POST", f"/sessions/{call['call_id']}/migrate", {"to": target})
        result["conn_id"] = call["conn_id"]
        result["to"] = target

    rep = run_call(lab, duration=6.0, messages=6, on_connected=migrate)
    res = result["res"]
    moved = transceiver_call(svc, result["to"], result["conn_id"])  # gone after hang-up: None is fine
    print(f"\nmigration {result['from']}→{result['to']}: flip {res['flip_s'] * 1000:.1f} ms, first packet from the "
          f"new owner after {res['switch_s'] * 1000:.1f} ms; client lost {rep.rtp_packets_lost} packets, "
          f"{rep.frames_after['switch']} audio frames after the switch")
    assert res["outcome"] == "moved" and res["target"] == result["to"]
    assert_untouched(rep)
    assert rep.rtp_packets_lost <= 1
    # Audio both ways after the switch: the new owner hears our tone and its
    # echo agent speaks it back.
    assert rep.frames_after["switch"] > 150
    assert rep.tone_ratio_after["switch"] > 50, rep.tone_ratio_after
    assert moved is None or moved["migration"]["rx_undecryptable"] <= 1
    # The outcome and switch duration reach Prometheus.
    m = svc.metrics()
    assert m[("splitrelay_migrations_total", (("outcome", "moved"),))] >= 1
    assert m[("splitrelay_migration_switch_seconds_count", ())] >= 1


async def _lost(pc) -> int:
    stats = await pc.getStats()
    return sum(max(0, s.packetsLost) for s in stats.values() if s.type == "inbound-rtp")


def test_data_channel_survives_three_round_trips(env):
    """An ordered, reliable channel carries a numbered message every 20 ms
    each way (the client's, and the agent's echo of each) while relayd moves
    the call A→B→A three times: every message arrives exactly once and in
    order, the audio loses at most one packet per switch, no renegotiation."""
    lab, svc, ctl = env
    switches = []

    async def six_moves(pc, rep):
        await audio_flowing(pc)
        call_id = rep.call_url.rsplit("/", 1)[1]
        for i in range(6):
            call = await asyncio.to_thread(svc.call, call_id)
            target = 2 if call["transceiver_id"] == 1 else 1
            before = await _lost(pc)
            rep.mark(f"switch{i + 1}")
            res = await asyncio.to_thread(ctl.request, "POST", f"/sessions/{call_id}/migrate", {"to": target})
            await asyncio.sleep(1.0)  # pacing: a switch a second, the window its audio loss is counted over

            def carried(target=target, conn_id=call["conn_id"]) -> dict | None:
                moved = transceiver_call(svc, target, conn_id)
                return moved if moved["migration"]["data_channels"]["rx_records"] > 10 else None

            moved = await eventually_async(lambda: asyncio.to_thread(carried), 10,
                                           what=f"transceiver {target} to carry the data channels (> 10 records)")
            switches.append({"res": res, "lost": await _lost(pc) - before,
                             "data": moved["migration"]["data_channels"] if moved else None})

    rep = run_call(lab, duration=1.0, messages=2, dc_interval=0.020, on_connected=six_moves)
    assert_untouched(rep)
    assert [s["res"]["outcome"] for s in switches] == ["moved"] * 6, [s["res"] for s in switches]
    for i, s in enumerate(switches):
        assert s["lost"] <= 1, f"switch {i + 1}: {s['lost']} audio packets lost"
        assert s["data"] is not None and s["data"]["rx_unauthenticated"] == 0 and s["data"]["rx_records"] > 10, s
    sent = len(rep.dc_numbered_sent_at)
    assert sent > 250
    # Client → agent → client: every message exactly once, in order, through six owners.
    assert [n for n, _ in rep.dc_numbered_echoes] == list(range(sent))
    delays = [t - rep.dc_numbered_sent_at[n] for n, t in rep.dc_numbered_echoes]
    print(f"\n{sent} numbered messages each way over 6 switches: worst echo delay {max(delays) * 1000:.0f} ms, "
          f"audio lost per switch {[s['lost'] for s in switches]}")


def test_drain_moves_every_call(env):
    lab, svc, ctl = env
    results = {}

    def all_active() -> bool:
        return sum(c["state"] == "active" for c in svc.calls()) >= 3

    async def drain_later(pc, rep):
        await audio_flowing(pc)
        await eventually_async(lambda: asyncio.to_thread(all_active), 20, what="all three calls active")
        rep.mark("drain")
        if "res" not in results:
            results["res"] = "pending"
            results["res"] = await asyncio.to_thread(ctl.request, "POST", "/transceivers/1/drain", {})

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futs = [pool.submit(run_call, lab, duration=6.0, messages=3, on_connected=drain_later) for _ in range(3)]
        reps = [f.result() for f in futs]
    moved = [r for r in results["res"]["results"] if r["outcome"] == "moved"]
    assert len(moved) == len(results["res"]["results"]) >= 1, results
    for rep in reps:
        assert_untouched(rep)
        assert rep.rtp_packets_lost <= 1
        assert rep.tone_ratio_after["drain"] > 50
    ts = {t["id"]: t for t in svc.transceivers()}
    assert ts[1]["draining"] is True
    ctl.request("POST", "/transceivers/1/undrain", {})


def test_drain_of_a_call_past_its_sequence_wrap(env, monkeypatch):
    """The client's sender starts 50 packets before 65535, so by the drain
    its stream has wrapped (rollover counter 1 at the owner). The drain moves
    the call anyway and the new owner decrypts the client from the first packet."""
    import aiortc.rtcrtpsender

    lab, svc, ctl = env
    monkeypatch.setattr(aiortc.rtcrtpsender, "random_sequence_number", lambda: 0xFFFF - 50)
    seen = {}

    async def drain_after_wrap(pc, rep):
        # 60 packets of the agent's echo back: the owner has had > 50 of ours, past the wrap.
        await audio_flowing(pc, 60)
        call = await asyncio.to_thread(call_of, svc, rep)
        seen["before"] = await asyncio.to_thread(transceiver_call, svc, call["transceiver_id"], call["conn_id"])
        rep.mark("drain")
        seen["res"] = await asyncio.to_thread(ctl.request, "POST", f"/transceivers/{call['transceiver_id']}/drain", {})
        seen["to"] = 2 if call["transceiver_id"] == 1 else 1

        def decrypting() -> dict | None:
            after = transceiver_call(svc, seen["to"], call["conn_id"])
            return after if after["migration"]["rx_decrypted"] > 40 else None

        seen["after"] = await eventually_async(lambda: asyncio.to_thread(decrypting), 10,
                                               what=f"transceiver {seen['to']} to decrypt > 40 of the client's packets")
        await asyncio.to_thread(ctl.request, "POST", f"/transceivers/{call['transceiver_id']}/undrain", {})

    rep = run_call(lab, duration=4.5, messages=3, on_connected=drain_after_wrap)
    assert [r["outcome"] for r in seen["res"]["results"]] == ["moved"], seen["res"]
    assert_untouched(rep)
    assert rep.rtp_packets_lost <= 1 and rep.tone_ratio_after["drain"] > 50
    m = seen["after"]["migration"]
    assert m["rx_decrypted"] > 40 and m["rx_undecryptable"] <= 1, m


def test_old_owner_killed_after_switch(env):
    lab, svc, ctl = env
    info = {}

    async def migrate_and_kill(pc, rep):
        await audio_flowing(pc)
        call = await asyncio.to_thread(call_of, svc, rep)
        old = call["transceiver_id"]
        target = 2 if old == 1 else 1
        info["res"] = await asyncio.to_thread(ctl.request, "POST", f"/sessions/{call['call_id']}/migrate", {"to": target})
        info["old"] = old
        await asyncio.to_thread(svc.stop_one, f"tx{old}", signal.SIGKILL)
        rep.mark("killed")

    rep = run_call(lab, duration=5.0, messages=5, on_connected=migrate_and_kill)
    try:
        assert info["res"]["outcome"] == "moved"
        assert_untouched(rep)
        assert rep.rtp_packets_lost <= 1
        assert rep.tone_ratio_after["killed"] > 50
    finally:
        svc.start_transceiver(info["old"])
        svc.wait_transceivers(2, 20)


def test_migration_to_unhealthy_target_is_refused(env):
    lab, svc, ctl = env
    info = {}

    async def try_migrate(pc, rep):
        call = await asyncio.to_thread(call_of, svc, rep)
        target = 2 if call["transceiver_id"] == 1 else 1
        proc = svc.procs[f"tx{target}"]
        proc.send_signal(signal.SIGSTOP)  # it stops heart-beating
        try:
            await eventually_async(
                lambda: asyncio.to_thread(lambda: not {t["id"]: t for t in svc.transceivers()}[target]["healthy"]),
                10, what=f"transceiver {target} (stopped) to be marked unhealthy")
            rep.mark("refused")
            try:
                await asyncio.to_thread(ctl.request, "POST", f"/sessions/{call['call_id']}/migrate", {"to": target})
            except ControlError as exc:
                info["error"] = str(exc)
            # A second, unknown-call request is refused too.
            try:
                await asyncio.to_thread(ctl.request, "POST", "/sessions/nosuchcall/migrate", {"to": target})
            except ControlError as exc:
                info["unknown"] = str(exc)
        finally:
            proc.send_signal(signal.SIGCONT)

    rep = run_call(lab, duration=3.0, messages=3, on_connected=try_migrate)
    assert "unhealthy" in info.get("error", ""), info
    assert "unknown call" in info.get("unknown", ""), info
    assert_untouched(rep)
    assert rep.rtp_packets_lost <= 1
    assert rep.tone_ratio_after["refused"] > 50
    assert rep.dc_echoed == rep.dc_sent  # it never moved: data channel intact


def relayctl(svc: Services, *args: str):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "cli.relayctl", "--socket", svc.config["control_socket"], *args],
                          capture_output=True, text=True, timeout=60)


def test_relayctl_migrate_and_its_errors(env):
    lab, svc, ctl = env
    out = {}

    async def via_cli(pc, rep):
        await audio_flowing(pc)
        call = await asyncio.to_thread(call_of, svc, rep)
        target = 2 if call["transceiver_id"] == 1 else 1
        rep.mark("switch")
        out["moved"] = await asyncio.to_thread(relayctl, svc, "migrate", call["call_id"], "--to", str(target), "--json")
        out["same"] = await asyncio.to_thread(relayctl, svc, "migrate", call["call_id"], "--to", str(target))
        out["text"] = await asyncio.to_thread(relayctl, svc, "migrate", call["call_id"], "--to",
                                              str(call["transceiver_id"]))

    rep = run_call(lab, duration=4.0, messages=4, on_connected=via_cli)
    moved = json.loads(out["moved"].stdout)
    assert out["moved"].returncode == 0 and moved["outcome"] == "moved"
    assert out["same"].returncode == 1 and f"already on transceiver {moved['target']}" in out["same"].stderr
    assert out["text"].returncode == 0 and f"moved from transceiver {moved['target']}" in out["text"].stdout
    assert rep.rtp_packets_lost <= 2 and rep.tone_ratio_after["switch"] > 50  # two switches
    for args, message in ((["migrate", "nosuchcall", "--to", "1"], "unknown call nosuchcall"),
                          (["migrate", "x", "--to", "0"], "Invalid value"),
                          (["drain", "77"], "unknown transceiver 77")):
        proc = relayctl(svc, *args)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
