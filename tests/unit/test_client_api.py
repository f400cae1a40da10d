"""The public listener as an attacker sees it: client credentials (API keys,
tokens), who may end or update a call, creation limits, CORS, and what error
bodies reveal. Real aiohttp listeners on loopback; stand-in transceivers."""

from __future__ import annotations

import asyncio
import re

import pytest

from manager.protocol.client_auth import mint_token
from manager.relay.config import LimitsConfig
from manager.relay.credentials import ClientAuth
from tests.support.signaling import SDP, _error, relay, run
from tests.support.waiting import Hopeless, eventually_async

TOKEN_KEY = bytes(range(32))


def bearer(credential: str) -> dict[str, str]:
    return {**SDP, "Authorization": f"Bearer {credential}"}


async def create(env, headers: dict[str, str]):
    _, offer = await env.offer()
    return await env.http.post("/v1/calls", data=offer, headers=headers)


def test_tokens_guard_creation_and_bind_a_call_to_its_creator() -> None:
    async def scenario() -> None:
        async with relay(transceivers=1, auth=ClientAuth("tokens", token_key=TOKEN_KEY)) as env:
            # No credential, a forged one, an expired one: 401 with the reason.
            resp = await create(env, SDP)
            assert await _error(resp, 401) == "unauthorized: missing Authorization: Bearer credential"
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            resp = await create(env, bearer(mint_token(bytes(32), ttl=60)))
            assert await _error(resp, 401) == "unauthorized: token signature is invalid"
            expired = mint_token(TOKEN_KEY, ttl=60, now=1_000_000)
            resp = await create(env, bearer(expired))
            assert re.fullmatch(r"unauthorized: token expired \d+ s ago", await _error(resp, 401))
            assert env.registry.calls() == []

            alice, mallory = mint_token(TOKEN_KEY, ttl=60, subject="a"), mint_token(TOKEN_KEY, ttl=60, subject="m")
            resp = await create(env, bearer(alice))
            assert resp.status == 201, await resp.text()
            location = resp.headers["Location"]
            assert re.fullmatch(r"/v1/calls/[0-9a-f]{32}", location)

            # Ending or updating it: not without a token, not with another valid one.
            for headers in ({}, {"Authorization": f"Bearer {mallory}"}, {"Authorization": "Bearer junk"},
                            {"Authorization": f"Bearer {expired}"}):
                resp = await env.http.delete(location, headers=headers)
                assert resp.status == 401, await resp.text()
                resp = await env.http.patch(location, data="a=ice-ufrag:x\r\n",
                                            headers={**headers, "Content-Type": "application/trickle-ice-sdpfrag"})
                assert resp.status == 401
            assert len(env.registry.calls()) == 1
            frag = f"a=ice-ufrag:{env.registry.calls()[0].client_ufrag}\r\n"
            resp = await env.http.patch(location, data=frag, headers={
                "Authorization": f"Bearer {alice}", "Content-Type": "application/trickle-ice-sdpfrag"})
            assert resp.status == 204
            resp = await env.http.delete(location, headers={"Authorization": f"Bearer {alice}"})
            assert resp.status == 204
            assert env.registry.calls() == []

    run(scenario)


def test_api_keys() -> None:
    async def scenario() -> None:
        async with relay(transceivers=1, auth=ClientAuth("api_keys", api_keys=["k-one", "k-two"])) as env:
            resp = await create(env, bearer("k-three"))
            assert await _error(resp, 401) == "unauthorized: API key is not valid"
            resp = await create(env, bearer("k-two"))
            assert resp.status == 201
            # The other key cannot end k-two's call.
            resp = await env.http.delete(resp.headers["Location"], headers={"Authorization": "Bearer k-one"})
            assert await _error(resp, 401) == "unauthorized: this call was created with another credential"

    run(scenario)


def test_creation_rate_per_source() -> None:
    limits = LimitsConfig(create_rate=0.001, create_burst=2)

    async def scenario() -> None:
        async with relay(transceivers=1, limits=limits) as env:
            for _ in range(2):
                assert (await create(env, SDP)).status == 201
            resp = await create(env, SDP)
            assert await _error(resp, 429) == ("too many calls from this address (at most 0.001 per second, "
                                               "bursts of 2)")
            assert resp.headers["Retry-After"] == "1"
            assert len(env.registry.calls()) == 2

    run(scenario)


def test_pending_caps() -> None:
    async def scenario() -> None:
        # The transceiver holds the first placement until released, well
        # within relayd's timeout: it is pending whatever the machine's load.
        for limits, status, reason in (
                (LimitsConfig(max_pending_per_source=1), 429,
                 "too many calls being set up from this address (at most 1 at once)"),
                (LimitsConfig(max_pending=1), 503, "too many calls are being set up (1); retry shortly")):
            async with relay(transceivers=1, timeout=30.0, limits=limits) as env:
                env.fakes[0].mode = "slow"  # placements stay pending
                first = asyncio.ensure_future(create(env, SDP))

                def pending(env=env, first=first) -> bool:
                    if first.done():
                        raise Hopeless(f"the first placement ended: {first.result().status}")
                    return bool(env.fakes[0].created)

                await eventually_async(pending, timeout=20, what="the first placement pending at the transceiver")
                resp = await create(env, SDP)
                assert await _error(resp, status) == reason
                env.fakes[0].release.set()
                assert (await first).status == 201

    run(scenario)


