"""Loopback transceiver calls: an aiortc client through a userspace relay stand-in."""

from __future__ import annotations

import array
import asyncio
import math
import socket
import time
from collections import Counter
from typing import Any

import pylibsrtp
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcdtlstransport import SRTP_PROFILES
from aiortc.rtp import RtpPacket, is_rtcp

from manager.lab.client import make_tone_track, tone_power
from manager.protocol.sdp import rewrite_candidates, strip_candidates
from manager.transceiver import runtime
from manager.transceiver.transceiver import Transceiver
from tests.support.waiting import eventually_async

UFRAG_A = "AAAAbbbbCCCCddddEEEEffff"  # 24 chars, like the relay's hint-carrying ufrags


UFRAG_B = "GGGGhhhhIIIIjjjjKKKKllll"


RATE = 48000


def run(coro: Any, timeout: float = 30.0) -> Any:
    """On the loop the transceiver's process runs (uvloop, manager/transceiver/runtime.py)."""
    return runtime.run(asyncio.wait_for(coro, timeout))


def assert_dominant(samples: list[int], expected: float, others: list[float]) -> None:
    assert len(samples) >= RATE // 4, f"only {len(samples)} samples received"
    rms = math.sqrt(sum(x * x for x in samples) / len(samples))
    assert rms > 1000, f"received audio is (near) silent: rms={rms:.0f}"
    p = tone_power(samples, expected, RATE)
    for f in others:
        q = tone_power(samples, f, RATE)
        assert p > 20 * q, f"{expected} Hz not dominant over {f} Hz: {p:.3g} vs {q:.3g}"


async def hears(client: ClientCall, expected: float, others: list[float], since: float = 0.0,
                timeout: float = 5.0) -> None:
    """Until the last 0.5 s of audio the client received after `since`
    (time.monotonic()) is `expected` Hz, dominant over `others`."""
    def dominant() -> bool:
        samples = [x for t, pcm in client.frames if t >= since for x in pcm][-(RATE // 2):]
        assert len(samples) >= RATE // 2, f"only {len(samples)} samples since then"
        assert_dominant(samples, expected, others)
        return True

    await eventually_async(dominant, timeout, what=f"{expected:g} Hz dominant in the client's last 0.5 s")


class Forwarder(asyncio.DatagramProtocol):
    """Userspace relay stand-in: one public socket, one socket per client address
    towards the transceiver's owner address. Records SRTP/SRTCP both ways;
    `blackhole` drops everything (the client vanished). As the XDP program
    does, a return packet is forwarded only if it comes from the current
    `owner`; assigning `owner` is the relay's ownership flip."""

    def __init__(self, owner: tuple[str, int]) -> None:
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None
        self.legs: dict[tuple[str, int], socket.socket] = {}
        self.leg_addrs: set[tuple[str, int]] = set()
        self.to_client: list[bytes] = []
        self.to_owner: list[bytes] = []
        self.not_owner: Counter[tuple[str, int]] = Counter()  # dropped returns, by sender
        self.blackhole = False

    @classmethod
    async def start(cls, owner: tuple[str, int]) -> Forwarder:
        fwd = cls(owner)
        await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: fwd, local_addr=("127.0.0.1", 0)
        )
        return fwd

    @property
    def port(self) -> int:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[1]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.blackhole:
            return
        leg = self.legs.get(addr)
        if leg is None:
            # A plain non-blocking socket + add_reader: created synchronously,
            # so no packet of this client is reordered while it is set up.
            leg = self.legs[addr] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            leg.bind(("127.0.0.1", 0))
            leg.setblocking(False)
            self.leg_addrs.add(leg.getsockname())
            asyncio.get_running_loop().add_reader(leg.fileno(), self._from_owner, leg, addr)
        if 127 < data[0] < 192:
            self.to_owner.append(data)
        leg.sendto(data, self.owner)

    def _from_owner(self, leg: socket.socket, client: tuple[str, int]) -> None:
        try:
            data, sender = leg.recvfrom(2048)
        except OSError:
            return
        if self.blackhole or self.transport is None:
            return
        if sender[:2] != self.owner:
            self.not_owner[sender[:2]] += 1
            return
        if 127 < data[0] < 192:
            self.to_client.append(data)
        self.transport.sendto(data, client)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for leg in self.legs.values():
            loop.remove_reader(leg.fileno())
            leg.close()
        self.legs.clear()
        if self.transport is not None:
            self.transport.close()


class ClientCall:
    """An unmodified aiortc client (sine audio + data channel) placed through a Forwarder."""

    def __init__(self, freq: float, track: MediaStreamTrack | None = None) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.track = track or make_tone_track(freq)
        self.pc.addTrack(self.track)
        self.dc = self.pc.createDataChannel("chat")
        self.messages: asyncio.Queue[Any] = asyncio.Queue()
        self.dc.on("message", self.messages.put_nowait)
        self.frames: list[tuple[float, list[int]]] = []
        self.fwd: Forwarder | None = None
        self._reader: asyncio.Task[None] | None = None
        self.pc.on("track", self._on_track)

    def _on_track(self, track: MediaStreamTrack) -> None:
        async def read() -> None:
            try:
                while True:
                    frame = await track.recv()
                    raw = bytes(frame.planes[0])[: frame.samples * len(frame.layout.channels) * 2]
                    pcm = array.array("h", raw)
                    self.frames.append((time.monotonic(), list(pcm[:: len(frame.layout.channels)])))
            except MediaStreamError:
                pass

        self._reader = asyncio.ensure_future(read())

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def place(self, tx: Transceiver, conn_id: int, ufrag: str, forwarder: type[Forwarder] | None = None) -> None:
        self.offer_sdp = await self.offer()
        self.answer, self.owner = await tx.create_call(
            conn_id, ufrag, strip_candidates(self.offer_sdp)
        )
        self.fwd = await (forwarder or Forwarder).start((self.owner["addr4"], self.owner["port4"]))
        relayed = rewrite_candidates(self.answer, [("127.0.0.1", self.fwd.port)])
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=relayed, type="answer"))

    async def wait_connected(self, timeout: float = 10.0) -> None:
        await eventually_async(
            lambda: self.pc.connectionState == "connected" and self.dc.readyState == "open",
            timeout,
            "client connected",
        )

    def window(self, seconds: float) -> list[int]:
        since = time.monotonic() - seconds
        return [x for t, pcm in self.frames if t >= since for x in pcm]

    async def close(self) -> None:
        await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()
        if self.fwd is not None:
            self.fwd.close()


