"""relayd's graceful stop (SIGTERM): stop accepting, finish the placements in
flight (bounded), then stop with the forwarding left to the kernel.

1. The public listener's sockets close (a new connection is refused) and
   each open connection closes after the request it carries (a keep-alive
   connection cannot place another call); the ICE-TCP bridge accepts no more.
2. The placements in flight finish: a POST /v1/calls under way gets its
   answer, and each call placed but not yet in the kernel gets its first
   flow, because the slow path keeps running meanwhile (the client's ICE
   checks reach it right after the answer). Bounded by
   signaling.stop_deadline.
3. Relay.stop() then leaves XDP attached and the maps pinned: every
   installed call goes on forwarding with no relayd running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from aiohttp import web

from manager.relay.registry import Call, Registry
from manager.relay.slowpath import SlowPath

log = logging.getLogger(__name__)

POLL = 0.02  # pacing of the wait for the last flows: a client's checks come every 50 ms or so


async def stop_accepting(runner: web.AppRunner | None, tcp) -> None:
    """No new connection, and no new request on an open one."""
    if runner is not None:
        for site in list(runner.sites):
            await site.stop()
        if runner.server is not None:
            runner.server.pre_shutdown()
    if tcp is not None:
        tcp.stop_accepting()


class Placements:
    """The calls this relay placed itself (not another relay of its fleet),
    for the last WINDOW seconds: its own registry changes, seen placing."""

    WINDOW = 60.0

    def __init__(self, registry: Registry) -> None:
        self.placed: OrderedDict[int, float] = OrderedDict()  # conn_id -> monotonic time, oldest first
        registry.on_change(self._changed)

    def _changed(self, kind: str, record: dict) -> None:
        if kind != "call" or record.get("state") != "placing":
            return
        now = time.monotonic()
        self.placed[record["conn_id"]] = now
        self.placed.move_to_end(record["conn_id"])
        while self.placed and next(iter(self.placed.values())) < now - self.WINDOW:
            self.placed.popitem(last=False)


def in_flight(registry: Registry, slowpath: SlowPath | None, placements: Placements, recent_s: float) -> list[Call]:
    """This relay's placements not yet forwarded by its kernel: still placing,
    or answered less than `recent_s` ago (the slow path's pending timeout:
    its client's first check may yet come) with no installed flow."""
    def forwarded(conn_id: int) -> bool:
        if slowpath is None:
            return True
        return (any(leg.installed_at is not None for leg in slowpath.legs_of(conn_id))
                or bool(slowpath.stream_legs_of(conn_id)))

    now = time.monotonic()
    out = []
    for conn_id, placed_at in list(placements.placed.items()):
        call = registry.get_call(conn_id)
        if call is not None and (call.state == "placing"
                                 or (now - placed_at < recent_s and not forwarded(conn_id))):
            out.append(call)
    return out


async def finish_placements(runner: web.AppRunner | None, tcp, registry: Registry, slowpath: SlowPath | None,
                            placements: Placements, deadline_s: float, recent_s: float) -> list[Call]:
    """Steps 1 and 2 above; returns the calls still unsettled at the deadline."""
    t_end = time.monotonic() + deadline_s
    await stop_accepting(runner, tcp)
    log.info("stopping: no new calls; finishing the placements in flight (at most %g s)", deadline_s)
    if runner is not None and runner.server is not None:
        # The requests under way get their answers (cancelled at the deadline).
        await runner.server.shutdown(max(0.0, t_end - time.monotonic()))
    while (left := in_flight(registry, slowpath, placements, recent_s)) and time.monotonic() < t_end:
        await asyncio.sleep(POLL)
    if left:
        log.warning("stop deadline (%g s): %d placements did not reach the kernel (%s)", deadline_s, len(left),
                    ", ".join(c.call_id for c in left[:5]))
    else:
        log.info("placements in flight finished")
    return left
