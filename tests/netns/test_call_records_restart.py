"""A call that spans a relayd restart gets one record: relayd (alone, its
registry in memory) is stopped with SIGTERM mid-call and started again; the
call rides through on the fast path, hangs up, its adopted flows idle out,
and the record written then is the call's only one, from its first creation."""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
from pathlib import Path

import pytest

from manager.lab.client import client_call
from manager.lab.lifecycle import lab as lab_ctx
from manager.lab.netns import NetnsExecutor
from manager.lab.services import Services
from manager.relay.call_records import read_file
from tests.support.lab_calls import audio_flowing
from tests.support.waiting import eventually

# realtime: the call runs against the wall clock.
pytestmark = [pytest.mark.netns, pytest.mark.realtime]


def test_a_call_spanning_a_restart_has_one_record(tmp_path: Path) -> None:
    with lab_ctx(prefix=f"cr{secrets.token_hex(3)}") as lab:
        svc = Services(lab, workdir=tmp_path, idle_timeout=3.0)
        try:
            svc.start()
            records = Path(svc.config["records"]["path"])
            restart: dict = {}

            async def restart_relayd(pc, rep) -> None:
                await audio_flowing(pc)
                restart["at"] = time.time()
                restart["rc"] = await asyncio.to_thread(svc.stop_one, "relayd", signal.SIGTERM)
                restart["kept"] = records.with_name(records.name + ".open.json").exists()
                await asyncio.to_thread(svc.start_relayd)
                await asyncio.to_thread(svc.wait_signaling, 30)

            with NetnsExecutor(lab.client_ns) as ex:
                call = ex.call(asyncio.run, client_call(lab.signaling_url, duration=4.0, messages=3,
                                                         on_connected=restart_relayd))
            assert restart["rc"] == 0 and restart["kept"], restart
            assert call.error is None and call.dc_echoed == call.dc_sent == 3
            call_id = call.call_url.rsplit("/", 1)[1]
            found = eventually(lambda: [r for r in read_file(records) if r.call_id == call_id], 40,
                               what="the call's record after its flows idled out")
            (rec,) = found
            assert rec.created_at < restart["at"] < rec.ended_at, (rec.created_at, restart["at"], rec.ended_at)
            assert rec.end_reason == "idle-timeout"  # the restarted relayd never knew the call: its flows went idle
            assert rec.client_relay.uplink.packets > 50 and rec.client_relay.downlink.packets > 50
            assert rec.path.uplink.loss_fraction is not None and rec.mos.min is not None
            assert [r.call_id for r in read_file(records)].count(call_id) == 1
        finally:
            svc.stop()
