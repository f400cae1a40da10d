"""Call records from real calls in a lab (relayd alone, two transceivers):

- 3 % of the client's RTP dropped on its uplink (nftables in the client's
  namespace) and a migration mid-call: the record counts what was dropped on
  the client ⇄ relay hop (the kernel's sequence accounting) and on the whole
  path (the transceivers' RTCP), within 1 percentage point of the packets
  sent, none on the relay ⇄ transceiver hop, and has the move with its gap;
- a call that spans a relayd restart gets one record: relayd (its registry
  in memory) is stopped with SIGTERM, or killed, mid-call and started again; the call
  rides through on the fast path, hangs up, its adopted flows idle out, and
  the record written then is the call's only one, from its first creation.

nftables (``numgen random``, installed for the NAT tests) drops the packets:
the same random drop as iptables' ``statistic`` match.
"""

from __future__ import annotations

import asyncio
import json
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
from tests.support.lab_calls import audio_flowing, migrate_away
from tests.support.waiting import eventually

# realtime: the call runs against the wall clock.
pytestmark = [pytest.mark.netns, pytest.mark.realtime]


LOSS_TABLE = "splitrelay_test_loss"


def drop_client_rtp(lab, per_mille: int) -> None:
    """Drop that share of the client's RTP (version 2, a dynamic payload type: its
    Opus; RTCP's types are 200-207) towards the relay."""
    ruleset = f"""table inet {LOSS_TABLE} {{
  chain output {{
    type filter hook output priority 0; policy accept;
    udp dport {lab.port} @th,64,2 2 @th,73,7 96-127 numgen random mod 1000 < {per_mille} counter drop
  }}
}}
"""
    lab.run(lab.client_ns, ["nft", "-f", "-"], input=ruleset)


def dropped(lab) -> int:
    out = json.loads(lab.run(lab.client_ns, ["nft", "-j", "list", "table", "inet", LOSS_TABLE]).stdout)
    return next(x["rule"]["expr"][-2]["counter"]["packets"] for x in out["nftables"] if "rule" in x)


def test_uplink_loss_and_a_migration_are_in_the_record(tmp_path: Path) -> None:
    with lab_ctx(prefix=f"cl{secrets.token_hex(3)}") as lab:
        svc = Services(lab, workdir=tmp_path)
        try:
            svc.start()
            svc.wait_transceivers(2, 15)
            records = Path(svc.config["records"]["path"])
            drop_client_rtp(lab, 30)
            moved: dict = {}

            async def migrate_mid_call(pc, rep) -> None:
                await audio_flowing(pc)
                _, _, result = await migrate_away(svc, svc.control, rep)
                moved.update(result)

            with NetnsExecutor(lab.client_ns) as ex:
                call = ex.call(asyncio.run, client_call(lab.signaling_url, duration=20.0, messages=3,
                                                         on_connected=migrate_mid_call))
            assert call.error is None and moved.get("outcome") == "moved", (call.error, moved)
            lost = dropped(lab)
            call_id = call.call_url.rsplit("/", 1)[1]
            (rec,) = eventually(lambda: [r for r in read_file(records) if r.call_id == call_id], 20,
                                what="the call's record")
            sent = call.rtp_packets_sent
            print(f"\nRTP sent {sent}, dropped {lost} ({lost / sent:.2%}); record: path uplink lost "
                  f"{rec.path.uplink.lost}, loss {rec.path.uplink.loss_fraction}, MOS {rec.mos}")
            assert rec.end_reason == "client-hangup"
            assert rec.transceivers == [moved["source"], moved["target"]]
            (move,) = rec.moves
            assert move.kind == "migration" and move.gap_ms is not None and 0 < move.gap_ms < 2000
            assert move.gap_ms == round(moved["switch_s"] * 1000, 3)
            assert 0.01 < lost / sent < 0.05  # what nftables did
            assert abs(rec.path.uplink.lost - lost) <= 0.01 * sent, (rec.path.uplink, lost, sent)
            assert abs(rec.path.uplink.loss_fraction - lost / sent) <= 0.01, (rec.path.uplink, lost, sent)
            assert rec.path.downlink.loss_fraction is not None and rec.path.downlink.loss_fraction < 0.01
            # The kernel saw the gaps in the client's sequence numbers: the loss is on the client's hop.
            print(f"client-relay uplink {rec.client_relay.uplink}; relay-transceiver uplink {rec.relay_transceiver.uplink}")
            assert abs(rec.client_relay.uplink.loss_fraction - lost / sent) <= 0.01, rec.client_relay.uplink
            assert rec.relay_transceiver.uplink.loss_fraction is not None
            assert rec.relay_transceiver.uplink.loss_fraction <= 0.01, rec.relay_transceiver.uplink
            assert rec.relay_transceiver.downlink.loss_fraction is not None
            assert rec.relay_transceiver.downlink.loss_fraction <= 0.01
            # Per hop RTT: the relay timed its hop on the installing check; the client's is the path's rest.
            assert rec.relay_transceiver.rtt_ms is not None and 0 < rec.relay_transceiver.rtt_ms < 500
            assert rec.path.rtt_ms is not None and rec.client_relay.rtt_ms is not None
            assert rec.mos.min is not None and rec.mos.min < 4.4  # the loss costs quality
        finally:
            svc.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_a_call_spanning_a_restart_has_one_record(tmp_path: Path, sig: signal.Signals) -> None:
    with lab_ctx(prefix=f"cr{secrets.token_hex(3)}") as lab:
        svc = Services(lab, workdir=tmp_path, idle_timeout=3.0)
        try:
            svc.start()
            records = Path(svc.config["records"]["path"])
            restart: dict = {}

            async def restart_relayd(pc, rep) -> None:
                await audio_flowing(pc)
                state = records.with_name(records.name + ".open.json")
                if sig == signal.SIGKILL:  # killed: what it wrote while it ran is all there is
                    await asyncio.to_thread(eventually, lambda: state.exists() and "accounts" in state.read_text(),
                                            10, what="the open call in relayd's state file")
                restart["at"] = time.time()
                restart["rc"] = await asyncio.to_thread(svc.stop_one, "relayd", sig)
                restart["kept"] = state.exists()
                await asyncio.to_thread(svc.start_relayd)
                await asyncio.to_thread(svc.wait_signaling, 30)

            with NetnsExecutor(lab.client_ns) as ex:
                call = ex.call(asyncio.run, client_call(lab.signaling_url, duration=4.0, messages=3,
                                                         on_connected=restart_relayd))
            assert restart["rc"] == (0 if sig == signal.SIGTERM else -signal.SIGKILL) and restart["kept"], restart
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
