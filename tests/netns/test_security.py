"""The internal side as an attacker on the internal network would try it:
relayd's transceiver listener and the transceivers' control APIs, with real
relayd and transceivers in a namespace lab, real TLS. Each refusal has its
lock: without CERT_REQUIRED the no-certificate cases pass through, without
the identity checks the wrong-certificate cases do."""

from __future__ import annotations

import asyncio
import http.client
import json
import secrets
import ssl
from pathlib import Path

import aiohttp
import pytest

from manager import pki
from manager.lab.netns import NetnsExecutor
from manager.lab.services import CONTROL_PORT, INTERNAL_PORT, running_lab
from manager.protocol.ufrag import encode_ufrag
from manager.transceiver.errors import InvalidRequest
from manager.transceiver.transceiver import Transceiver

pytestmark = pytest.mark.netns

REFUSED = (ssl.SSLError, ConnectionError, http.client.RemoteDisconnected, OSError)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with running_lab(f"sec{secrets.token_hex(3)}", tmp_path_factory.mktemp("services")) as (lab, svc):
        rogue = tmp_path_factory.mktemp("rogue")
        pki.init_ca(rogue)
        pki.issue(rogue, pki.transceiver_name(1))
        pki.issue(rogue, pki.relayd_name())
        yield lab, svc, svc.workdir / "pki", rogue


def _context(ca: Path, identity: tuple[Path, str] | None) -> ssl.SSLContext:
    # The server's name is not what these tests are about: its refusals are.
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    if identity is not None:
        d, name = identity
        p = pki.paths(d, name)
        ctx.load_cert_chain(str(p.cert), str(p.key))
    return ctx


def https(ns: str, host: str, port: int, method: str, path: str, body: dict | None, *, ca: Path,
          identity: tuple[Path, str] | None) -> tuple[int, str]:
    """One request over TLS from inside namespace `ns`: (status, body)."""

    def go() -> tuple[int, str]:
        conn = http.client.HTTPSConnection(host, port, context=_context(ca, identity), timeout=5)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    with NetnsExecutor(ns) as ex:
        return ex.call(go)


def plain(ns: str, url_host: str, port: int, method: str, path: str) -> int:
    def go() -> int:
        conn = http.client.HTTPConnection(url_host, port, timeout=5)
        try:
            conn.request(method, path, body=b"{}", headers={"Content-Type": "application/json"})
            return conn.getresponse().status
        finally:
            conn.close()

    with NetnsExecutor(ns) as ex:
        return ex.call(go)


# -- relayd's internal listener --------------------------------------------------------------


def register(lab, ca, identity, body=None, *, tid=1):
    ep = lab.transceivers[tid - 1]
    body = body or {"id": tid, "control_url": f"https://{ep.addr4}:{CONTROL_PORT}", "capacity": 5}
    return https(ep.ns, lab.internal4, INTERNAL_PORT, "POST", "/v1/transceivers", body, ca=ca, identity=identity)


def test_registration_refused_without_a_certificate(env):
    lab, svc, d, rogue = env
    with pytest.raises(REFUSED):
        register(lab, d / "ca.pem", None)


def test_registration_refused_with_another_cas_certificate(env):
    lab, svc, d, rogue = env
    with pytest.raises(REFUSED):
        register(lab, d / "ca.pem", (rogue, "transceiver-1"))


def test_registration_refused_for_another_id(env):
    lab, svc, d, rogue = env
    status, text = register(lab, d / "ca.pem", (d, "transceiver-2"), tid=1)
    assert (status, text.strip()) == (403, "this certificate is for transceiver 2, not 1")
    # relayd's own certificate is no transceiver's either.
    status, text = register(lab, d / "ca.pem", (d, "relayd"), tid=1)
    assert (status, text.strip()) == (403, "a transceiver certificate from this relay's CA is required")


def test_registration_refused_outside_the_internal_prefixes(env):
    lab, svc, d, rogue = env
    body = {"id": 1, "control_url": f"https://8.8.8.8:{CONTROL_PORT}", "capacity": 5}
    status, text = register(lab, d / "ca.pem", (d, "transceiver-1"), body)
    assert (status, text.strip()) == (403, "control_url host '8.8.8.8' is not an address in the internal prefixes")
    t1 = next(t for t in svc.transceivers() if t["id"] == 1)
    assert "8.8.8.8" not in t1["control_url"]


def test_heartbeats_need_the_transceivers_own_certificate(env):
    lab, svc, d, rogue = env
    ep = lab.transceivers[0]
    body = {"healthy": True, "calls": []}
    with pytest.raises(REFUSED):
        https(ep.ns, lab.internal4, INTERNAL_PORT, "PUT", "/v1/transceivers/1/heartbeat", body,
              ca=d / "ca.pem", identity=None)
    status, _ = https(ep.ns, lab.internal4, INTERNAL_PORT, "PUT", "/v1/transceivers/1/heartbeat", body,
                      ca=d / "ca.pem", identity=(d, "transceiver-2"))
    assert status == 403
    status, _ = https(ep.ns, lab.internal4, INTERNAL_PORT, "PUT", "/v1/transceivers/1/heartbeat", body,
                      ca=d / "ca.pem", identity=(d, "transceiver-1"))
    assert status == 204


