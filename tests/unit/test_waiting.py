"""The one wait helper: it returns the predicate's value, names what it
awaited when the deadline passes, and ends at once on Hopeless."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.support.waiting import Hopeless, NotYet, eventually, eventually_async


def test_returns_the_first_truthy_value_and_retries_exceptions() -> None:
    calls = []

    def predicate() -> int:
        calls.append(1)
        if len(calls) < 3:
            raise KeyError("not there yet")
        return len(calls)

    assert eventually(predicate, 1, what="three calls", interval=0.001) == 3


def test_the_failure_names_what_was_awaited_and_the_last_value() -> None:
    with pytest.raises(NotYet, match=r"waiting for the answer \(last: 0\)"):
        eventually(lambda: 0, 0.05, what="the answer", interval=0.01)
    with pytest.raises(NotYet, match=r"the key \(last: KeyError\('k'\)\)"):
        eventually(lambda: {}["k"], 0.05, what="the key", interval=0.01)


def test_hopeless_ends_the_wait_at_once() -> None:
    def gone() -> bool:
        raise Hopeless("the process exited")

    t0 = time.monotonic()
    with pytest.raises(Hopeless, match="exited"):
        eventually(gone, 10)
    with pytest.raises(Hopeless):
        asyncio.run(eventually_async(gone, 10))
    assert time.monotonic() - t0 < 5


def test_eventually_async_awaits_a_coroutine_predicate() -> None:
    async def scenario() -> str:
        box: list[str] = []
        asyncio.get_running_loop().call_later(0.02, box.append, "done")

        async def ready() -> str | None:
            return box[0] if box else None

        return await eventually_async(ready, 1, what="the callback")

    assert asyncio.run(scenario()) == "done"
