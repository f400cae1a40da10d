"""Each call's account while it lives, and its record when it ends.

The account gathers what the record needs as the call goes: the times, the
client's family, transport and address (from its first leg), the
transceivers it lived on, every move with its gap (the migrator and the slow
path's failover report them), and the kernel's counters of its flows
(sampled, since a flow that idles out takes its counters with it). When this
relay ends the call (the registry's "end" change: a call another relay ended
is that relay's to write), the account is closed: the transceivers' RTCP
figures are fetched over the internal API (``GET /calls/{id}/quality``; a
transceiver keeps them a while after the call ended there), joined with the
relay's counters into one :class:`~manager.protocol.call_record.CallRecord`
(manager.relay.record_build), and written to the JSON-lines file and, in a
fleet, the Redis stream.

A call that spans a relayd restart gets one record: in a fleet the account
lives in Redis (``{prefix}:account:{conn_id}``, written on every change); alone,
relayd keeps its accounts in ``[records] state_path`` (written when it stops,
and at most ``CHECKPOINT_GAP`` after a change while it runs, so a relayd
that is killed loses at most that much) and takes them back when it starts.
A call taken back that the registry does not know (alone, relayd forgets its
calls) is closed once its adopted flows are gone ("idle-timeout").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from manager.observability.logs import call_context
from manager.protocol.addresses import family_of
from manager.protocol.call_record import CallRecord
from manager.protocol.tasks import TaskSet
from manager.relay.call_records import RecordFile, RecordStream
from manager.relay.record_build import build_record, pack_counts
from manager.relay.transceiver_client import TransceiverError

log = logging.getLogger(__name__)

SAMPLE_EVERY = 5.0  # s between samples of the kernel's flow counters
SAMPLE_BATCH = 500  # accounts sampled per round (the rest next round)
STOP_WAIT = 5.0  # s relayd's stop waits for records being written
ACCOUNT_TTL = 7 * 86400  # an account in Redis outlives a lost end this long
# s between writes of the state file while relayd runs: a call ended since the
# last one could be taken back (and recorded again) by a relayd killed now.
CHECKPOINT_GAP = 1.0

# (transceiver id, conn_id) -> the transceiver's figures of the call, or None.
QualityFetch = Callable[[int, int], Awaitable[dict | None]]


@dataclass
class Account:
    """What a call's record will say, gathered while it lives (see the module docstring)."""

    call_id: str
    conn_id: int
    created_at: float
    transceivers: list[int] = field(default_factory=list)
    relays: list[str] = field(default_factory=list)
    moves: list[dict] = field(default_factory=list)
    client: dict = field(default_factory=dict)  # family, transport, address (as seen; anonymised when written)
    # "client|vip" -> the kernel's counters (record_build.kernel_stream): packets and bytes
    # each way, then where the kernel accounts RTP sequence numbers expected, lost, jitter each way.
    flows: dict[str, list[int]] = field(default_factory=dict)
    figures: dict[str, dict] = field(default_factory=dict)  # transceiver id -> its RTCP figures of the call
    owner_rtt_ms: float | None = None  # relay ⇄ transceiver, timed on the last leg's installing check

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Account:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def merge(self, other: Account) -> None:
        """Join another relay's view of the same call (a fleet)."""
        self.created_at = min(self.created_at, other.created_at)
        for t in other.transceivers:
            if t not in self.transceivers:
                self.transceivers.append(t)
        for r in other.relays:
            if r not in self.relays:
                self.relays.append(r)
        seen = {(m["kind"], m["at"]) for m in self.moves}
        self.moves += [m for m in other.moves if (m["kind"], m["at"]) not in seen]
        self.moves.sort(key=lambda m: m["at"])
        self.client = self.client or other.client
        for k, v in other.flows.items():
            self.flows.setdefault(k, v)
        for k, v in other.figures.items():
            self.figures.setdefault(k, v)
        if self.owner_rtt_ms is None:
            self.owner_rtt_ms = other.owner_rtt_ms


