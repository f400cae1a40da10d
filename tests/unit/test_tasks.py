"""TaskSet (manager/protocol/tasks.py): background tasks kept until done, a
failure logged rather than lost, everything cancelled on close."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from manager.protocol.tasks import TaskSet


def test_a_task_that_raises_is_logged_with_its_owner(caplog: pytest.LogCaptureFixture) -> None:
    async def boom() -> None:
        raise RuntimeError("lost packet")

    async def main() -> None:
        tasks = TaskSet("call 7")
        tasks.spawn(boom())
        await tasks.wait()
        assert len(tasks) == 0

    with caplog.at_level(logging.ERROR, logger="manager.protocol.tasks"):
        asyncio.run(main())
    [rec] = [r for r in caplog.records if "background task" in r.getMessage()]
    assert rec.getMessage().startswith("call 7: background task")
    assert rec.exc_info is not None and isinstance(rec.exc_info[1], RuntimeError)


def test_the_owner_may_be_named_when_the_failure_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    class Call:
        conn_id = 0

        def __init__(self) -> None:
            self.tasks = TaskSet(lambda: f"call {self.conn_id}")

    async def boom() -> None:
        raise ValueError("x")

    async def main() -> None:
        call = Call()
        call.conn_id = 42  # set after the set was made, as CallHandle's subclasses do
        call.tasks.spawn(boom())
        await call.tasks.wait()

    with caplog.at_level(logging.ERROR, logger="manager.protocol.tasks"):
        asyncio.run(main())
    assert any(r.getMessage().startswith("call 42: background task") for r in caplog.records)


def test_tasks_are_kept_until_done_and_cancelled_on_close() -> None:
    started, cancelled = [], []

    async def forever(i: int) -> None:
        started.append(i)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(i)
            raise

    async def main() -> None:
        tasks = TaskSet("slow path")
        for i in range(3):
            tasks.spawn(forever(i))
        gc.collect()  # the loop holds tasks weakly: the set must keep them
        await asyncio.sleep(0)  # pacing: one loop turn, so every task starts
        assert sorted(started) == [0, 1, 2] and len(tasks) == 3
        await tasks.close()
        assert len(tasks) == 0

    asyncio.run(main())
    assert sorted(cancelled) == [0, 1, 2]


def test_cancel_spares_the_task_that_calls_it() -> None:
    async def main() -> list[str]:
        tasks = TaskSet("call 1")
        seen: list[str] = []

        async def other() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                seen.append("other cancelled")
                raise

        async def ender() -> None:
            await asyncio.sleep(0)  # pacing: let `other` start first
            tasks.cancel()  # a call ending itself from one of its own tasks
            await asyncio.sleep(0)  # one loop turn: the cancellation reaches `other`
            seen.append("ender ran on")

        tasks.spawn(other())
        ender_task = tasks.spawn(ender())
        await ender_task
        await tasks.wait()
        return seen

    assert asyncio.run(main()) == ["other cancelled", "ender ran on"]


def test_a_cancelled_task_is_not_logged_as_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        tasks = TaskSet("migrator")
        tasks.spawn(asyncio.sleep(3600))  # a task that only ends by cancellation
        await tasks.close()

    with caplog.at_level(logging.ERROR):
        asyncio.run(main())
    assert not [r for r in caplog.records if "background task" in r.getMessage()]
