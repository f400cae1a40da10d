"""A fleet of relays sharing one registry in Redis.

Each relay keeps its Registry in memory, as a single relay does: the slow
path, signaling and migration read it without awaiting. RedisFleet makes it a
replica of the fleet's state:

* every change this relay makes (Registry.on_change) is written to Redis and
  published on one channel, in order, by one writer task; while Redis is
  away the changes wait in a queue and go out when it is back;
* every change another relay publishes is applied to this Registry (and, for
  an ownership change, to this relay's kernel maps through `on_owner_moved`);
* on every (re)connection the relay resyncs from Redis: messages it missed
  are in the keys. A Redis that lost its data (a new epoch key) is refilled
  from what the relays hold.

Besides calls and transceivers, each relay publishes its installed client
tuples ("legs": client, VIP, flow source, first SSRC), so that another relay
can take a call's flows over when the client's packets start reaching it
(failover: SlowPath asks the owner to authenticate and re-point).

Keys (prefix P = registry.key_prefix), all expiring `ttl` after their last
refresh, so a dead relay's or transceiver's entries age out:

    P:epoch                  random id of this Redis dataset (no TTL)
    P:tx:<id>                transceiver record (JSON)
    P:call:<conn_id>         call record (JSON): owner, ufrags, credential digest
    P:legs:<conn_id>         hash "<relay>|<client>|<vip>" -> leg record (JSON)
    P:relay:<relay_id>       presence of a relay
    P:restarts:<call_id>     sorted set: the call's ICE restarts of the last minute (the storm limit)
    P:events                 the channel (JSON messages)
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from manager.protocol.addresses import OwnerAddr
from manager.protocol.log_budget import LogBudget
from manager.relay.config import RegistryConfig
from manager.relay.registry import Call, RefusedRecord, Registry, StoreUnavailable

log = logging.getLogger(__name__)
_refusals = LogBudget(log)


def redact_url(url: str | None) -> str | None:
    """The URL with any password in it replaced by ***, for logs."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}***@{host}"))


def redact_text(text: str, url: str | None) -> str:
    """`text` (an error message) with the URL's password, if any, replaced."""
    password = urlsplit(url).password if url else None
    return text.replace(password, "***") if password else text

MAX_QUEUED = 100_000  # changes held while Redis is away (then the oldest go; a resync repairs)
RETRY_MIN, RETRY_MAX = 0.05, 0.25  # reconnect backoff: back within 1 s of Redis returning
PING_PERIOD = 0.5  # how soon a hung Redis is noticed
LATENCY_SAMPLES = 4096

Tuple2 = tuple[str, int]


class FleetUnavailable(StoreUnavailable):
    """The shared registry cannot be reached: refuse what needs it."""


def _unavailable(why: object) -> FleetUnavailable:
    return FleetUnavailable(f"the fleet registry (Redis) is unavailable: {why}")


@dataclass
class RemoteLeg:
    """A client tuple another relay installed."""

    relay: str
    conn_id: int
    client: Tuple2
    vip: Tuple2
    source: Tuple2  # that relay's flow source (what the owner sends to)
    ssrc: int = 0

    @classmethod
    def from_record(cls, rec: dict) -> RemoteLeg:
        return cls(relay=rec["relay"], conn_id=int(rec["conn_id"]), client=_t(rec["client"]), vip=_t(rec["vip"]),
                   source=_t(rec["source"]), ssrc=int(rec.get("ssrc") or 0))


def _t(v) -> Tuple2:
    return (str(v[0]), int(v[1]))


def leg_field(relay: str, client: Tuple2, vip: Tuple2) -> str:
    return f"{relay}|{client[0]}:{client[1]}|{vip[0]}:{vip[1]}"


def default_relay_id() -> str:
    return socket.gethostname().split(".")[0] or "relay"


