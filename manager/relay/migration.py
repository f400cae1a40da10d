"""Live call migration between transceivers, relay side.

  1. the old owner exports the call's state and stops sending (freeze);
  2. the new owner imports it and is ready (ICE responder, SRTP sessions, agent);
  3. the new owner's return-path entries are staged in the kernel (inert);
  4. one update of the connection id's owner entry moves both directions of
     every flow of the call at once; the registry follows;
  5. the new owner is told to start sending; the old one's entries are retired
     and it releases the call.
A failure before step 4 unfreezes the old owner: the call stays where it was.
The switch duration is measured to the first packet the kernel forwards from
the new owner.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram

from manager.observability import tracing
from manager.observability.logs import call_context
from manager.protocol.addresses import OwnerAddr
from manager.protocol.tasks import TaskSet
from manager.relay.kernel.datapath import Datapath
from manager.relay.metrics import SWITCH_BUCKETS
from manager.relay.registry import Call, Registry, UnknownTransceiverError
from manager.relay.slowpath import SlowPath
from manager.relay.transceiver_client import TransceiverClient, TransceiverError

log = logging.getLogger(__name__)

FIRST_PACKET_WAIT = 2.0


class MigrationError(Exception):
    """Why a migration was refused or failed; `status` maps to HTTP."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


@dataclass
class MigrationResult:
    call_id: str
    conn_id: int
    source: int
    target: int
    outcome: str                      # "moved" or "failed"
    error: str | None = None
    switch_s: float | None = None     # request → first packet forwarded from the new owner
    flip_s: float | None = None       # request → ownership entry flipped
    generation: int | None = None
    steps: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        for k in ("switch_s", "flip_s"):
            if d[k] is not None:
                d[k] = round(d[k], 6)
        d["steps"] = {k: round(v, 6) for k, v in self.steps.items()}
        return d


Staged = list[tuple[tuple[str, int], tuple[int, int]]]  # (owner endpoint, leg's flow source)


def retired_reverse_entries(legs: list, old_owner: OwnerAddr | None, staged: Staged) -> Staged:
    """The old owner's return-path entries (owner endpoint, flow source) to
    remove after the flip: one per leg, except any the new owner's staging just
    wrote (same endpoint and flow source, e.g. a transceiver back on the same
    address)."""
    out = []
    for leg in legs:
        ep = old_owner.for_family(leg.family) if old_owner else None
        if ep is not None and (ep, leg.source) not in staged:
            out.append((ep, leg.source))
    return out


