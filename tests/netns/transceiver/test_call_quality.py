"""A call's RTCP figures on the transceiver (rtcp_stats): measured on both of
its paths (aiortc, and the media engine after the hand-over), the client's
uplink loss counted as the relay stand-in dropped it, MOS lower the more is
lost, and the figures still readable after the call ended. The engine's own
RTCP (rtcp_sender): the client gets our sender reports and cites them, so an
engine call measures its RTT; a hang-up sends the call's BYE.

Loopback, through the userspace relay stand-in (tests/support/transceiver_calls.py),
which drops a seeded fraction of the client's RTP on its way to the transceiver.
"""

from __future__ import annotations

import random

import pytest
from aiortc.rtp import is_rtcp

from manager.protocol import rtcp
from manager.transceiver.imported_call import ImportedCall
from manager.transceiver.transceiver import Transceiver
from tests.support.transceiver_calls import ClientCall, Forwarder, run, srtp_session
from tests.support.waiting import eventually_async

# realtime: the figures count media against the wall clock.
pytestmark = pytest.mark.realtime

UFRAGS = ["AAAAbbbbCCCCddddEEEEff00", "AAAAbbbbCCCCddddEEEEff01", "AAAAbbbbCCCCddddEEEEff02"]
LOSSES = (0.0, 0.03, 0.10)


def lossy(loss: float, seed: int) -> type[Forwarder]:
    class Lossy(Forwarder):
        """Drops `loss` of the client's RTP towards the transceiver (RTCP, STUN and DTLS pass)."""

        rng = random.Random(seed)
        dropped = 0
        passed = 0

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            is_rtp = 127 < data[0] < 192 and not 192 <= data[1] <= 223
            if is_rtp and self.legs:
                if self.rng.random() < loss:
                    type(self).dropped += 1
                    return
                type(self).passed += 1
            super().datagram_received(data, addr)

    return Lossy


@pytest.mark.parametrize("engine", [False, True], ids=["aiortc", "engine"])
def test_uplink_loss_is_measured_and_mos_falls_with_it(engine: bool) -> None:
    async def scenario() -> None:
        async with Transceiver(1, capacity=4, media_engine=engine) as tx:
            clients, forwarders = [], []
            for i, loss in enumerate(LOSSES):
                fwd = lossy(loss, seed=i)
                client = ClientCall(440)
                await client.place(tx, 10 + i, UFRAGS[i], forwarder=fwd)
                clients.append(client)
                forwarders.append(fwd)
            for client in clients:
                await client.wait_connected()

            def reported() -> bool:
                return all(tx.call_quality(10 + i)["uplink"]["reports"] >= 8 and
                           tx.call_quality(10 + i)["downlink"]["reports"] >= 1 for i in range(len(LOSSES)))

            await eventually_async(reported, 30, what="reports both ways on every call")
            figures = [tx.call_quality(10 + i) for i in range(len(LOSSES))]
            for loss, fwd, fig in zip(LOSSES, forwarders, figures, strict=True):
                up = fig["uplink"]
                sent = fwd.dropped + fwd.passed
                if engine:  # counted here, live, since the hand-over
                    assert up["loss_fraction"] == pytest.approx(fwd.dropped / sent, abs=0.015), (loss, up)
                else:  # aiortc's reports: to within the packets in flight at the last one
                    assert abs(up["cumulative_lost"] - fwd.dropped) <= 8 + 0.1 * fwd.dropped, (loss, up)
                    assert up["loss_fraction"] == pytest.approx(fwd.dropped / sent, abs=0.025), (loss, up)
                assert fig["downlink"]["fraction_lost"] == 0.0
                assert fig["mos"]["samples"] >= 1
            # The average over the samples: one short interval's loss can make a call's minimum lower
            # at 3 % than at 10 %.
            mos = [fig["mos"]["avg"] for fig in figures]
            assert mos[0] > mos[1] > mos[2], mos
            # Both paths send sender reports (aiortc's, the engine's rtcp_sender) and read the client's.
            assert figures[0]["rtt_ms"] is not None and 0 < figures[0]["rtt_ms"] < 100
            assert figures[0]["first_rtp_sent_at"] >= figures[0]["created_at"]
            await tx.close_call(10, "test over")
            ended = tx.call_quality(10)
            assert ended["ended"] is True and ended["end_reason"] == "test over"
            assert ended["uplink"]["reports"] >= figures[0]["uplink"]["reports"]
            for client in clients:
                await client.close()

    run(scenario(), timeout=60)


