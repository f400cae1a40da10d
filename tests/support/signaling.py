"""A relay signaling app on an in-process server, with a sample offer."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack

from manager import pki
from manager.relay.registration import make_internal_app
from manager.relay.registry import Registry
from manager.relay.signaling import make_app
from manager.relay.transceiver_client import TransceiverClient

KEY = b"k" * 32


PUBLIC = [("203.0.113.7", 3478), ("2001:db8::7", 3478)]


SDP = {"Content-Type": "application/sdp"}
TRICKLE = {"Content-Type": "application/trickle-ice-sdpfrag"}
RESTART = {**TRICKLE, "If-Match": "*"}  # RFC 9725: a PATCH that restarts ICE
RESTART_PWD = "newpasswordnewpassword24"


def sdpfrag(ufrag: str | None, pwd: str | None = None, *, media: bool = True, candidates: str = "") -> str:
    """A trickle-ice-sdpfrag body (RFC 8840) as clients PATCH it: their ICE
    credentials (each left out when None), the media section, candidates."""
    head = (f"a=ice-ufrag:{ufrag}\r\n" if ufrag is not None else "") + (f"a=ice-pwd:{pwd}\r\n" if pwd is not None else "")
    return head + ("m=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n" if media else "") + candidates


def run(factory: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(factory())


class FakeTransceiver:
    """A real control API (`POST/DELETE /calls`) answering with real aiortc answers.

    `mode` makes it misbehave in one specific way per failure test.
    """

    def __init__(self, tid: int) -> None:
        self.tid = tid
        self.mode = "ok"
        self.created: list[dict] = []
        self.deleted: list[int] = []
        self.restarts: list[tuple[int, dict]] = []
        self.pcs: dict[int, RTCPeerConnection] = {}
        self.release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/calls", self._create)
        app.router.add_delete("/calls/{conn_id}", self._delete)
        app.router.add_post("/calls/{conn_id}/ice-restart", self._restart_ice)
        self.server = TestServer(app, host="127.0.0.1")

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def start(self) -> None:
        await self.server.start_server()

    async def close(self) -> None:
        self.release.set()
        for pc in self.pcs.values():
            await pc.close()
        await self.server.close()

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.created.append(body)
        if self.mode == "error":
            return web.Response(status=500, text="agent\ncrashed")
        if self.mode == "slow":
            await self.release.wait()  # set by the test, or by close()
        if self.mode == "garbage":
            return web.Response(status=201, text="<html>not json</html>")
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pcs[body["conn_id"]] = pc
        pc.addTrack(AudioStreamTrack())
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["offer"], type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        answer = pc.localDescription.sdp
        if self.mode != "wrong-ufrag":
            # A real transceiver sets the ufrag in its ICE agent; for the
            # signaling API the text is what matters.
            answer = re.sub(r"a=ice-ufrag:\S+", f"a=ice-ufrag:{body['ufrag']}", answer)
        if self.mode == "bad-answer":
            answer = answer.replace("a=setup:active", "a=setup:actpass")
        owner = {"addr4": "127.0.0.1", "port4": 40000 + self.tid, "addr6": None, "port6": 0}
        if self.mode == "bad-owner":
            owner = {"addr4": "not-an-ip", "port4": 1}
        if self.mode == "outside-owner":  # a public host: the relay would send media anywhere
            owner = {"addr4": "8.8.8.8", "port4": 3478, "addr6": None, "port6": 0}
        return web.json_response({"answer": answer, "owner": owner}, status=201)

    async def _restart_ice(self, request: web.Request) -> web.Response:
        """The engine call's answer to an ICE restart (a new password for the
        relay's ufrag); mode "aiortc": the refusal of a call kept on aiortc."""
        conn_id = int(request.match_info["conn_id"])
        body = await request.json()
        self.restarts.append((conn_id, body))
        if self.mode == "aiortc":
            return web.json_response({"error": f"call {conn_id} runs on aiortc, whose ICE agent (aioice) cannot "
                                      "restart ICE; only calls on the media engine can"}, status=422)
        if self.mode == "error":
            return web.Response(status=500, text="agent\ncrashed")
        return web.json_response({"ufrag": body["ufrag"], "pwd": f"pwd{len(self.restarts):021d}"})

    async def _delete(self, request: web.Request) -> web.Response:
        conn_id = int(request.match_info["conn_id"])
        self.deleted.append(conn_id)
        pc = self.pcs.pop(conn_id, None)
        if pc is None:
            return web.Response(status=404)
        await pc.close()
        return web.Response(status=204)