class CallJournal:
    """Accounts of the calls this relay knows, closed into records (see the module docstring)."""

    def __init__(self, registry, *, relay_id: str, quality: QualityFetch, legs_of: Callable[[int], list],
                 flow_counts: Callable[[Any], tuple[int, ...] | None],
                 file: RecordFile | None = None, stream: RecordStream | None = None, redis=None,
                 key_prefix: str = "splitrelay", state_path: Path | None = None, anonymise: str = "full",
                 observe: Callable[[CallRecord], None] | None = None) -> None:
        self.registry = registry
        self.relay_id = relay_id
        self.quality = quality
        self.legs_of = legs_of
        self.flow_counts = flow_counts
        self.file, self.stream, self.redis = file, stream, redis
        self.key_prefix = key_prefix
        self.state_path = state_path
        self.anonymise = anonymise
        self.observe = observe
        self.accounts: dict[int, Account] = {}
        self.carried: set[int] = set()  # taken back at start, not (yet) known to the registry
        self.written = 0
        self.write_errors = 0
        self._tasks = TaskSet("call journal", log)
        self._sampler: asyncio.Task | None = None
        self._checkpointer: asyncio.Task | None = None
        self._dirty = asyncio.Event()  # the accounts changed since the state file was written
        self._state_lock = threading.Lock()  # a checkpoint's thread and stop's last write
        self._ending: dict[int, str] = {}  # ended by this relay, between its "end" change and listeners
        unsubscribe = [registry.on_change(self._changed), registry.on_call_active(self._account),
                       registry.on_call_ended(self._ended)]
        self._unsubscribe = lambda: [u() for u in unsubscribe]
        self._cursor = 0

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Take back the accounts of a previous run, and sample the flows from now on."""
        if self.state_path is not None and self.state_path.exists():
            try:
                saved = json.loads(self.state_path.read_text("utf-8"))
                for d in saved.get("accounts", []):
                    acc = Account.from_dict(d)
                    self.accounts[acc.conn_id] = acc
                    self.carried.add(acc.conn_id)
                log.info("call records: %d open calls taken back from %s", len(self.carried), self.state_path)
            except (OSError, ValueError, TypeError) as exc:
                log.warning("call records: cannot read %s: %s", self.state_path, exc)
            self._dirty.set()  # the file now says what this run holds (none: it goes)
        for call in self.registry.calls():
            self._account(call)
        self._sampler = asyncio.create_task(self._sample_forever())
        if self.state_path is not None:
            self._checkpointer = asyncio.create_task(self._checkpoint_forever())

    async def stop(self) -> None:
        """Keep what the running calls' records need for the next run."""
        self._unsubscribe()
        for task in (self._sampler, self._checkpointer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.sample(len(self.accounts))
        # Records being closed finish (their fetches are bounded by the client's timeout), within reason.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._tasks.wait(), STOP_WAIT)
        await self._tasks.close()
        if self.state_path is not None:
            self._write_state(self._state_text())
        for r in {self.redis, self.stream.client if self.stream is not None else None} - {None}:
            await r.aclose()
        if self.file is not None:
            self.file.close()

    # -- what the relay tells it ----------------------------------------------------------

    def _key(self, conn_id: int) -> str:
        return f"{self.key_prefix}:account:{conn_id}"

    def _account(self, call) -> Account:
        """The call's account, opened if new (and no longer only carried: the registry knows it)."""
        acc = self.accounts.get(call.conn_id)
        if acc is None or acc.call_id != call.call_id:
            acc = self.accounts[call.conn_id] = Account(call.call_id, call.conn_id, call.created)
            self._dirty.set()
        self.carried.discard(call.conn_id)
        if call.transceiver_id not in acc.transceivers:
            acc.transceivers.append(call.transceiver_id)
        return acc

    def _here(self, acc: Account) -> None:
        """This relay served the call (placed or moved it, or carries a leg of it)."""
        if self.relay_id not in acc.relays:
            acc.relays.append(self.relay_id)

    def _changed(self, kind: str, record: dict) -> None:
        if kind == "call":
            call = self.registry.get_call(record["conn_id"])
            if call is not None:
                acc = self._account(call)
                self._here(acc)
                self._save(acc)
        elif kind == "end":  # this relay ended it (not sent for another relay's end)
            self._ending[record["conn_id"]] = record["reason"]
            acc = self.accounts.get(record["conn_id"])
            if acc is not None:
                self._sample_one(acc)  # the legs are still there: the end's listeners remove them next

    def _ended(self, call, reason: str) -> None:
        acc = self.accounts.pop(call.conn_id, None)
        self._dirty.set()
        if self._ending.pop(call.conn_id, None) is None:
            return  # another relay ended it and writes its record
        if acc is None or acc.call_id != call.call_id:
            acc = Account(call.call_id, call.conn_id, call.created, transceivers=[call.transceiver_id],
                          relays=[self.relay_id])
        self._here(acc)  # it ended the call
        self._tasks.spawn(self.close(acc, reason, time.time()))

    def moved(self, conn_id: int, kind: str, *, from_transceiver: int | None = None,
              to_transceiver: int | None = None, from_relay: str | None = None, to_relay: str | None = None,
              gap_s: float | None = None) -> None:
        """A migration or failover of a live call; the old transceiver's figures are fetched now."""
        call = self.registry.get_call(conn_id)
        acc = self.accounts.get(conn_id) or (self._account(call) if call is not None else None)
        if acc is None:
            return
        acc.moves.append({"kind": kind, "at": time.time(), "from_transceiver": from_transceiver,
                          "to_transceiver": to_transceiver, "from_relay": from_relay, "to_relay": to_relay,
                          "gap_ms": None if gap_s is None else round(gap_s * 1000, 3)})
        if to_transceiver is not None and to_transceiver not in acc.transceivers:
            acc.transceivers.append(to_transceiver)
        if to_relay is not None and to_relay not in acc.relays:
            acc.relays.append(to_relay)
        self._save(acc)
        self._dirty.set()
        if from_transceiver is not None:
            self._tasks.spawn(self._fetch_into(acc, from_transceiver))

    async def _fetch_into(self, acc: Account, transceiver_id: int) -> None:
        figures = await self.quality(transceiver_id, acc.conn_id)
        if figures is not None:
            acc.figures[str(transceiver_id)] = figures
            self._save(acc)

    def _save(self, acc: Account) -> None:
        if self.redis is None:
            return

        async def save() -> None:
            try:
                await self.redis.set(self._key(acc.conn_id), json.dumps(acc.to_dict()), ex=ACCOUNT_TTL)
            except Exception as exc:  # a record with less is better than none: the end still writes
                log.warning("call records: account of %s not saved: %s", acc.call_id, exc)

        self._tasks.spawn(save())

    # -- the kernel's counters ------------------------------------------------------------

    def _sample_one(self, acc: Account) -> None:
        for leg in self.legs_of(acc.conn_id):
            self._here(acc)
            counts = self.flow_counts(leg)
            if leg.owner_rtt_ms is not None:
                acc.owner_rtt_ms = leg.owner_rtt_ms
            if not acc.client:
                acc.client = {"family": "ipv6" if family_of(leg.client[0]) == 6 else "ipv4",
                              "transport": leg.transport, "address": leg.client[0]}
            if counts is not None:
                acc.flows[f"{leg.client[0]}:{leg.client[1]}|{leg.vip[0]}:{leg.vip[1]}"] = list(counts)

    def sample(self, limit: int = SAMPLE_BATCH) -> None:
        """Read the counters of up to `limit` calls' flows (round robin)."""
        accounts = list(self.accounts.values())
        if not accounts:
            return
        start = self._cursor % len(accounts)
        batch = (accounts[start:] + accounts[:start])[:limit]
        self._cursor = start + len(batch)
        for acc in batch:
            self._sample_one(acc)
        self._dirty.set()
        for conn_id in list(self.carried):
            acc = self.accounts.get(conn_id)
            if acc is not None and self.registry.get_call(conn_id) is None and not self.legs_of(conn_id):
                # Taken back after a restart, never known again, its flows gone: it ended.
                self.carried.discard(conn_id)
                del self.accounts[conn_id]
                self._dirty.set()
                self._tasks.spawn(self.close(acc, "idle-timeout", time.time()))

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_EVERY)  # pacing: the counters change slowly enough
            try:
                self.sample()
            except Exception:
                log.exception("call records: sampling the flows failed")

    # -- the state file (one relay alone) -------------------------------------------------

    def _state_text(self) -> str | None:
        if not self.accounts:
            return None
        return json.dumps({"accounts": [a.to_dict() for a in self.accounts.values()]})

    def _write_state(self, text: str | None) -> None:
        """Replace the state file at once (a reader never sees half of it); none without open calls."""
        assert self.state_path is not None
        with self._state_lock:
            if text is None:
                self.state_path.unlink(missing_ok=True)
                return
            tmp = self.state_path.with_suffix(".tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text, "utf-8")
            os.replace(tmp, self.state_path)

    async def _checkpoint_forever(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                # Serialised here, between the loop's other work; written off the loop.
                await asyncio.to_thread(self._write_state, self._state_text())
            except OSError as exc:
                log.warning("call records: cannot write %s: %s", self.state_path, exc)
            await asyncio.sleep(CHECKPOINT_GAP)  # pacing: at most one write a CHECKPOINT_GAP

    # -- the end --------------------------------------------------------------------------

    async def close(self, acc: Account, reason: str, ended_at: float) -> CallRecord | None:
        """Fetch what is missing, build the record, write it."""
        with call_context(call_id=acc.call_id, conn_id=acc.conn_id):
            return await self._close(acc, reason, ended_at)

    async def _close(self, acc: Account, reason: str, ended_at: float) -> CallRecord | None:
        if self.redis is not None:
            try:
                raw = await self.redis.getdel(self._key(acc.conn_id))
                if raw:
                    other = Account.from_dict(json.loads(raw))
                    if other.call_id == acc.call_id:
                        acc.merge(other)
            except Exception as exc:
                log.warning("call records: account of %s not read: %s", acc.call_id, exc)
        for t in acc.transceivers:
            if str(t) not in acc.figures or t == acc.transceivers[-1]:
                figures = await self.quality(t, acc.conn_id)
                if figures is not None:
                    acc.figures[str(t)] = figures
        record = build_record(acc, reason, ended_at, anonymise=self.anonymise)
        await self.write(record)
        return record

    async def write(self, record: CallRecord) -> None:
        try:
            if self.file is not None:
                await asyncio.to_thread(self.file.write, record)
            if self.stream is not None:
                await self.stream.write(record)
            self.written += 1
        except Exception as exc:
            self.write_errors += 1
            log.error("call record of %s not written: %s", record.call_id, exc)
        if self.observe is not None:
            self.observe(record)

    async def live_record(self, call) -> CallRecord:
        """What the record of a live call would say now (``relayctl calls show``)."""
        acc = self.accounts.get(call.conn_id) or self._account(call)
        self._sample_one(acc)
        figures = await self.quality(call.transceiver_id, call.conn_id)
        if figures is not None:
            acc.figures[str(call.transceiver_id)] = figures
        return build_record(acc, "live", time.time(), anonymise=self.anonymise)

    # -- adapters for the relay's components ------------------------------------------------

    def migrated(self, result) -> None:
        """A MigrationResult of the migrator (moved)."""
        self.moved(result.conn_id, "migration", from_transceiver=result.source, to_transceiver=result.target,
                   gap_s=result.switch_s)

    def failed_over(self, conn_id: int, from_relay: str, gap_s: float) -> None:
        """The slow path took a call's client over from another relay."""
        self.moved(conn_id, "failover", from_relay=from_relay, to_relay=self.relay_id, gap_s=gap_s)


def for_relay(cfg, registry, slowpath, datapath, client, fleet, observe) -> CallJournal:
    """relayd's journal: records to the configured file and, in a fleet, the Redis stream."""
    rec = cfg.records

    async def quality(transceiver_id: int, conn_id: int) -> dict | None:
        try:
            tx = registry.get_transceiver(transceiver_id)
            return await client.call_op(tx, "GET", f"/calls/{conn_id}/quality")
        except (LookupError, TransceiverError) as exc:
            log.info("call records: no figures from transceiver %d: %s", transceiver_id, exc,
                     extra={"conn_id": conn_id})
            return None

    def legs_of(conn_id: int) -> list:
        return [*slowpath.legs_of(conn_id), *slowpath.stream_legs_of(conn_id)]

    def flow_counts(leg) -> tuple[int, ...] | None:
        """The XDP per-flow media accounting of a leg (Datapath.flow_media); an
        ICE-TCP leg's from the bridge, which carries it (slowpath/stream_media.py)."""
        seen = round(time.time() - (time.monotonic() - leg.first_seen), 3)  # orders the call's flows
        media = leg.media
        if media is None:
            if leg.installed_at is None or datapath.maps is None:
                return None
            media = datapath.flow_media(leg.client, leg.vip)
            if media is None:
                return None
        return pack_counts(media.up, media.down, seen)

    redis = fleet.new_client() if fleet is not None else None
    stream = (RecordStream(fleet.new_client(), f"{cfg.registry.key_prefix}:records", rec.stream_cap)
              if fleet is not None and rec.stream else None)
    return CallJournal(registry, relay_id=fleet.relay_id if fleet is not None else "local", quality=quality,
                       legs_of=legs_of, flow_counts=flow_counts,
                       file=RecordFile(rec.path, rec.max_bytes, rec.backups) if rec.path is not None else None,
                       stream=stream, redis=redis, key_prefix=cfg.registry.key_prefix,
                       state_path=rec.open_state() if fleet is None else None, anonymise=rec.anonymise,
                       observe=observe)