async def _remote_outbound(client: ClientCall) -> dict | None:
    """The client's view of our sender reports (aiortc's receiver records each SR it gets)."""
    report = await client.pc.getStats()
    return next(({"packets": s.packetsSent, "bytes": s.bytesSent, "at": s.remoteTimestamp, "ssrc": s.ssrc}
                 for s in report.values() if s.type == "remote-outbound-rtp"), None)


def test_engine_call_sends_sender_reports_and_measures_its_rtt() -> None:
    """An engine call sends SR + SDES (SRTCP with the call's keys), the
    client's receiver takes them (remote-outbound figures), its reports cite
    them back, and the call's RTT is measured from them (LSR/DLSR)."""

    async def scenario() -> None:
        async with Transceiver(1, capacity=2, media_engine=True) as tx:
            client = ClientCall(440)
            await client.place(tx, 10, UFRAGS[0])
            await client.wait_connected()
            await eventually_async(lambda: isinstance(tx._calls.get(10), ImportedCall), 10,
                                   what="the hand-over to the engine")
            call = tx._calls[10]
            assert isinstance(call, ImportedCall)
            # The RTT measured on aiortc's path before the hand-over is carried
            # over with the figures: forget it, so what follows is the engine's.
            call.quality.rtt_ms = None
            before = await _remote_outbound(client)
            handed_over_at = call.stats.imported_at
            await eventually_async(lambda: call.quality.rtt_ms is not None, 15, what="an RTT from the engine's SR")
            rtt = call.quality.rtt_ms
            assert 0 < rtt < 250, rtt  # loopback: the loop's scheduling, not the network

            async def client_took_ours() -> bool:
                seen = await _remote_outbound(client)
                return seen is not None and seen["at"].timestamp() > handed_over_at and (
                    before is None or seen["packets"] > before["packets"])

            await eventually_async(client_took_ours, 15, what="the client's receiver took the engine's SR")
            seen = await _remote_outbound(client)
            media = call.media
            assert seen["ssrc"] == media.plan.local_ssrc and seen["packets"] <= media.tx_stream.packets
            assert media.stats.tx_rtcp >= 1 and tx.call_quality(10)["rtt_ms"] == rtt
            # What went out: SRTCP under the call's key, each a compound SR (with a block
            # about the client's stream) + SDES with the call's CNAME.
            state = tx.export_call_state(10)
            srtp = state["srtp"]
            session = srtp_session(srtp["profile"], srtp["tx_key"])
            assert client.fwd is not None
            ours = []
            for p in client.fwd.to_client:
                if is_rtcp(p):
                    try:
                        ours.append(rtcp.parse(session.unprotect_rtcp(p)))
                    except Exception:  # aiortc's, before the hand-over: a stream this session has not seen
                        continue
            engine_sr = [c for c in ours if c.sdes and c.sdes[0].cnames[0][1] == media.rtcp.cname]
            assert len(engine_sr) == media.stats.tx_rtcp
            client_ssrc = next(iter(media.rx_streams))
            for compound in engine_sr:
                (sr,) = compound.reports
                assert sr.ssrc == media.plan.local_ssrc and sr.sender is not None
                assert [b.ssrc for b in sr.blocks] == [client_ssrc] and sr.blocks[0].fraction_lost == 0
                assert compound.byes == []  # the call goes on
            # The export carries the SRTCP packets sent on our SSRC, for the next owner.
            assert state["rtcp"]["tx_srtcp_index"][str(media.plan.local_ssrc)] == media.rtcp.srtcp_used
            assert media.rtcp.srtcp_used >= media.stats.tx_rtcp  # and aiortc's before the hand-over, if any
            # The relay hangs up: the call's last SRTCP is SR + SDES + BYE for our SSRC (RFC 3550 6.6).
            seen_before = len(client.fwd.to_client)
            await tx.close_call(10)

            def after_hang_up() -> list[rtcp.Compound]:
                assert client.fwd is not None
                fresh = srtp_session(srtp["profile"], srtp["tx_key"])  # (a session refuses a replay)
                return [rtcp.parse(fresh.unprotect_rtcp(p)) for p in client.fwd.to_client[seen_before:]
                        if is_rtcp(p)]

            await eventually_async(after_hang_up, 5, what="the call's last SRTCP at the client")
            last = after_hang_up()
            assert [c.byes for c in last] == [[rtcp.Bye((media.plan.local_ssrc,))]]
            assert last[0].reports[0].sender.packets == media.tx_stream.packets and media.stats.tx_bye == 1
            await client.close()

    run(scenario(), timeout=60)
