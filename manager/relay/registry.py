"""Transceivers, calls and call ownership (embedded, in-memory).

The registry is the manager's view of who owns what. It is plain data plus
rules, with no kernel access and no I/O: signaling places calls through it,
the slow path reads owners from it and listens for ended calls to remove
kernel entries, migration moves ownership with `set_owner`.

Everything runs on one asyncio loop and no method awaits, so each method is
atomic with respect to the others.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from manager.protocol.addresses import OwnerAddr

__all__ = ["OwnerAddr"]  # re-exported: callers build owners from the registry

log = logging.getLogger(__name__)

CallState = Literal["placing", "active", "ended"]
CallEndedCallback = Callable[["Call", str], None]
# (kind, record): a change this relay made, for a shared store to replicate.
ChangeCallback = Callable[[str, dict], None]

MAX_TRANSCEIVER_ID = 0xFFFF  # the ufrag carries it as u16
MAX_CONN_ID = 0xFFFFFFFF  # u32, 0 is reserved for "none"


class RegistryError(Exception):
    """Base class of registry errors."""


class PlacementError(RegistryError):
    """No transceiver can take a new call."""


class UnknownTransceiverError(RegistryError, LookupError):
    """A transceiver id that is not registered."""


class UnknownCallError(RegistryError, LookupError):
    """A connection id that is not a live call."""


class StoreUnavailable(RegistryError):
    """The shared store behind a fleet's registry cannot be reached."""


class RefusedRecord(RegistryError, ValueError):
    """Another relay's record this relay does not take (stale, or naming an
    owner outside the internal prefixes)."""


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in {low}..{high}")
    return value


@dataclass
class Transceiver:
    id: int
    control_url: str
    capacity: int
    calls: int = 0  # live calls (placing or active) owned by it
    healthy: bool = True  # effective health, refreshed by the registry on every read
    reported_healthy: bool = True  # what its last heartbeat said
    last_heartbeat: float = 0.0  # monotonic
    draining: bool = False  # takes no new calls (its calls are being moved away)

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "control_url": self.control_url,
            "capacity": self.capacity,
            "calls": self.calls,
            "healthy": self.healthy,
            "draining": self.draining,
        }


@dataclass
class Call:
    call_id: str  # 128 random bits, for URLs: the call's capability when client auth is off
    conn_id: int
    transceiver_id: int
    client_ufrag: str
    server_ufrag: str
    owner: OwnerAddr | None = None  # None until the transceiver has answered
    state: CallState = "placing"
    created: float = field(default_factory=time.time)  # wall clock, for humans
    ended_reason: str | None = None
    # monotonic time the current owner took the call: heartbeats are only
    # trusted about it once they can have been composed after that moment.
    owned_since: float = 0.0
    # SHA-256 of the client credential that created the call (never the
    # credential): ending or updating the call requires the same one.
    credential: bytes | None = field(default=None, repr=False)
    # Raised by every change of owner or transceiver, wherever it is made: a
    # replica refuses a record older than what it holds (a late message after
    # a resync must not move the call back).
    generation: int = 0

    def record(self) -> dict[str, object]:
        """Everything another relay needs to serve the call (a shared store's copy)."""
        return {**self.to_dict(), "credential": self.credential.hex() if self.credential else None,
                "gen": self.generation}

    def to_dict(self) -> dict[str, object]:
        return {
            "call_id": self.call_id,
            "conn_id": self.conn_id,
            "transceiver_id": self.transceiver_id,
            "owner": self.owner.to_dict() if self.owner else None,
            "client_ufrag": self.client_ufrag,
            "server_ufrag": self.server_ufrag,
            "state": self.state,
            "created": self.created,
            "ended_reason": self.ended_reason,
        }


