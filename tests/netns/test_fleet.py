"""The fleet's shared registry against a real redis-server (started here on
its own unix socket and directory): replication between relays, recovery
after a restart, a Redis outage and its return, refusals."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from manager.protocol.addresses import OwnerAddr
from manager.relay.config import RegistryConfig
from manager.relay.fleet import FleetUnavailable, RedisFleet
from manager.relay.registry import Registry
from tests.support.redis_server import REDIS, RedisServer
from tests.support.redis_server import registry_config as _cfg
from tests.support.waiting import eventually_async

OWNER_A = OwnerAddr(addr4="10.10.2.2", port4=40000)
OWNER_B = OwnerAddr(addr4="10.10.3.2", port4=40001)


async def _until(pred, timeout: float = 3.0, what: str = "condition") -> float:
    """eventually_async, and how long the wait took (propagation times)."""
    t0 = time.monotonic()
    await eventually_async(pred, timeout, what=what, interval=0.005)
    return time.monotonic() - t0


class Relay:
    """A relay's registry and fleet link (no kernel: what the slow path would be told is recorded)."""

    def __init__(self, cfg: RegistryConfig, name: str, allows=None) -> None:
        self.registry = Registry()
        self.moves: list[tuple[int, OwnerAddr | None, OwnerAddr | None]] = []
        self.ended: list[tuple[int, str]] = []
        self.registry.on_call_ended(lambda c, r: self.ended.append((c.conn_id, r)))
        self.fleet = RedisFleet(cfg, self.registry, relay_id=name,
                                on_owner_moved=lambda call, prev: self.moves.append((call.conn_id, prev, call.owner)),
                                allows_owner=allows)

    async def __aenter__(self) -> Relay:
        assert await self.fleet.start(wait=5.0), self.fleet.last_error
        return self

    async def __aexit__(self, *exc) -> None:
        await self.fleet.stop()


def _place(reg: Registry, tx: int = 1, owner: OwnerAddr = OWNER_A, credential: bytes | None = b"\x01" * 32):
    conn_id = reg.allocate_conn_id()
    call = reg.add_call(conn_id=conn_id, transceiver_id=tx, client_ufrag="cli1", server_ufrag=f"srv{conn_id}",
                        credential=credential)
    reg.activate(conn_id, owner)
    return call