def _claimed(request) -> pki.Identity:
    return pki.Identity("transceiver", int(request.match_info.get("id") or request.headers.get("X-Test-Transceiver", 1)))


@dataclass
class Env:
    registry: Registry
    http: TestClient
    internal: TestClient
    fakes: list[FakeTransceiver]
    ended: list[tuple[int, str]] = field(default_factory=list)
    pcs: list[RTCPeerConnection] = field(default_factory=list)

    async def offer(self) -> tuple[RTCPeerConnection, str]:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pcs.append(pc)
        pc.addTrack(AudioStreamTrack())
        pc.createDataChannel("chat")
        await pc.setLocalDescription(await pc.createOffer())
        return pc, pc.localDescription.sdp

    async def place(self) -> tuple[RTCPeerConnection, object]:
        pc, offer = await self.offer()
        resp = await self.http.post("/v1/calls", data=offer, headers=SDP)
        return pc, resp


@asynccontextmanager
async def relay(
    transceivers: int = 2,
    *,
    capacity: int = 10,
    clock: Callable[[], float] | None = None,
    timeout: float = 5.0,
    **app_options,
) -> AsyncIterator[Env]:
    # The stand-ins register once and never heartbeat: on the real clock,
    # expiry must not depend on how long a loaded machine takes (tests of
    # expiry pass a fake clock and keep the 3 s default).
    registry = Registry(report_grace=0.0, **({"clock": clock} if clock else {"heartbeat_timeout": 3600.0}))
    client = TransceiverClient(timeout=timeout)
    app = make_app(registry, hint_key=KEY, public_addrs=PUBLIC, transceiver_client=client, **app_options)
    http = TestClient(TestServer(app))
    await http.start_server()
    # The internal listener's identity comes from TLS client certificates
    # (tests/netns/test_security.py); here the caller is whoever it says it is.
    internal = TestClient(TestServer(make_internal_app(registry, allows=lambda addr: True, identify=_claimed)))
    await internal.start_server()
    env = Env(registry, http, internal, [FakeTransceiver(i + 1) for i in range(transceivers)])
    registry.on_call_ended(lambda call, reason: env.ended.append((call.conn_id, reason)))
    try:
        for fake in env.fakes:
            await fake.start()
            resp = await internal.post(
                "/v1/transceivers",
                json={"id": fake.tid, "control_url": fake.url, "capacity": capacity},
                headers={"X-Test-Transceiver": str(fake.tid)},
            )
            assert resp.status == 201, await resp.text()
        yield env
    finally:
        for pc in env.pcs:
            await pc.close()
        for fake in env.fakes:
            await fake.close()
        await http.close()
        await internal.close()
        await client.close()


async def _error(resp, status: int) -> str:
    """The one-line reason of a refusal: a problem's detail on the public
    listener (RFC 9457), the text/plain line on the internal one."""
    if resp.content_type == "application/problem+json":
        return (await problem(resp, status))["detail"]
    text = await resp.text()
    assert resp.status == status, text
    assert resp.content_type == "text/plain"
    assert text.endswith("\n") and text.count("\n") == 1, repr(text)
    return text.strip()


async def problem(resp, status: int) -> dict:
    """An RFC 9457 problem: its members checked, returned whole."""
    body = await resp.json(content_type=None)
    assert resp.status == status, body
    assert resp.content_type == "application/problem+json", resp.content_type
    assert body["status"] == status and body["type"] == "about:blank" and body["title"], body
    assert "\n" not in body["detail"] and body["detail"], body
    return body