@pytest.mark.parametrize(("mutate", "status", "message"), [
    (lambda o: o + "a=x:" + "y" * 70000 + "\r\n", 413, r"offer too large: \d+ bytes; at most 65536"),
    (lambda o: o + "a=x\r\n" * 500, 400, r"bad offer: offer has \d+ lines; at most 400 are accepted"),
    (lambda o: o + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n" * 8, 400,
     r"bad offer: offer has 10 media sections; at most 8 are accepted"),
])
def test_offer_size_caps(mutate, status: int, message: str) -> None:
    async def scenario() -> None:
        async with relay(transceivers=1) as env:
            _, offer = await env.offer()
            resp = await env.http.post("/v1/calls", data=mutate(offer), headers=SDP)
            assert re.fullmatch(message, await _error(resp, status))
            assert env.registry.calls() == [] and env.fakes[0].created == []

    run(scenario)


def test_cors_preflight_only_for_configured_origins() -> None:
    async def scenario() -> None:
        async with relay(transceivers=1, allowed_origins=["https://app.example"]) as env:
            pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                   "Access-Control-Request-Headers": "authorization, content-type"}
            resp = await env.http.options("/v1/calls", headers=pre)
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "POST" in resp.headers["Access-Control-Allow-Methods"]
            assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
            _, offer = await env.offer()
            resp = await env.http.post("/v1/calls", data=offer, headers={**SDP, "Origin": "https://app.example"})
            assert resp.status == 201
            assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "Location" in resp.headers["Access-Control-Expose-Headers"]
            # Another origin gets no grant.
            resp = await env.http.options("/v1/calls", headers={**pre, "Origin": "https://evil.example"})
            assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
        async with relay(transceivers=1) as env:  # default: no origin at all
            resp = await env.http.options("/v1/calls", headers={"Origin": "https://app.example"})
            assert resp.status == 403

    run(scenario)


def test_owner_outside_the_internal_prefixes_is_refused() -> None:
    async def scenario() -> None:
        async with relay(transceivers=1, allows_owner=lambda a: a.startswith("127.")) as env:
            env.fakes[0].mode = "outside-owner"
            _, resp = await env.place()
            text = await _error(resp, 502)
            assert text == "transceiver 1 failed to answer the offer" and "8.8.8.8" not in text
            assert env.registry.calls() == []

    run(scenario)


def test_an_ipv6_64_is_one_source_and_forwarded_for_counts_only_from_trusted_proxies() -> None:
    """Behind a trusted proxy (the test client on 127.0.0.1), X-Forwarded-For
    names the source: two addresses of one /64 share its bucket, another /64
    has its own. From an untrusted peer the header is ignored: the peer is
    the source, whatever it claims."""
    limits = LimitsConfig(create_rate=0.001, create_burst=1)

    def via(addr: str) -> dict[str, str]:
        return {**SDP, "X-Forwarded-For": addr}

    async def scenario() -> None:
        async with relay(transceivers=1, limits=limits, trusted_proxies=["127.0.0.0/8"]) as env:
            assert (await create(env, via("2001:db8:1:2::1"))).status == 201
            resp = await create(env, via("2001:db8:1:2::ffff"))  # same /64: its bucket is spent
            assert await _error(resp, 429) == ("too many calls from this address (at most 0.001 per second, "
                                               "bursts of 1)")
            assert (await create(env, via("2001:db8:1:3::1"))).status == 201  # another /64
            assert (await create(env, via("198.51.100.1"))).status == 201
        async with relay(transceivers=1, limits=limits) as env:  # no trusted proxy
            assert (await create(env, via("2001:db8:1:2::1"))).status == 201
            resp = await create(env, via("2001:db8:9:9::1"))  # a made-up client: still 127.0.0.1's bucket
            await _error(resp, 429)

    run(scenario)


def test_a_token_creates_one_call() -> None:
    """A token's jti is spent by the call it created: replayed, it is refused
    while it lives. A creation that failed gives it back."""
    async def scenario() -> None:
        async with relay(transceivers=1, auth=ClientAuth("tokens", token_key=TOKEN_KEY)) as env:
            token = mint_token(TOKEN_KEY, ttl=60, subject="a")
            env.fakes[0].mode = "error"
            resp = await create(env, bearer(token))
            assert resp.status == 502, await resp.text()
            env.fakes[0].mode = "ok"
            resp = await create(env, bearer(token))  # the failed creation did not spend it
            assert resp.status == 201, await resp.text()
            resp = await create(env, bearer(token))
            assert await _error(resp, 401) == ("unauthorized: token was already used to create a call "
                                               "(a token creates one call)")
            assert len(env.registry.calls()) == 1

    run(scenario)


def test_live_calls_per_token_subject_are_capped() -> None:
    async def scenario() -> None:
        auth = ClientAuth("tokens", token_key=TOKEN_KEY, max_calls_per_subject=2)
        async with relay(transceivers=1, auth=auth) as env:
            locations = []
            for _ in range(2):
                token = mint_token(TOKEN_KEY, ttl=60, subject="sub")
                resp = await create(env, bearer(token))
                assert resp.status == 201
                locations.append((resp.headers["Location"], token))
            resp = await create(env, bearer(mint_token(TOKEN_KEY, ttl=60, subject="sub")))
            assert await _error(resp, 429) == "too many calls for this token's subject (at most 2 at once)"
            assert (await create(env, bearer(mint_token(TOKEN_KEY, ttl=60, subject="other")))).status == 201
            location, token = locations[0]
            assert (await env.http.delete(location, headers={"Authorization": f"Bearer {token}"})).status == 204
            resp = await create(env, bearer(mint_token(TOKEN_KEY, ttl=60, subject="sub")))  # one ended: room again
            assert resp.status == 201

    run(scenario)