def srtp_session(profile_name: str, key_hex: str) -> pylibsrtp.Session:
    profile = next(p for p in SRTP_PROFILES if p.openssl_profile.decode() == profile_name)
    policy = pylibsrtp.Policy(
        key=bytes.fromhex(key_hex),
        ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
        srtp_profile=profile.libsrtp_profile,
    )
    return pylibsrtp.Session(policy)


def decrypt_rtp(profile: str, key_hex: str, packets: list[bytes]) -> list[RtpPacket]:
    session = srtp_session(profile, key_hex)
    return [RtpPacket.parse(session.unprotect(p)) for p in packets if not is_rtcp(p)]


async def _serve(app: web.Application, port: int = 0, ssl_context=None) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context)
    await site.start()
    host, bound = runner.addresses[0][:2]
    return runner, f"{'https' if ssl_context else 'http'}://{host}:{bound}"


class FakeRelay:
    """Records registration and heartbeats; can forget the transceiver (404 once)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.known: set[int] = set()
        self.app = web.Application()
        self.app.router.add_post("/v1/transceivers", self.register)
        self.app.router.add_put("/v1/transceivers/{id}/heartbeat", self.heartbeat)

    async def register(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(("register", request.path, body))
        self.known.add(body["id"])
        return web.json_response(body, status=201)

    async def heartbeat(self, request: web.Request) -> web.Response:
        body = await request.json()
        tid = int(request.match_info["id"])
        self.requests.append(("heartbeat", request.path, body))
        return web.Response(status=204 if tid in self.known else 404)

    def of(self, kind: str) -> list[Any]:
        return [body for k, _, body in self.requests if k == kind]
