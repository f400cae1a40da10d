"""A call's RTCP figures on the transceiver (rtcp_stats): measured on both of
its paths (aiortc, and the media engine after the hand-over), the client's
uplink loss counted as the relay stand-in dropped it, MOS lower the more is
lost, and the figures still readable after the call ended.

Loopback, through the userspace relay stand-in (tests/support/transceiver_calls.py),
which drops a seeded fraction of the client's RTP on its way to the transceiver.
"""

from __future__ import annotations

import random

import pytest

from manager.transceiver.transceiver import Transceiver
from tests.support.transceiver_calls import ClientCall, Forwarder, run
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
            if not engine:
                assert figures[0]["rtt_ms"] is not None and figures[0]["rtt_ms"] < 100  # aiortc sends SRs
            assert figures[0]["first_rtp_sent_at"] >= figures[0]["created_at"]
            await tx.close_call(10, "test over")
            ended = tx.call_quality(10)
            assert ended["ended"] is True and ended["end_reason"] == "test over"
            assert ended["uplink"]["reports"] >= figures[0]["uplink"]["reports"]
            for client in clients:
                await client.close()

    run(scenario(), timeout=60)