class RedisFleet:
    """This relay's link to the fleet's Redis; see the module docstring."""

    def __init__(self, cfg: RegistryConfig, registry: Registry, *, relay_id: str | None = None,
                 on_owner_moved: Callable[[Call, OwnerAddr | None], None] | None = None,
                 on_remote_leg: Callable[[RemoteLeg], None] | None = None,
                 allows_owner: Callable[[str], bool] | None = None) -> None:
        self.cfg = cfg
        self.registry = registry
        # Owner addresses from the store are checked as a transceiver's own
        # report is (internal.allows): Redis is not trusted with where media goes.
        self.allows_owner = allows_owner
        self.relay_id = relay_id or cfg.relay_id or default_relay_id()
        self.on_owner_moved = on_owner_moved
        self.on_remote_leg = on_remote_leg
        p = cfg.key_prefix
        self.k_epoch, self.channel = f"{p}:epoch", f"{p}:events"
        self._p = p
        self.available = False
        self.ever_synced = asyncio.Event()
        self._queue: collections.deque[tuple[str, dict]] = collections.deque()
        self._wake = asyncio.Event()
        self._epoch: str | None = None
        self._own_legs: dict[str, dict] = {}  # field -> record, to refill a Redis that lost its data
        self.remote_legs: dict[tuple[Tuple2, Tuple2], RemoteLeg] = {}
        self._relay_seen: dict[str, float] = {}  # relay -> monotonic time of its last message
        self._waiting_calls: dict[int, dict] = {}  # records naming a transceiver not known yet
        self._replaced: dict[tuple[Tuple2, Tuple2], list[str]] = {}  # tuples taken over from (dead) relays
        # Calls ended lately (conn_id -> (call_id, monotonic)): a late or
        # refilled record of one must not bring it back.
        self._ended: collections.OrderedDict[int, tuple[str, float]] = collections.OrderedDict()
        self._client: aioredis.Redis | None = None
        self._task: asyncio.Task | None = None
        self._unsubscribe = registry.on_change(self._local_change)
        self.stats: collections.Counter[str] = collections.Counter()
        self.latency: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)  # publish → applied, s
        self.last_error: str | None = None

    # --- keys --------------------------------------------------------------------------

    def k_tx(self, id: int | str) -> str:
        return f"{self._p}:tx:{id}"

    def k_call(self, conn_id: int | str) -> str:
        return f"{self._p}:call:{conn_id}"

    def k_legs(self, conn_id: int | str) -> str:
        return f"{self._p}:legs:{conn_id}"

    def k_relay(self, relay: str) -> str:
        return f"{self._p}:relay:{relay}"

    def k_restarts(self, call_id: str) -> str:
        return f"{self._p}:restarts:{call_id}"

    # --- lifecycle ---------------------------------------------------------------------

    def _connect(self) -> aioredis.Redis:
        cfg = self.cfg
        kw: dict = {"socket_timeout": cfg.timeout, "socket_connect_timeout": cfg.timeout, "decode_responses": True}
        if cfg.password_file is not None:
            kw["password"] = cfg.password()
        if cfg.username:
            kw["username"] = cfg.username
        if cfg.url.startswith("rediss://"):
            kw.update(ssl_ca_certs=str(cfg.tls_ca_file) if cfg.tls_ca_file else None,
                      ssl_certfile=str(cfg.tls_cert_file) if cfg.tls_cert_file else None,
                      ssl_keyfile=str(cfg.tls_key_file) if cfg.tls_key_file else None)
        return aioredis.from_url(cfg.url, **kw)

    def new_client(self) -> aioredis.Redis:
        """Another connection to the fleet's Redis, configured as this one (call records)."""
        return self._connect()

    async def start(self, wait: float = 2.0) -> bool:
        """Connect and load the fleet's state; waits up to `wait` s for the
        first sync (relayd serves without it: new calls get 503 until then)."""
        self._task = asyncio.create_task(self._run())
        try:
            await asyncio.wait_for(self.ever_synced.wait(), wait)
        except TimeoutError:
            log.warning("registry: Redis at %s not reachable yet (%s); retrying in the background",
                        redact_url(self.cfg.url), self.last_error)
        return self.available

    async def stop(self) -> None:
        self._unsubscribe()
        if self._task is not None:
            # A last chance for queued changes (a hang-up just before SIGTERM).
            deadline = time.monotonic() + self.cfg.timeout
            while self._queue and self.available and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.available = False

    def status(self) -> dict:
        now = time.monotonic()
        lat = sorted(self.latency)
        return {
            "backend": "redis", "relay_id": self.relay_id, "available": self.available, "queued": len(self._queue),
            "epoch": self._epoch, "last_error": self.last_error,
            "relays": sorted(r for r, t in self._relay_seen.items() if now - t <= self.cfg.ttl),
            "remote_legs": len(self.remote_legs), "events": dict(self.stats),
            "propagation_ms": {"p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99)} if lat else None,
        }

    async def _run(self) -> None:
        delay = RETRY_MIN
        while True:
            client = self._connect()
            tasks: list[asyncio.Task] = []
            try:
                await client.ping()
                pubsub = client.pubsub()
                await pubsub.subscribe(self.channel)  # before the snapshot: nothing falls between
                await self._sync(client)
                self._client = client
                self.available = True
                self.ever_synced.set()
                if self.last_error is not None:
                    log.info("registry: Redis at %s is back; resynced", redact_url(self.cfg.url))
                self.last_error = None
                delay = RETRY_MIN
                tasks = [asyncio.create_task(c) for c in (self._read(pubsub), self._write(client),
                                                          self._refresh(client), self._ping(client))]
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    t.result()  # raises what ended it
                raise RedisError("a fleet task stopped")
            except (RedisError, OSError, TimeoutError, ValueError) as exc:
                problem = redact_text(f"{type(exc).__name__}: {exc}", self.cfg.url)
                if problem != self.last_error:
                    log.warning("registry: Redis at %s unavailable (%s); established calls keep flowing, "
                                "new calls are refused until it is back", redact_url(self.cfg.url), problem)
                self.last_error = problem
                self.stats["outages"] += 1 if self.available else 0
            finally:
                self.available = False
                self._client = None
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                try:
                    await client.aclose()
                except Exception:  # the connection is already gone
                    pass
            await asyncio.sleep(delay)
            delay = min(RETRY_MAX, delay * 2)

    # --- this relay's changes → Redis -----------------------------------------------------

    def _note_end(self, conn_id: int, call_id: str) -> None:
        self._ended[conn_id] = (call_id, time.monotonic())
        self._ended.move_to_end(conn_id)
        horizon = time.monotonic() - self.cfg.ttl
        while self._ended and (len(self._ended) > MAX_QUEUED or next(iter(self._ended.values()))[1] < horizon):
            self._ended.popitem(last=False)

    def _was_ended(self, rec: dict) -> bool:
        e = self._ended.get(rec["conn_id"])
        return e is not None and e[0] == rec["call_id"]

    def _local_change(self, kind: str, record: dict) -> None:
        if kind == "end":
            self._note_end(record["conn_id"], record["call_id"])
        if len(self._queue) >= MAX_QUEUED:
            self._queue.popleft()
            self.stats["queue_overflow"] += 1
        self._queue.append((kind, record))
        self._wake.set()

    def publish_leg(self, conn_id: int, client: Tuple2, vip: Tuple2, source: Tuple2, ssrc: int = 0) -> None:
        """This relay installed (or learnt the SSRC of) a client tuple."""
        rec = {"relay": self.relay_id, "conn_id": conn_id, "client": list(client), "vip": list(vip),
               "source": list(source), "ssrc": ssrc}
        self._own_legs[leg_field(self.relay_id, client, vip)] = rec
        self.remote_legs.pop((client, vip), None)  # ours now
        self._local_change("leg", rec)

    def withdraw_leg(self, conn_id: int, client: Tuple2, vip: Tuple2) -> None:
        if self._own_legs.pop(leg_field(self.relay_id, client, vip), None) is not None:
            self._local_change("leg_gone", {"relay": self.relay_id, "conn_id": conn_id, "client": list(client),
                                            "vip": list(vip)})

    def _ops(self, pipe, kind: str, rec: dict) -> None:
        ttl = int(self.cfg.ttl)
        if kind == "transceiver":
            pipe.set(self.k_tx(rec["id"]), json.dumps(rec), ex=ttl)
        elif kind == "call":
            pipe.set(self.k_call(rec["conn_id"]), json.dumps(rec), ex=ttl)
        elif kind == "end":
            pipe.delete(self.k_call(rec["conn_id"]), self.k_legs(rec["conn_id"]))
        elif kind == "leg":
            key = self.k_legs(rec["conn_id"])
            pipe.hset(key, leg_field(rec["relay"], _t(rec["client"]), _t(rec["vip"])), json.dumps(rec))
            # A failover's new leg replaces the dead relay's for the same tuple.
            for other in self._stale_fields(rec):
                pipe.hdel(key, other)
            pipe.expire(key, ttl)
        elif kind == "leg_gone":
            pipe.hdel(self.k_legs(rec["conn_id"]), leg_field(rec["relay"], _t(rec["client"]), _t(rec["vip"])))
        pipe.publish(self.channel, json.dumps({"relay": self.relay_id, "kind": kind, "ts": time.time(), "rec": rec}))

    def _stale_fields(self, rec: dict) -> list[str]:
        client, vip = _t(rec["client"]), _t(rec["vip"])
        return [leg_field(r, client, vip) for r in self._replaced.pop((client, vip), ())]

    async def _write(self, client: aioredis.Redis) -> None:
        while True:
            await self._flush(client)
            self._wake.clear()
            if not self._queue:
                await self._wake.wait()

    async def _flush(self, client: aioredis.Redis) -> None:
        while self._queue:
            batch = [self._queue[i] for i in range(min(len(self._queue), 256))]
            pipe = client.pipeline(transaction=False)
            for kind, rec in batch:
                self._ops(pipe, kind, rec)
            await pipe.execute()  # on failure the batch stays queued: sent again after the resync
            for _ in batch:
                self._queue.popleft()
            self.stats["published"] += len(batch)

    async def _refresh(self, client: aioredis.Redis) -> None:
        """Keep this relay's entries alive: transceivers it hears from, their
        calls, its own legs, its presence. What nobody refreshes ages out."""
        period = self.cfg.ttl / 3
        while True:
            ttl = int(self.cfg.ttl)
            pipe = client.pipeline(transaction=False)
            healthy = {t.id for t in self.registry.transceivers() if t.healthy}
            for t in self.registry.transceivers():
                if t.id in healthy:
                    pipe.set(self.k_tx(t.id), json.dumps(Registry._tx_record(t)), ex=ttl)
            for call in self.registry.calls():
                if call.transceiver_id in healthy:
                    pipe.expire(self.k_call(call.conn_id), ttl)
            for conn_id in {rec["conn_id"] for rec in self._own_legs.values()}:
                pipe.expire(self.k_legs(conn_id), ttl)
            pipe.set(self.k_relay(self.relay_id), json.dumps({"relay": self.relay_id, "time": time.time()}), ex=ttl)
            pipe.publish(self.channel, json.dumps({"relay": self.relay_id, "kind": "hello", "ts": time.time(),
                                                   "rec": {}}))
            await pipe.execute()
            await asyncio.sleep(period)

    async def _ping(self, client: aioredis.Redis) -> None:
        while True:
            await asyncio.sleep(PING_PERIOD)
            await asyncio.wait_for(client.ping(), self.cfg.timeout)

    async def claim_conn_id(self, conn_id: int) -> bool:
        """Reserve a connection id fleet-wide before a call takes it: False if
        another relay's call has it. FleetUnavailable when Redis is away."""
        client = self._usable_client()
        try:
            ok = await client.set(self.k_call(conn_id), json.dumps({"claim": self.relay_id}), nx=True,
                                  ex=int(self.cfg.ttl))
        except (RedisError, OSError, TimeoutError) as exc:
            raise _unavailable(exc) from None
        return bool(ok)

    async def take_restart(self, call_id: str, limit: int, window: float) -> float | None:
        """Count an ICE restart of `call_id` fleet-wide, whichever relay the
        client PATCHes: None if the call's restarts in the last `window` s
        (this one included) are within `limit`, else the seconds until the
        oldest falls out, this one not counted. A sorted set of wall-clock
        times, trimmed and read in one transaction; it expires a window after
        the last restart. FleetUnavailable when Redis is away."""
        client = self._usable_client()
        key, now, member = self.k_restarts(call_id), time.time(), f"{self.relay_id}:{secrets.token_hex(6)}"
        try:
            pipe = client.pipeline(transaction=True)
            pipe.zremrangebyscore(key, "-inf", now - window)
            pipe.zadd(key, {member: now})
            pipe.zrange(key, 0, 0, withscores=True)
            pipe.zcard(key)
            pipe.expire(key, math.ceil(window))
            _, _, oldest, count, _ = await pipe.execute()
            if count <= limit:
                return None
            await client.zrem(key, member)  # refused: not a restart (two racing relays may both refuse)
        except (RedisError, OSError, TimeoutError) as exc:
            raise _unavailable(exc) from None
        return max(0.0, window - (now - oldest[0][1]))

    def ensure_available(self) -> None:
        if not self.available:
            raise _unavailable(self.last_error or "connecting")

    def _usable_client(self) -> aioredis.Redis:
        """The Redis client while the fleet registry is available; FleetUnavailable otherwise."""
        client = self._client
        if client is None or not self.available:
            raise _unavailable(self.last_error or "connecting")
        return client

    # --- other relays' changes → this relay ------------------------------------------------

    async def _read(self, pubsub) -> None:
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is None or msg.get("type") != "message":
                continue
            try:
                m = json.loads(msg["data"])
                relay = m["relay"]
            except (ValueError, KeyError, TypeError):
                self.stats["malformed_messages"] += 1
                continue
            if relay == self.relay_id:
                continue
            self._relay_seen[relay] = time.monotonic()
            try:
                self._apply(m["kind"], m["rec"])
            except (KeyError, TypeError, ValueError) as exc:
                self.stats["malformed_messages"] += 1
                log.warning("registry: malformed %s message from relay %s: %s", m.get("kind"), relay, exc)
                continue
            if m["kind"] != "hello":
                self.stats[f"applied_{m['kind']}"] += 1
                self.latency.append(max(0.0, time.time() - float(m["ts"])))

    def _apply(self, kind: str, rec: dict) -> None:
        if kind == "transceiver":
            self.registry.apply_transceiver(rec)
            for conn_id, waiting in list(self._waiting_calls.items()):
                if waiting["transceiver_id"] == rec["id"]:
                    del self._waiting_calls[conn_id]
                    self._apply_call(waiting)
        elif kind == "call":
            self._apply_call(rec)
        elif kind == "end":
            self._note_end(rec["conn_id"], rec["call_id"])
            self._waiting_calls.pop(rec["conn_id"], None)
            self.registry.apply_end(rec["conn_id"], rec["call_id"], rec["reason"])
            for key in [k for k, leg in self.remote_legs.items() if leg.conn_id == rec["conn_id"]]:
                del self.remote_legs[key]
        elif kind == "leg":
            self._take_remote_leg(RemoteLeg.from_record(rec))
        elif kind == "leg_gone":
            key = (_t(rec["client"]), _t(rec["vip"]))
            leg = self.remote_legs.get(key)
            if leg is not None and leg.relay == rec["relay"]:
                del self.remote_legs[key]

    def _apply_call(self, rec: dict) -> None:
        if "claim" in rec or self._was_ended(rec):
            return
        try:
            applied = self.registry.apply_call(rec, allows=self.allows_owner)
        except RefusedRecord as exc:
            kind = "stale" if "older" in str(exc) else "outside"
            self.stats[f"refused_records_{kind}"] += 1
            _refusals.log(logging.WARNING, kind, "registry: refused a call record from the fleet: %s", exc)
            return
        if applied is None:
            waiting = self._waiting_calls.get(rec["conn_id"])
            if waiting is None or int(waiting.get("gen") or 0) <= int(rec.get("gen") or 0):
                self._waiting_calls[rec["conn_id"]] = rec
            return
        call, previous = applied
        if previous is not None and call.owner is not None and previous != call.owner and self.on_owner_moved:
            self.on_owner_moved(call, previous)

    def _take_remote_leg(self, leg: RemoteLeg) -> None:
        key = (leg.client, leg.vip)
        if leg_field(self.relay_id, leg.client, leg.vip) in self._own_legs:
            # Another relay took over a tuple we held (failover): ours is stale.
            self._own_legs.pop(leg_field(self.relay_id, leg.client, leg.vip), None)
        self.remote_legs[key] = leg
        if self.on_remote_leg:
            self.on_remote_leg(leg)

    # --- resync ----------------------------------------------------------------------------

    async def _scan_json(self, client: aioredis.Redis, pattern: str) -> list[dict]:
        keys = [k async for k in client.scan_iter(match=pattern, count=1000)]
        out = []
        for i in range(0, len(keys), 500):
            for raw in await client.mget(keys[i:i + 500]):
                if raw is None:
                    continue
                try:
                    out.append(json.loads(raw))
                except ValueError:
                    self.stats["malformed_keys"] += 1
        return out

    async def _sync(self, client: aioredis.Redis) -> None:
        await client.set(self.k_epoch, secrets.token_hex(8), nx=True)
        epoch = await client.get(self.k_epoch)
        lost = self._epoch is not None and epoch != self._epoch
        first = self._epoch is None
        if lost:
            log.warning("registry: Redis lost its data (new epoch); refilling it from this relay")
            self.stats["refills"] += 1
            # The whole state goes out again; of what waited, only removals
            # still matter (after it, so that they win).
            removals = [op for op in self._queue if op[0] in ("end", "leg_gone")]
            self._queue.clear()
            for t in self.registry.transceivers():
                self._queue.append(("transceiver", Registry._tx_record(t)))
            for call in self.registry.calls():
                self._queue.append(("call", call.record()))
            for rec in self._own_legs.values():
                self._queue.append(("leg", rec))
            self._queue.extend(removals)
        await self._flush(client)  # what this relay did while away
        self._epoch = epoch
        for rec in await self._scan_json(client, f"{self._p}:tx:*"):
            self.registry.apply_transceiver(rec)
        seen: set[int] = set()
        for rec in await self._scan_json(client, f"{self._p}:call:*"):
            if "claim" in rec:
                continue
            seen.add(rec["conn_id"])
            self._apply_call(rec)
        if not first and not lost:
            # Ended elsewhere while we were away (their end messages are gone).
            for call in self.registry.calls():
                if call.conn_id not in seen:
                    self.registry.apply_end(call.conn_id, call.call_id, "ended-elsewhere")
                    self.stats["resync_ended"] += 1
        self.remote_legs.clear()
        async for key in client.scan_iter(match=f"{self._p}:legs:*", count=1000):
            for raw in (await client.hgetall(key)).values():
                try:
                    leg = RemoteLeg.from_record(json.loads(raw))
                except (ValueError, KeyError, TypeError):
                    self.stats["malformed_keys"] += 1
                    continue
                if leg.relay != self.relay_id:
                    self._take_remote_leg(leg)
        self.stats["syncs"] += 1

    # --- queries for the slow path ------------------------------------------------------------

    def remote_leg(self, client: Tuple2, vip: Tuple2) -> RemoteLeg | None:
        leg = self.remote_legs.get((client, vip))
        return leg if leg is not None and leg.relay != self.relay_id else None

    def others_serve(self, conn_id: int) -> bool:
        """Does a live relay other than this one hold a leg of this call?"""
        now = time.monotonic()
        return any(leg.conn_id == conn_id and now - self._relay_seen.get(leg.relay, -1e9) <= self.cfg.ttl
                   for leg in self.remote_legs.values())

    def replaced(self, client: Tuple2, vip: Tuple2, relay: str) -> None:
        """This relay took over `relay`'s leg of (client, vip): its field goes with our next write."""
        self._replaced.setdefault((client, vip), []).append(relay)


def _pct(values: list[float], q: float) -> float:
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 3)