class Migrator:
    """Moves calls; one migration per call at a time."""

    def __init__(self, registry: Registry, datapath: Datapath, slowpath: SlowPath, client: TransceiverClient,
                 metrics_registry=None, allows_owner: Callable[[str], bool] = lambda addr: True):
        self.registry = registry
        self.datapath = datapath
        self.slowpath = slowpath
        self.client = client
        self.allows_owner = allows_owner  # owner addresses must lie in the internal prefixes
        self.running: set[int] = set()
        self.on_moved: Callable[[MigrationResult], None] | None = None  # the call records (call_journal)
        self._background = TaskSet("migrator", log)
        # registry=None: metrics kept but not exported (no relay to serve them).
        self.outcomes = Counter("splitrelay_migrations", "Call migrations by outcome", ["outcome"],
                                registry=metrics_registry)
        self.switch = Histogram("splitrelay_migration_switch_seconds",
                                "Migration request to the first packet forwarded from the new owner",
                                buckets=SWITCH_BUCKETS, registry=metrics_registry)

    def _call(self, ref: str | int) -> Call:
        call = None
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit() and len(ref) < 11):
            call = self.registry.get_call(int(ref))
        if call is None and isinstance(ref, str):
            call = self.registry.get_call_by_id(ref)
        if call is None:
            raise MigrationError(f"unknown call {ref}", 404)
        if call.state != "active":
            raise MigrationError(f"call {call.call_id} is {call.state}, not active")
        return call

    def check(self, ref: str | int, target_id: int) -> tuple[Call, object]:
        """Refuse what cannot work, before touching anything."""
        call = self._call(ref)
        if call.conn_id in self.running:
            raise MigrationError(f"call {call.call_id} is already being migrated")
        try:
            target = self.registry.get_transceiver(target_id)
        except UnknownTransceiverError:
            raise MigrationError(f"unknown transceiver {target_id}", 404) from None
        if target_id == call.transceiver_id:
            raise MigrationError(f"call {call.call_id} is already on transceiver {target_id}")
        if not target.healthy:
            raise MigrationError(f"transceiver {target_id} is unhealthy")
        if target.draining:
            raise MigrationError(f"transceiver {target_id} is draining")
        if target.calls >= target.capacity:
            raise MigrationError(f"transceiver {target_id} is full ({target.calls}/{target.capacity} calls)")
        return call, target

    async def migrate(self, ref: str | int, target_id: int) -> MigrationResult:
        call, target = self.check(ref, target_id)
        with call_context(call_id=call.call_id, conn_id=call.conn_id):  # its lines (and its tasks') name it
            return await self._migrate(call, target)

    async def _migrate(self, call: Call, target) -> MigrationResult:
        conn = call.conn_id
        source = self.registry.get_transceiver(call.transceiver_id)
        old_owner = call.owner
        res = MigrationResult(call.call_id, conn, source.id, target.id, "failed")
        self.running.add(conn)
        t0 = time.monotonic()
        imported = asked = False
        new_owner: OwnerAddr | None = None
        trace = tracing.begin("call.migrate", call_id=call.call_id, conn_id=conn, source_transceiver=source.id,
                              target_transceiver=target.id)
        try:
            try:
                with trace.phase("export"):  # the old owner freezes the call and exports it
                    state = await self.client.call_op(source, "POST", f"/calls/{conn}/export", {"freeze": True})
                res.steps["export"] = time.monotonic() - t0
                asked = True
                with trace.phase("import"):
                    reply = await self.client.call_op(target, "POST", "/calls/import",
                                                      {"conn_id": conn, "state": state})
                imported = True
                trace.phase("flip")  # staging the new owner's entries, then the owner entry
                new_owner = OwnerAddr(**reply["owner"])
                outside = [a for a, _ in new_owner.endpoints() if not self.allows_owner(a)]
                if outside:
                    raise MigrationError(f"transceiver {target.id} gave owner address {outside[0]}, "
                                         "outside the internal prefixes")
                res.steps["import"] = time.monotonic() - t0
                legs = [leg for leg in self.slowpath.legs_of(conn) if leg.installed_at is not None]
                staged: Staged = []
                for leg in legs:
                    ep = new_owner.for_family(leg.family)
                    if ep is None:
                        raise MigrationError(f"transceiver {target.id} has no address in the family of {leg.client}")
                    self.datapath.add_reverse(ep, leg.flow_port, leg.client, leg.vip, conn, leg.flow_addr)
                    staged.append((ep, leg.source))
                # ICE-TCP legs need nothing staged (the bridge sends to the current
                # owner), but an owner in their family.
                for leg in self.slowpath.stream_legs_of(conn):
                    if new_owner.for_family(leg.family) is None:
                        raise MigrationError(f"transceiver {target.id} has no address in the family of {leg.client}")
            except (TransceiverError, MigrationError, KeyError, TypeError, ValueError) as exc:
                await self._roll_back(source, target, conn, imported, new_owner)
                raise MigrationError(f"migration of call {call.call_id} failed, call left on transceiver "
                                     f"{source.id}: {exc}", 502) from None
            except asyncio.CancelledError:
                # A drain's deadline: before the flip the call is still the old
                # owner's. It is handed back (unfrozen, any import dropped) in the
                # background: the deadline is now, and a stuck target must not hold it.
                self._background.spawn(self._roll_back(source, target, conn, imported or asked, new_owner))
                raise
            if self.registry.get_call(conn) is not call or call.state != "active":
                # The call ended while it was exported and imported (a hang-up,
                # an expiry): flipping now would give a dead call an owner entry.
                for ep, src in staged:  # its legs are gone: undo what was staged for them
                    self.datapath.remove_reverse(ep, *src)
                await self._roll_back(source, target, conn, imported, None, unfreeze=False)
                raise MigrationError(f"call {call.call_id} ended during its migration", 409)
            # The switch: one map update moves both directions of every flow.
            # Nothing awaits between the check above and here: no end can slip in.
            res.generation = self.datapath.set_owner(conn, new_owner)
            self.registry.set_owner(conn, target.id, new_owner)
            res.flip_s = time.monotonic() - t0
            res.outcome = "moved"  # from here on, whatever happens to this request
            for ep, src in retired_reverse_entries(legs, old_owner, staged):
                self.datapath.remove_reverse(ep, *src)
            self._background.spawn(self._release(source, conn))
            try:
                with trace.phase("resume"):  # until the first packet the kernel forwards from the new owner
                    await self.client.call_op(target, "POST", f"/calls/{conn}/activate")
            except TransceiverError as exc:  # it also starts on the first inbound packet
                log.warning("activate on transceiver %d: %s", target.id, exc)
            res.switch_s = await self._first_packet(staged, t0)
            trace.set(switch_ms=round(res.switch_s * 1000, 3) if res.switch_s is not None else None)
            trace.end()
            if res.switch_s is not None:
                self.switch.observe(res.switch_s)
            if self.on_moved is not None:
                self.on_moved(res)
            log.info("call %s moved from transceiver %d to %d (flip %.1f ms, first packet %s)", call.call_id,
                     source.id, target.id, res.flip_s * 1000,
                     f"{res.switch_s * 1000:.1f} ms" if res.switch_s is not None else "not seen")
            return res
        except MigrationError as exc:
            res.error = str(exc)
            trace.end(res.error)
            raise
        finally:
            trace.end("interrupted")  # no-op if it ended above
            self.running.discard(conn)
            self.outcomes.labels(res.outcome).inc()

    async def close(self) -> None:
        """Wait for the releases still under way (relayd stopping)."""
        await self._background.wait()

    async def _roll_back(self, source, target, conn: int, imported: bool, new_owner: OwnerAddr | None,
                         *, unfreeze: bool = True) -> None:
        if new_owner is not None:
            for leg in self.slowpath.legs_of(conn):
                ep = new_owner.for_family(leg.family)
                if ep is not None:
                    self.datapath.remove_reverse(ep, *leg.source)
        if imported:
            try:
                await self.client.delete_call(target, conn)
            except TransceiverError as exc:
                log.warning("roll-back: dropping the import on transceiver %d: %s", target.id, exc)
        if not unfreeze:
            return
        try:
            # 404: the call ended meanwhile (e.g. at a drain's deadline): nothing to unfreeze.
            await self.client.call_op(source, "POST", f"/calls/{conn}/unfreeze", expect=(200, 204, 404))
        except TransceiverError as exc:
            log.error("roll-back: unfreezing call %d on transceiver %d: %s", conn, source.id, exc)

    async def _release(self, source, conn: int) -> None:
        try:
            await self.client.call_op(source, "POST", f"/calls/{conn}/release", expect=(200, 204, 404))
        except TransceiverError as exc:
            # The call no longer depends on it: whatever it sends is dropped.
            log.warning("release on transceiver %d: %s", source.id, exc)

    async def _first_packet(self, staged: Staged, t0: float) -> float | None:
        if not staged:
            return None  # the call's media flows through another relay of the fleet
        deadline = t0 + FIRST_PACKET_WAIT
        while time.monotonic() < deadline:
            for ep, src in staged:
                if self.datapath.reverse_packets(ep, *src):
                    return time.monotonic() - t0
            await asyncio.sleep(0.0005)
        return None

    async def drain(self, transceiver_id: int) -> list[MigrationResult]:
        """Stop new placements on a transceiver and move each of its calls to
        the least-loaded other healthy transceiver."""
        try:
            self.registry.set_draining(transceiver_id)
        except UnknownTransceiverError:
            raise MigrationError(f"unknown transceiver {transceiver_id}", 404) from None
        results = []
        for call in [c for c in self.registry.calls() if c.transceiver_id == transceiver_id and c.state == "active"]:
            try:
                target = self.registry.place(exclude=[transceiver_id])
            except Exception as exc:
                results.append(MigrationResult(call.call_id, call.conn_id, transceiver_id, 0, "failed", str(exc)))
                continue
            try:
                results.append(await self.migrate(call.conn_id, target.id))
            except MigrationError as exc:
                results.append(MigrationResult(call.call_id, call.conn_id, transceiver_id, target.id, "failed",
                                               str(exc)))
        return results
