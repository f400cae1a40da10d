"""Draining a transceiver before it leaves.

relayd places no new call on it (the registry marks it draining) and moves
each of its calls to another healthy transceiver by live migration
(manager.relay.migration: audio and data channels carry over), until it
holds none or a deadline passes. A migration still under way at the
deadline is rolled back; every call still on the transceiver then ends with
reason `drain-deadline`, counted in splitrelay_drain_deadline_calls_total.

A transceiver asks for its own drain on SIGTERM, over the internal listener
(mutual TLS, as itself):

    POST /v1/transceivers/{id}/drain   {"deadline_s": s} -> 202 progress

an operator over the control socket (`relayctl drain N --wait`):

    POST /drains                       {"transceiver": id, "deadline_s": s} -> 202 progress
    GET  /drains/{id}                  -> progress (404: never drained here)

One drain per transceiver at a time: a second request joins the running one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import Counter, Gauge

from manager import pki
from manager.protocol.api import ApiError
from manager.protocol.http import json_body, json_error
from manager.relay.migration import MigrationError, MigrationResult, Migrator
from manager.relay.registration import peer_identity
from manager.relay.registry import Call, PlacementError, Registry, UnknownTransceiverError
from manager.relay.transceiver_client import TransceiverClient, TransceiverError

log = logging.getLogger(__name__)

DEADLINE_REASON = "drain-deadline"
MAX_DEADLINE = 3600.0
MOVES_AT_ONCE = 4  # migrations of one drain in parallel: each is a few round trips, mostly waiting
RETRY_PAUSE = 0.25  # a round that could not move everything tries again after this


def parse_deadline(body: dict) -> float:
    value = body.get("deadline_s")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_DEADLINE:
        raise ApiError(400, f"deadline_s must be a number of seconds in (0, {MAX_DEADLINE:g}], got {value!r}")
    return float(value)


@dataclass
class Drain:
    """One transceiver's drain and its progress."""

    transceiver_id: int
    deadline_s: float
    requested_by: str
    started: float = field(default_factory=time.monotonic)
    state: str = "draining"  # then "drained" (no call left) or "deadline" (the rest ended)
    moved: int = 0
    failed_attempts: int = 0
    ended: list[int] = field(default_factory=list)  # conn_ids ended at the deadline
    problem: str | None = None  # why the last attempt could not move a call
    last: dict[int, MigrationResult] = field(default_factory=dict)  # conn_id -> its latest attempt
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def deadline(self) -> float:
        return self.started + self.deadline_s

    def view(self, calls_left: int) -> dict:
        now = time.monotonic()
        return {
            "transceiver": self.transceiver_id, "state": self.state, "requested_by": self.requested_by,
            "deadline_s": self.deadline_s, "elapsed_s": round(now - self.started, 3),
            "remaining_s": round(max(0.0, self.deadline - now), 3) if self.state == "draining" else 0.0,
            "calls_left": calls_left, "moved": self.moved, "failed_attempts": self.failed_attempts,
            "ended_at_deadline": len(self.ended), "problem": self.problem,
            "results": [r.to_dict() for r in self.last.values()],
        }


