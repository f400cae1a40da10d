"""A draining transceiver takes no call, neither placed nor imported
(manager.transceiver.drain), and one with nothing to move leaves at once."""

from __future__ import annotations

import time

import pytest

from manager.transceiver.drain import drain
from manager.transceiver.errors import CapacityExceeded
from manager.transceiver.transceiver import Transceiver
from tests.support.transceiver_calls import UFRAG_A, ClientCall, run


def test_draining_refuses_new_calls_and_imports() -> None:
    async def scenario() -> None:
        async with Transceiver(1, capacity=4) as tx:
            client = ClientCall(440)
            offer = await client.offer()
            t0 = time.monotonic()
            assert await drain(tx, [], deadline_s=30) == 0  # nothing to move: no wait
            assert time.monotonic() - t0 < 1 and tx.draining
            with pytest.raises(CapacityExceeded, match="draining"):
                await tx.create_call(1, UFRAG_A, offer)
            with pytest.raises(CapacityExceeded, match="draining"):
                await tx.import_call(2, {})
            assert tx.calls() == [] and tx.health()["draining"]
            await client.close()

    run(scenario())