class Registry:
    def __init__(
        self,
        *,
        heartbeat_timeout: float = 3.0,
        report_grace: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """
        heartbeat_timeout: silence after which a transceiver is unhealthy.
        report_grace: a heartbeat that omits a call owned for less than this
            may have been composed before the transceiver took the call, so it
            does not end that call.
        """
        if heartbeat_timeout <= 0:
            raise ValueError("heartbeat_timeout must be positive")
        if report_grace < 0:
            raise ValueError("report_grace must not be negative")
        self.heartbeat_timeout = heartbeat_timeout
        self.report_grace = report_grace
        self._clock = clock
        self._transceivers: dict[int, Transceiver] = {}
        self._calls: dict[int, Call] = {}  # conn_id -> live call
        # transceiver id -> conn_ids of its live calls: a heartbeat reconciles
        # only the calls of the transceiver that sent it.
        self._calls_of: dict[int, set[int]] = {}
        self._by_call_id: dict[str, int] = {}
        self._reserved: set[int] = set()  # allocated conn ids not yet added
        self._listeners: list[CallEndedCallback] = []
        self._active_listeners: list[Callable[[Call], None]] = []
        self._restart_listeners: list[Callable[[Call, str], None]] = []
        self._change_listeners: list[ChangeCallback] = []
        self._applying = False  # applying another relay's change: not ours to replicate

    # -- transceivers -------------------------------------------------------

    def register_transceiver(self, id: int, control_url: str, capacity: int) -> Transceiver:
        """Add a transceiver, or update one that registers again (e.g. restarted)."""
        _check_int("transceiver id", id, 1, MAX_TRANSCEIVER_ID)
        _check_int("capacity", capacity, 0, 1_000_000)
        url = urlsplit(control_url) if isinstance(control_url, str) else None
        if url is None or url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"control_url {control_url!r} is not an http(s) URL")
        now = self._clock()
        t = self._transceivers.get(id)
        if t is None:
            t = Transceiver(id=id, control_url=control_url.rstrip("/"), capacity=capacity)
            self._transceivers[id] = t
        else:
            t.control_url = control_url.rstrip("/")
            t.capacity = capacity
        t.reported_healthy = True
        t.last_heartbeat = now
        self._refresh(t, now)
        self._changed("transceiver", self._tx_record(t))
        return t

    @staticmethod
    def _tx_record(t: Transceiver) -> dict:
        return {"id": t.id, "control_url": t.control_url, "capacity": t.capacity, "draining": t.draining}

    def heartbeat(
        self, id: int, calls: Iterable[int] | None = None, healthy: bool = True
    ) -> list[int]:
        """Record a heartbeat; reconcile the calls it reports.

        `calls` is the full list of connection ids the transceiver holds (None:
        not reported). Active calls it owns but no longer lists end with reason
        "transceiver-closed". Returns the ids it reported that the registry
        does not know as its calls (orphans the caller may want closed).
        """
        t = self.get_transceiver(id)
        now = self._clock()
        t.reported_healthy = bool(healthy)
        t.last_heartbeat = now
        self._refresh(t, now)
        if calls is None:
            return []
        reported = set(calls)
        for conn_id in list(self._calls_of.get(id, ())):
            call = self._calls[conn_id]
            if (
                call.state == "active"
                and call.conn_id not in reported
                and now - call.owned_since >= self.report_grace
            ):
                self.end_call(call.conn_id, "transceiver-closed")
        return sorted(
            c for c in reported if c not in self._calls or self._calls[c].transceiver_id != id
        )

    def get_transceiver(self, id: int) -> Transceiver:
        t = self._transceivers.get(id)
        if t is None:
            raise UnknownTransceiverError(f"unknown transceiver {id}")
        self._refresh(t, self._clock())
        return t

    def transceivers(self) -> list[Transceiver]:
        now = self._clock()
        for t in self._transceivers.values():
            self._refresh(t, now)
        return sorted(self._transceivers.values(), key=lambda t: t.id)

    def _refresh(self, t: Transceiver, now: float) -> None:
        t.healthy = t.reported_healthy and now - t.last_heartbeat <= self.heartbeat_timeout

    def place(self, *, exclude: Iterable[int] = ()) -> Transceiver:
        """Pick the least loaded healthy transceiver with free capacity.

        Load is calls / capacity, so transceivers of different sizes fill
        evenly; ties go to the lower id (deterministic).
        """
        excluded = set(exclude)
        candidates = [t for t in self.transceivers() if t.id not in excluded]
        if not candidates:
            raise PlacementError("no transceiver is registered")
        healthy = [t for t in candidates if t.healthy]
        if not healthy:
            raise PlacementError(f"no healthy transceiver ({len(candidates)} registered)")
        open_ = [t for t in healthy if not t.draining]
        if not open_:
            raise PlacementError(f"all {len(healthy)} healthy transceivers are draining")
        free = [t for t in open_ if t.calls < t.capacity]
        if not free:
            # (Worded as before draining existed when none is draining.)
            busy = "healthy transceivers" if len(open_) == len(healthy) else "healthy transceivers taking calls"
            raise PlacementError(f"all {len(open_)} {busy} are at capacity")
        return min(free, key=lambda t: (t.calls / t.capacity, t.id))

    def set_draining(self, id: int, draining: bool = True) -> Transceiver:
        """Stop (or resume) placing new calls on a transceiver."""
        t = self.get_transceiver(id)
        t.draining = draining
        self._changed("transceiver", self._tx_record(t))
        return t

    # -- calls --------------------------------------------------------------

    def allocate_conn_id(self) -> int:
        """A fresh nonzero u32, unique among live and reserved connection ids.

        Random rather than sequential so that an id is not reused soon after
        its call ended (stale kernel entries or late packets cannot alias a
        new call). Reserved until `add_call`, which the caller makes next.
        """
        while True:
            conn_id = secrets.randbelow(MAX_CONN_ID) + 1
            if conn_id not in self._calls and conn_id not in self._reserved:
                self._reserved.add(conn_id)
                return conn_id

    def release_conn_id(self, conn_id: int) -> None:
        """Give back an allocated id that no call took."""
        self._reserved.discard(conn_id)

    def add_call(
        self,
        *,
        conn_id: int,
        transceiver_id: int,
        client_ufrag: str,
        server_ufrag: str,
        owner: OwnerAddr | None = None,
        credential: bytes | None = None,
    ) -> Call:
        """Record a call on a transceiver; it counts towards its load at once.

        Without an owner the call is "placing" (the transceiver has not
        answered yet); with one it is "active".
        """
        _check_int("connection id", conn_id, 1, MAX_CONN_ID)
        if conn_id in self._calls:
            raise ValueError(f"connection id {conn_id} is already in use")
        t = self.get_transceiver(transceiver_id)
        call_id = secrets.token_hex(16)
        while call_id in self._by_call_id:
            call_id = secrets.token_hex(16)
        call = Call(
            call_id=call_id,
            conn_id=conn_id,
            transceiver_id=transceiver_id,
            client_ufrag=client_ufrag,
            server_ufrag=server_ufrag,
            owner=owner,
            state="active" if owner else "placing",
            owned_since=self._clock(),
            credential=credential,
        )
        self._reserved.discard(conn_id)
        self._calls[conn_id] = call
        self._by_call_id[call_id] = conn_id
        self._calls_of.setdefault(transceiver_id, set()).add(conn_id)
        t.calls += 1
        self._changed("call", call.record())
        if owner is not None:
            self._activated(call)
        return call

    def activate(self, conn_id: int, owner: OwnerAddr) -> Call:
        """The owner answered: the call becomes routable at `owner`."""
        call = self._live(conn_id)
        call.owner = owner
        call.state = "active"
        call.owned_since = self._clock()
        call.generation += 1
        self._changed("call", call.record())
        self._activated(call)
        return call

    def set_owner(self, conn_id: int, transceiver_id: int, owner: OwnerAddr) -> Call:
        """Move a call to another transceiver/address (migration)."""
        call = self._live(conn_id)
        new = self.get_transceiver(transceiver_id)
        if transceiver_id != call.transceiver_id:
            self._move(call, transceiver_id)
            new.calls += 1
        call.owner = owner
        call.state = "active"
        call.owned_since = self._clock()
        call.generation += 1
        self._changed("call", call.record())
        return call

    def _move(self, call: Call, transceiver_id: int) -> None:
        """The call leaves its transceiver's count and index for another's index."""
        self._transceivers[call.transceiver_id].calls -= 1
        self._unindex(call)
        call.transceiver_id = transceiver_id
        self._calls_of.setdefault(transceiver_id, set()).add(call.conn_id)

    def _unindex(self, call: Call) -> None:
        mine = self._calls_of.get(call.transceiver_id)
        if mine is not None:
            mine.discard(call.conn_id)
            if not mine:
                del self._calls_of[call.transceiver_id]

    def _live(self, conn_id: int) -> Call:
        call = self._calls.get(conn_id)
        if call is None:
            raise UnknownCallError(f"no live call with connection id {conn_id}")
        return call

    def get_call(self, conn_id: int) -> Call | None:
        return self._calls.get(conn_id)

    def get_call_by_id(self, call_id: str) -> Call | None:
        conn_id = self._by_call_id.get(call_id)
        return None if conn_id is None else self._calls.get(conn_id)

    def calls(self) -> list[Call]:
        return sorted(self._calls.values(), key=lambda c: (c.created, c.conn_id))

    def end_call(self, conn_id: int, reason: str) -> Call | None:
        """End a live call and tell the listeners; None if it is not live.

        Idempotent, so the several paths that can end a call (client hang-up,
        transceiver report, failed placement) need not coordinate.
        """
        call = self._calls.pop(conn_id, None)
        if call is None:
            return None
        del self._by_call_id[call.call_id]
        self._unindex(call)
        t = self._transceivers.get(call.transceiver_id)
        if t is not None:
            t.calls -= 1
        call.state = "ended"
        call.ended_reason = reason
        self._changed("end", {"conn_id": conn_id, "call_id": call.call_id, "reason": reason})
        for callback in list(self._listeners):
            try:
                callback(call, reason)
            except Exception:
                # One broken listener must not keep the others (e.g. kernel
                # entry removal) from running.
                log.exception("call-ended listener failed for conn_id %d", conn_id)
        return call

    def on_call_active(self, callback: Callable[[Call], None]) -> Callable[[], None]:
        """Call `callback(call)` when a call becomes routable (its owner
        answered); returns an unsubscribe."""
        self._active_listeners.append(callback)

        def unsubscribe() -> None:
            if callback in self._active_listeners:
                self._active_listeners.remove(callback)

        return unsubscribe

    def _activated(self, call: Call) -> None:
        for callback in list(self._active_listeners):
            try:
                callback(call)
            except Exception:
                log.exception("call-active listener failed for conn_id %d", call.conn_id)

    def restart_ice(self, conn_id: int, client_ufrag: str, server_ufrag: str) -> Call:
        """An ICE restart: the call's ufrags are the new ones from now on (the
        old server ufrag routes nothing any more)."""
        call = self._live(conn_id)
        old = call.server_ufrag
        call.client_ufrag, call.server_ufrag = client_ufrag, server_ufrag
        call.generation += 1
        self._changed("call", call.record())
        self._restarted(call, old)
        return call

    def on_ice_restart(self, callback: Callable[[Call, str], None]) -> Callable[[], None]:
        """Call `callback(call, old server ufrag)` when a call's ICE restarts
        (here or on another relay of the fleet); returns an unsubscribe."""
        self._restart_listeners.append(callback)
        return lambda: self._restart_listeners.remove(callback) if callback in self._restart_listeners else None

    def _restarted(self, call: Call, old_server_ufrag: str) -> None:
        for callback in list(self._restart_listeners):
            try:
                callback(call, old_server_ufrag)
            except Exception:
                log.exception("ICE-restart listener failed for conn_id %d", call.conn_id)

    def on_call_ended(self, callback: CallEndedCallback) -> Callable[[], None]:
        """Call `callback(call, reason)` whenever a call ends; returns an unsubscribe."""
        self._listeners.append(callback)

        def unsubscribe() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return unsubscribe

    # -- replication (a shared store: manager.relay.fleet) -------------------

    def on_change(self, callback: ChangeCallback) -> Callable[[], None]:
        """Call `callback(kind, record)` for every change this relay makes
        ("transceiver", "call", "end"); not for changes applied from others."""
        self._change_listeners.append(callback)

        def unsubscribe() -> None:
            if callback in self._change_listeners:
                self._change_listeners.remove(callback)

        return unsubscribe

    def _changed(self, kind: str, record: dict) -> None:
        if self._applying:
            return
        for callback in list(self._change_listeners):
            try:
                callback(kind, record)
            except Exception:
                log.exception("change listener failed for %s", kind)

    def apply_transceiver(self, record: dict) -> Transceiver:
        """Another relay's view of a transceiver (registered, draining). It
        counts as heard from now: its heartbeats reach every relay."""
        t = self._transceivers.get(record["id"])
        if t is None:
            self._applying = True
            try:
                t = self.register_transceiver(record["id"], record["control_url"], record["capacity"])
            finally:
                self._applying = False
        t.control_url = record["control_url"]
        t.capacity = record["capacity"]
        t.draining = bool(record.get("draining", False))
        return t

    def apply_call(self, record: dict, *, allows: Callable[[str], bool] | None = None
                   ) -> tuple[Call, OwnerAddr | None] | None:
        """Another relay placed, answered or moved a call: take its record.
        Returns (call, previous owner), or None when the record names a
        transceiver this relay does not know yet (the caller retries later).
        RefusedRecord: its owner lies outside `allows` (the internal
        prefixes: the store is not trusted with where media goes), or it is
        older than the call's generation here."""
        conn_id = record["conn_id"]
        tx_id = record["transceiver_id"]
        owner = OwnerAddr(**record["owner"]) if record.get("owner") else None
        if owner is not None and allows is not None:
            outside = [a for a, _ in owner.endpoints() if not allows(a)]
            if outside:
                raise RefusedRecord(f"call {conn_id}: owner address {outside[0]} is not in the internal prefixes")
        gen = record.get("gen")
        gen = int(gen) if gen is not None else None
        if tx_id not in self._transceivers:
            return None
        call = self._calls.get(conn_id)
        if call is not None and call.call_id != record["call_id"]:
            return None  # another call holds this connection id here: ours wins until it ends
        if call is not None and gen is not None and gen < call.generation:
            raise RefusedRecord(f"call {conn_id}: record of generation {gen} is older than {call.generation}")
        previous = call.owner if call is not None else None
        if call is None:
            call = Call(call_id=record["call_id"], conn_id=conn_id, transceiver_id=tx_id,
                        client_ufrag=record["client_ufrag"], server_ufrag=record["server_ufrag"],
                        created=record.get("created") or time.time(), owned_since=self._clock())
            cred = record.get("credential")
            call.credential = bytes.fromhex(cred) if cred else None
            self._reserved.discard(conn_id)
            self._calls[conn_id] = call
            self._by_call_id[call.call_id] = conn_id
            self._calls_of.setdefault(tx_id, set()).add(conn_id)
            self._transceivers[tx_id].calls += 1
        elif call.transceiver_id != tx_id:
            self._move(call, tx_id)
            self._transceivers[tx_id].calls += 1
        if gen is not None:
            call.generation = gen
        restarted_from = None
        if call.server_ufrag != record["server_ufrag"]:  # an ICE restart on another relay
            restarted_from = call.server_ufrag
            call.client_ufrag, call.server_ufrag = record["client_ufrag"], record["server_ufrag"]
        was_active = call.state == "active"
        call.owner = owner
        if owner is not None:
            call.state = "active"
            if previous != owner:
                call.owned_since = self._clock()
        if owner is not None and not was_active:
            self._activated(call)
        if restarted_from is not None:
            self._restarted(call, restarted_from)
        return call, previous

    def apply_end(self, conn_id: int, call_id: str, reason: str) -> Call | None:
        """Another relay ended a call."""
        call = self._calls.get(conn_id)
        if call is None or call.call_id != call_id:
            return None
        self._applying = True
        try:
            return self.end_call(conn_id, reason)
        finally:
            self._applying = False