def test_every_change_reaches_the_other_relay(server: RedisServer, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Relay(_cfg(server, tmp_path), "r1") as a, Relay(_cfg(server, tmp_path), "r2") as b:
            a.registry.register_transceiver(1, "https://10.10.2.2:8700", 10)
            a.registry.register_transceiver(2, "https://10.10.3.2:8700", 10)
            await _until(lambda: len(b.registry.transceivers()) == 2, what="transceivers on r2")
            call = _place(a.registry)
            await _until(lambda: (c := b.registry.get_call(call.conn_id)) is not None and c.state == "active",
                         what="the call on r2")
            seen = b.registry.get_call_by_id(call.call_id)
            assert seen is not None and seen.owner == OWNER_A and seen.server_ufrag == call.server_ufrag
            assert seen.credential == b"\x01" * 32  # DELETE with the creating credential works on r2
            assert b.registry.get_transceiver(1).calls == 1

            # A migration on r2 reaches r1 as an owner move (its kernel maps follow).
            b.registry.set_owner(call.conn_id, 2, OWNER_B)
            await _until(lambda: a.registry.get_call(call.conn_id).owner == OWNER_B, what="the move on r1")
            assert a.moves == [(call.conn_id, OWNER_A, OWNER_B)] and b.moves == []
            assert a.registry.get_transceiver(1).calls == 0 and a.registry.get_transceiver(2).calls == 1

            a.registry.set_draining(2)
            await _until(lambda: b.registry.get_transceiver(2).draining, what="draining on r2")

            b.registry.end_call(call.conn_id, "client-hangup")
            await _until(lambda: a.registry.get_call(call.conn_id) is None, what="the end on r1")
            assert a.ended == [(call.conn_id, "client-hangup")]
            assert a.registry.get_transceiver(2).calls == 0
            raw = server.raw()
            assert raw.get(a.fleet.k_call(call.conn_id)) is None
            assert 0 < raw.ttl(a.fleet.k_tx(1)) <= 10  # entries age out without refreshes
            lat = sorted(b.fleet.latency)
            assert lat and lat[-1] < 5.0
            print(f"propagation over {len(lat)} messages: p50 {lat[len(lat) // 2] * 1000:.2f} ms, "
                  f"max {lat[-1] * 1000:.2f} ms")

    asyncio.run(scenario())


def test_a_restarted_relay_recovers_calls_and_load(server: RedisServer, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Relay(_cfg(server, tmp_path), "r1") as a:
            a.registry.register_transceiver(1, "https://10.10.2.2:8700", 10)
            calls = [_place(a.registry) for _ in range(5)]
            await _until(lambda: not a.fleet._queue, what="the writes")
        # relay 1 restarts: an empty registry, the same Redis.
        async with Relay(_cfg(server, tmp_path), "r1") as again:
            reg = again.registry
            assert {c.call_id for c in reg.calls()} == {c.call_id for c in calls}
            assert reg.get_transceiver(1).calls == 5  # load is not reset to 0
            one = reg.get_call_by_id(calls[2].call_id)
            assert one.state == "active" and one.owner == OWNER_A
            reg.end_call(one.conn_id, "client-hangup")  # ending works on a recovered call
            await _until(lambda: server.raw().get(again.fleet.k_call(one.conn_id)) is None, what="the end in Redis")

    asyncio.run(scenario())


def test_connection_ids_are_claimed_fleet_wide(server: RedisServer, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Relay(_cfg(server, tmp_path), "r1") as a, Relay(_cfg(server, tmp_path), "r2") as b:
            assert await a.fleet.claim_conn_id(1234)
            assert not await b.fleet.claim_conn_id(1234)  # r2 must pick another id
            assert not await a.fleet.claim_conn_id(1234)

    asyncio.run(scenario())


def test_redis_outage_refuses_new_work_then_resumes(server: RedisServer, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Relay(_cfg(server, tmp_path), "r1") as a, Relay(_cfg(server, tmp_path), "r2") as b:
            a.registry.register_transceiver(1, "https://10.10.2.2:8700", 10)
            kept, hung_up = _place(a.registry), _place(a.registry)
            await _until(lambda: b.registry.get_call(hung_up.conn_id) is not None, what="r2 in sync")

            server.stop()
            await _until(lambda: not a.fleet.available and not b.fleet.available, what="the outage to be seen")
            with pytest.raises(FleetUnavailable, match="unavailable"):
                await a.fleet.claim_conn_id(99)
            # The registries keep serving what they hold; changes wait in the queue.
            assert a.registry.get_call(kept.conn_id).owner == OWNER_A
            a.registry.end_call(hung_up.conn_id, "client-hangup")
            assert a.fleet._queue

            server.start()  # a new, empty Redis (no persistence): the relays refill it
            took = await _until(lambda: a.fleet.available and b.fleet.available, timeout=3.0,
                                what="the relays to resync")
            print(f"resynced {took * 1000:.0f} ms after Redis returned")
            assert took < 1.5
            assert await a.fleet.claim_conn_id(99)  # new calls work again
            await _until(lambda: b.registry.get_call(hung_up.conn_id) is None, what="the queued end on r2")
            raw = server.raw()
            await _until(lambda: raw.get(a.fleet.k_call(kept.conn_id)) is not None, what="the refill")
            assert raw.get(a.fleet.k_call(hung_up.conn_id)) is None or b.registry.get_call(hung_up.conn_id) is None
            assert a.fleet.stats["refills"] == 1 and a.fleet.stats["outages"] == 1

    asyncio.run(scenario())


def test_a_wrong_password_is_reported_not_raised(server: RedisServer, tmp_path: Path) -> None:
    bad = tmp_path / "bad.password"
    fd = os.open(bad, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not-the-password\n")
    os.close(fd)
    cfg = RegistryConfig(backend="redis", url=server.url, password_file=bad, ttl=10, timeout=0.5)

    async def scenario() -> None:
        fleet = RedisFleet(cfg, Registry(), relay_id="r1")
        try:
            assert not await fleet.start(wait=1.0)
            assert not fleet.available and "password" in (fleet.last_error or "")
            with pytest.raises(FleetUnavailable):
                fleet.ensure_available()
        finally:
            await fleet.stop()

    asyncio.run(scenario())


def test_malformed_messages_are_counted_and_skipped(server: RedisServer, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Relay(_cfg(server, tmp_path), "r1") as a:
            raw = server.raw()
            raw.publish(a.fleet.channel, "not json")
            raw.publish(a.fleet.channel, '{"relay": "rX", "kind": "call", "ts": 0, "rec": {"conn_id": 1}}')
            await _until(lambda: a.fleet.stats["malformed_messages"] == 2, what="both counted")
            a.registry.register_transceiver(1, "https://10.10.2.2:8700", 10)
            _place(a.registry)  # still working
            await _until(lambda: not a.fleet._queue and a.fleet.available, what="writes after the junk")

    asyncio.run(scenario())


@pytest.mark.parametrize(("fields", "error"), [
    ({"backend": "redis"}, "url: needed with backend = 'redis'"),
    ({"backend": "redis", "url": "http://x"}, "must be a redis://, rediss:// or unix:// URL"),
    ({"backend": "redis", "url": "redis://x", "tls_ca_file": "/ca.pem"}, "only used with a rediss:// URL"),
    ({"backend": "redis", "url": "rediss://x", "tls_cert_file": "/c.pem"}, "tls_cert_file and tls_key_file"),
    ({"backend": "redis", "url": "redis://x", "relay_id": "bad id"}, "relay_id"),
])
def test_bad_registry_config_names_the_field(fields: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error.replace("(", r"\(").replace(")", r"\)")):
        RegistryConfig(**fields)


def test_rediss_with_mutual_tls(tmp_path: Path) -> None:
    """A Redis that speaks only TLS and wants client certificates: the fleet
    connects with the configured CA, certificate and key; without the client
    certificate Redis refuses it (and the relay reports it, no traceback)."""
    from manager import pki

    d = tmp_path / "pki"
    pki.init_ca(d)
    # (pki issues relayd/transceiver names only; a transceiver-style certificate with the IP serves here)
    server = pki.issue(d, pki.transceiver_name(9), ip_addresses=("127.0.0.1",))
    client = pki.issue(d, pki.relayd_name())
    with socket_port() as port:
        proc = subprocess.Popen([REDIS, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(server.cert),
                                 "--tls-key-file", str(server.key), "--tls-ca-cert-file", str(server.ca),
                                 "--tls-auth-clients", "yes", "--save", "", "--appendonly", "no",
                                 "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"rediss://127.0.0.1:{port}/0"

        async def scenario() -> None:
            # A TLS handshake with client certificates takes longer than half a
            # second on an emulated CPU (make vm-test): the same checks, more time.
            good = RegistryConfig(backend="redis", url=url, tls_ca_file=server.ca, tls_cert_file=client.cert,
                                  tls_key_file=client.key, ttl=10, timeout=5.0)
            a, b = Relay(good, "r1"), Relay(good, "r2")
            deadline = time.monotonic() + 60
            while not await a.fleet.start(wait=5.0):  # redis-server may still be starting
                await a.fleet.stop()
                a = Relay(good, "r1")
                assert time.monotonic() < deadline, a.fleet.last_error
            async with b:
                a.registry.register_transceiver(1, "https://10.10.2.2:8700", 10)
                call = _place(a.registry)
                await _until(lambda: b.registry.get_call(call.conn_id) is not None, what="the call over TLS")
            await a.fleet.stop()
            no_cert = RegistryConfig(backend="redis", url=url, tls_ca_file=server.ca, ttl=10, timeout=0.5)
            fleet = RedisFleet(no_cert, Registry(), relay_id="r3")
            try:
                assert not await fleet.start(wait=1.0)
                assert fleet.last_error
            finally:
                await fleet.stop()

        asyncio.run(scenario())
    finally:
        proc.kill()
        proc.wait()


class socket_port:
    """A free TCP port on 127.0.0.1 (released on entry: the server binds it next)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc) -> None:
        return None


def test_records_from_the_store_are_checked_and_never_older_than_what_is_held(server, tmp_path):
    """Redis is not trusted with where media goes: a call record naming an
    owner outside the internal prefixes is refused. A record older than the
    one applied (a message delivered late, after a resync) does not move the
    call back."""
    cfg = _cfg(server, tmp_path)

    def internal(addr: str) -> bool:
        return addr.startswith("10.10.")

    async def go() -> None:
        async with Relay(cfg, "a", allows=internal) as a, Relay(cfg, "b", allows=internal) as b:
            a.registry.register_transceiver(1, "http://10.10.2.2:8700", 10)
            a.registry.register_transceiver(2, "http://10.10.3.2:8700", 10)
            call = _place(a.registry)
            await _until(lambda: b.registry.get_call(call.conn_id) is not None, what="the call on b")
            placed = call.record()
            raw = server.raw()

            def inject(rec: dict) -> None:
                raw.publish(b.fleet.channel, json.dumps({"relay": "intruder", "kind": "call", "ts": time.time(),
                                                         "rec": rec}))

            inject({**placed, "owner": {"addr4": "203.0.113.5", "port4": 4000}, "gen": placed["gen"] + 5})
            await _until(lambda: b.fleet.stats["refused_records_outside"] == 1, what="the refusal")
            assert b.registry.get_call(call.conn_id).owner == OWNER_A and b.moves == []
            a.registry.set_owner(call.conn_id, 2, OWNER_B)  # a migration on a
            await _until(lambda: b.registry.get_call(call.conn_id).owner == OWNER_B, what="the move on b")
            inject(placed)  # the record before the move, late
            await _until(lambda: b.fleet.stats["refused_records_stale"] == 1, what="the stale refusal")
            held = b.registry.get_call(call.conn_id)
            assert held.owner == OWNER_B and held.transceiver_id == 2
            assert [(c, new) for c, _, new in b.moves] == [(call.conn_id, OWNER_B)]

    asyncio.run(go())