class Drains:
    """The drains this relay runs, one per transceiver."""

    def __init__(self, registry: Registry, migrator: Migrator, client: TransceiverClient, *,
                 metrics_registry=None, can_move: Callable[[], str | None] = lambda: None) -> None:
        self.registry = registry
        self.migrator = migrator
        self.client = client
        self.can_move = can_move  # why calls cannot be moved now (a fleet without its Redis), or None
        self.jobs: dict[int, Drain] = {}
        self._left: set[int] = set()  # transceivers whose own drain (SIGTERM) finished: they have exited
        self._tasks: set[asyncio.Task] = set()
        self.deadline_ends = Counter("splitrelay_drain_deadline_calls",
                                     "Calls ended at a transceiver drain's deadline (they could not move in time)",
                                     registry=metrics_registry)
        self.finished = Counter("splitrelay_drains", "Transceiver drains by outcome", ["outcome"],
                                registry=metrics_registry)
        draining = Gauge("splitrelay_transceivers_draining", "Transceivers taking no new calls (draining)",
                         registry=metrics_registry)
        draining.set_function(lambda: sum(t.draining for t in registry.transceivers()))

    def registered(self, transceiver_id: int) -> None:
        """A transceiver registered: after its own drain, that is its next
        process (a restarted pod), which takes calls again."""
        if transceiver_id in self._left:
            self._left.discard(transceiver_id)
            self.registry.set_draining(transceiver_id, False)

    def calls_on(self, transceiver_id: int) -> list[Call]:
        return [c for c in self.registry.calls() if c.transceiver_id == transceiver_id]

    def view(self, job: Drain) -> dict:
        return job.view(len(self.calls_on(job.transceiver_id)))

    def start(self, transceiver_id: int, deadline_s: float, requested_by: str) -> Drain:
        """Start draining (or join the running drain); raises ApiError."""
        try:
            self.registry.get_transceiver(transceiver_id)
        except UnknownTransceiverError:
            raise ApiError(404, f"unknown transceiver {transceiver_id}") from None
        job = self.jobs.get(transceiver_id)
        if job is not None and not job.done.is_set():
            return job
        if (problem := self.can_move()) is not None:
            raise ApiError(503, problem)
        job = self.jobs[transceiver_id] = Drain(transceiver_id, deadline_s, requested_by)
        self.registry.set_draining(transceiver_id)
        log.info("transceiver %d draining (asked by %s): %d calls to move within %g s", transceiver_id,
                 requested_by, len(self.calls_on(transceiver_id)), deadline_s)
        task = asyncio.get_running_loop().create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def close(self) -> None:
        """relayd stopping: running drains end now (their calls stay where they are)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, job: Drain) -> None:
        mover = asyncio.ensure_future(self._move_all(job))
        try:
            await asyncio.wait_for(asyncio.shield(mover), max(0.0, job.deadline - time.monotonic()))
        except TimeoutError:
            mover.cancel()  # a migration before its flip rolls back
            await asyncio.gather(mover, return_exceptions=True)
        except asyncio.CancelledError:
            mover.cancel()
            raise
        await self._end_remaining(job)
        if job.requested_by == f"transceiver {job.transceiver_id}":
            self._left.add(job.transceiver_id)
        job.done.set()
        self.finished.labels(job.state).inc()

    async def _move_all(self, job: Drain) -> None:
        gate = asyncio.Semaphore(MOVES_AT_ONCE)
        while calls := self.calls_on(job.transceiver_id):
            todo = [c for c in calls if c.state == "active" and c.conn_id not in self.migrator.running]
            moved = await asyncio.gather(*(self._move(job, c, gate) for c in todo))
            if not todo or not all(moved):
                # Pacing: a call still being placed, or no room elsewhere yet (a
                # transceiver may come back or free a slot before the deadline).
                await asyncio.sleep(RETRY_PAUSE)

    async def _move(self, job: Drain, call: Call, gate: asyncio.Semaphore) -> bool:
        async with gate:
            if self.registry.get_call(call.conn_id) is not call:
                return True  # ended (a hang-up) meanwhile
            try:
                target = self.registry.place(exclude=[job.transceiver_id])
            except PlacementError as exc:
                job.problem = f"no other transceiver can take calls: {exc}"
                return False
            try:
                result = await self.migrator.migrate(call.conn_id, target.id)
            except MigrationError as exc:
                job.failed_attempts += 1
                job.problem = str(exc)
                job.last[call.conn_id] = MigrationResult(call.call_id, call.conn_id, job.transceiver_id, target.id,
                                                         "failed", str(exc))
                return False
            job.moved += 1
            job.last[call.conn_id] = result
            return True

    async def _end_remaining(self, job: Drain) -> None:
        left = self.calls_on(job.transceiver_id)
        took = time.monotonic() - job.started
        if not left:
            job.state = "drained"
            log.info("transceiver %d drained: %d calls moved in %.1f s", job.transceiver_id, job.moved, took)
            return
        job.state = "deadline"
        log.warning("transceiver %d: drain deadline (%g s) reached with %d calls that could not move (%s); "
                    "ending them with reason %s", job.transceiver_id, job.deadline_s, len(left),
                    job.problem or "their migrations did not finish in time", DEADLINE_REASON)
        for call in left:
            self.registry.end_call(call.conn_id, DEADLINE_REASON)
            self.deadline_ends.inc()
            job.ended.append(call.conn_id)
        # The transceiver hangs them up (the clients hear it end); best effort.
        await asyncio.gather(*(self._hang_up(job.transceiver_id, c.conn_id) for c in left))

    async def _hang_up(self, transceiver_id: int, conn_id: int) -> None:
        try:
            await self.client.delete_call(self.registry.get_transceiver(transceiver_id), conn_id)
        except (TransceiverError, UnknownTransceiverError) as exc:
            log.warning("ending conn_id %d on transceiver %d: %s", conn_id, transceiver_id, exc)

    # -- the HTTP routes ------------------------------------------------------------------

    def add_internal_routes(self, app: web.Application,
                            identify: Callable[[web.Request], pki.Identity | None] = peer_identity) -> None:
        """A transceiver's request for its own drain (the internal listener)."""
        async def drain_self(request: web.Request) -> web.Response:
            transceiver_id = int(request.match_info["id"])
            who = identify(request)
            if who is None or who.role != "transceiver" or who.transceiver_id != transceiver_id:
                raise ApiError(403, f"only transceiver {transceiver_id} may ask for its own drain")
            body = await json_body(request)
            job = self.start(transceiver_id, parse_deadline(body), f"transceiver {transceiver_id}")
            return web.json_response(self.view(job), status=202)

        app.router.add_post(r"/v1/transceivers/{id:\d{1,5}}/drain", drain_self)

    def add_control_routes(self, app: web.Application) -> None:
        """The operator's drains (the control socket)."""
        async def start(request: web.Request) -> web.Response:
            body = await json_body(request)
            tid = body.get("transceiver")
            if isinstance(tid, bool) or not isinstance(tid, int):
                return json_error(400, "'transceiver' must be a transceiver id (integer)")
            try:
                job = self.start(tid, parse_deadline(body), "operator")
            except ApiError as exc:
                return json_error(exc.status, str(exc))
            return web.json_response(self.view(job), status=202)

        async def progress(request: web.Request) -> web.Response:
            raw = request.match_info["id"]
            job = self.jobs.get(int(raw)) if raw.isdigit() else None
            if job is None:
                return json_error(404, f"transceiver {raw} has not been drained by this relay")
            return web.json_response(self.view(job))

        app.router.add_post("/drains", start)
        app.router.add_get("/drains/{id}", progress)