def test_the_public_listener_serves_no_transceiver_route_and_no_listing(env):
    lab, svc, d, rogue = env
    host, port = lab.vip4, 8080
    for method, path in (("POST", "/v1/transceivers"), ("PUT", "/v1/transceivers/1/heartbeat"),
                         ("GET", "/v1/transceivers"), ("GET", "/v1/calls"), ("GET", "/v1/calls/x")):
        assert plain(lab.client_ns, host, port, method, path) in (404, 405), (method, path)
    # The transceivers are still registered and healthy through all of it.
    assert sorted(t["id"] for t in svc.transceivers() if t["healthy"]) == [1, 2]


# -- the transceivers' control API ------------------------------------------------------------

CONTROL_ROUTES = [
    ("POST", "/calls", {"conn_id": 5, "ufrag": "AAAAbbbbCCCCddddEEEEffff", "offer": "v=0"}),
    ("POST", "/calls/import", {"conn_id": 5, "state": {}}),
    ("POST", "/calls/5/export", {"freeze": True}),
    ("POST", "/calls/5/release", {}),
    ("POST", "/calls/5/activate", {}),
    ("POST", "/calls/5/unfreeze", {}),
    ("DELETE", "/calls/5", None),
    ("GET", "/calls", None),
]


@pytest.mark.parametrize(("method", "path", "body"), CONTROL_ROUTES, ids=[f"{m} {p}" for m, p, _ in CONTROL_ROUTES])
def test_control_api_refuses_all_but_relayd(env, method, path, body):
    lab, svc, d, rogue = env
    ep = lab.transceivers[0]

    def call(identity, ca=d / "ca.pem"):
        return https(lab.relay_ns, ep.addr4, CONTROL_PORT, method, path, body, ca=ca, identity=identity)

    with pytest.raises(REFUSED):
        call(None)
    with pytest.raises(REFUSED):
        call((rogue, "relayd"))
    status, text = call((d, "transceiver-2"))  # a peer transceiver: a valid certificate, not relayd's
    assert (status, json.loads(text)) == (403, {"error": "relayd's client certificate is required"})
    status, _ = call((d, "relayd"))
    assert status != 403  # relayd gets the call-level answer (unknown call, bad body, ...)


# -- routing hints at the transceiver --------------------------------------------------------------

KEY = bytes(range(32))


def test_the_transceiver_verifies_the_routing_hint() -> None:
    async def scenario() -> None:
        async with Transceiver(1, capacity=4, hint_key=KEY) as tx:
            good = encode_ufrag(KEY, 1, 7)
            forged = good[:-1] + ("A" if good[-1] != "A" else "B")  # one MAC character changed
            with pytest.raises(InvalidRequest, match="ufrag carries no valid routing hint: ufrag MAC does not match"):
                await tx.create_call(7, forged, "v=0\r\n")
            with pytest.raises(InvalidRequest, match="ufrag routes to transceiver 2, not 1"):
                await tx.create_call(7, encode_ufrag(KEY, 2, 7), "v=0\r\n")
            with pytest.raises(InvalidRequest, match="ufrag routes to conn_id 8, not 7"):
                await tx.create_call(7, encode_ufrag(KEY, 1, 8), "v=0\r\n")
            with pytest.raises(InvalidRequest, match="ufrag carries no valid routing hint"):
                await tx.create_call(7, encode_ufrag(bytes(32), 1, 7), "v=0\r\n")  # another relay's key
            # The right hint passes the check; this offer then fails on its own merits.
            with pytest.raises(InvalidRequest, match="offer"):
                await tx.create_call(7, encode_ufrag(KEY, 1, 7), "v=0\r\n")

    asyncio.run(scenario())


# -- client tokens through a real relayd ----------------------------------------------------------


def test_a_lab_with_client_tokens(tmp_path_factory):
    """relayd started with client_auth tokens: a call without the token is
    refused, with the lab's token it connects and is echoed, and the call's
    DELETE needs the same token."""
    from manager.lab.client import client_call
    from manager.lab.lifecycle import lab as lab_ctx
    from manager.lab.services import Services, lab_client_token

    with lab_ctx(prefix=f"tok{secrets.token_hex(3)}", transceivers=1) as lab:
        svc = Services(lab, tmp_path_factory.mktemp("tok"), client_auth="tokens")
        try:
            svc.start()
            token = lab_client_token(svc.workdir)
            assert token
            with NetnsExecutor(lab.client_ns) as ex:
                refused = ex.call(asyncio.run, client_call(lab.signaling_url, duration=0.5, messages=0))
                assert refused.status == 401 and "missing Authorization" in refused.error
                statuses: list[int] = []

                async def try_to_end_it(pc, rep) -> None:
                    # While the call runs: no token, another valid token, then the right one.
                    other = lab_client_token(svc.workdir)
                    async with aiohttp.ClientSession() as http:
                        for headers in ({}, {"Authorization": f"Bearer {other}"}, {"Authorization": f"Bearer {token}"}):
                            async with http.delete(rep.call_url, headers=headers) as resp:
                                statuses.append(resp.status)

                rep = ex.call(asyncio.run, client_call(lab.signaling_url, duration=1.0, messages=0, token=token,
                                                       hang_up=False, on_connected=try_to_end_it))
                assert rep.connected
                assert statuses == [401, 401, 204]
        finally:
            svc.stop()
