"""Every private aiortc/aioice target the transceiver relies on
(manager/transceiver/aiortc_hooks/) still exists, with the kind and
signature the hook expects, on the installed versions; and no other module
of the transceiver reaches into a private attribute."""

from __future__ import annotations

import ast
import asyncio
import gc
import inspect
import os
import struct
import weakref
from pathlib import Path

import pylibsrtp
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtcdatachannel import RTCDataChannel
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcicetransport import RTCIceGatherer, RTCIceTransport
from aiortc.rtcrtpreceiver import RemoteStreamTrack, RTCRtpReceiver
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.rtcrtptransceiver import RTCRtpTransceiver
from aiortc.rtcsctptransport import RTCSctpTransport
from OpenSSL import SSL

from manager.transceiver import aiortc_hooks as hooks
from tests.support.aiortc_pair import (
    _established,
)

TRANSCEIVER_DIR = Path(hooks.__file__).parent.parent  # the package's own modules are below it


def _live_objects() -> dict[type, object]:
    """Real instances of every class a hook reaches into, as a call has them
    (a peer connection with an audio transceiver, offer set locally)."""

    async def build() -> dict[type, object]:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            t = pc.addTransceiver("audio")
            await pc.setLocalDescription(await pc.createOffer())
            dtls = t.sender.transport
            gatherer = dtls.transport.iceGatherer
            return {
                RTCRtpTransceiver: t, RTCRtpSender: t.sender, RTCDtlsTransport: dtls,
                RTCRtpReceiver: t.receiver, RemoteStreamTrack: RemoteStreamTrack("audio"),
                JitterBuffer: JitterBuffer(capacity=16, prefetch=4),
                RTCIceTransport: dtls.transport, RTCIceGatherer: gatherer,
                hooks.Connection: hooks.ice_connection(gatherer),
                hooks.CandidatePair: hooks.CandidatePair(None, _candidate("10.0.0.1", 1000)),
                pylibsrtp.Session: hooks.srtp_session(bytes(30), inbound=True, libsrtp_profile=PROFILE),
            }
        finally:
            await pc.close()

    objects = asyncio.run(build())
    objects[SSL.Connection] = SSL.Connection(SSL.Context(SSL.DTLS_METHOD))
    objects.update(asyncio.run(_established(lambda sctp, channel: {RTCSctpTransport: sctp, RTCDataChannel: channel})))
    return objects




PROFILE = pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80
SSRC = 0x11223344


def _rtp(seq: int) -> bytes:
    return struct.pack("!BBHII", 0x80, 111, seq, seq * 960, SSRC) + b"audio" * 8


def test_a_stream_continued_past_its_wrap_protects_and_unprotects_as_the_original() -> None:
    """The first owner sends across a sequence wrap (its libsrtp counts the
    rollover); a new owner's sessions, started at that rollover counter, send
    exactly what the first would have and accept what the client sends."""
    key = os.urandom(30)
    first = hooks.srtp_session(key, inbound=False, libsrtp_profile=PROFILE)
    for seq in [*range(65530, 65536), *range(0, 5)]:
        first.protect(_rtp(seq))
    assert hooks.stream_roc(first, SSRC) == 1
    fresh_tx = hooks.srtp_session(key, inbound=False, libsrtp_profile=PROFILE)
    continued_tx = hooks.srtp_session(key, inbound=False, libsrtp_profile=PROFILE, rollover={SSRC: 1})
    expected = first.protect(_rtp(5))
    assert continued_tx.protect(_rtp(5)) == expected
    assert fresh_tx.protect(_rtp(5)) != expected  # what a session at ROC 0 would get wrong
    continued_rx = hooks.srtp_session(key, inbound=True, libsrtp_profile=PROFILE, rollover={SSRC: 1})
    assert continued_rx.unprotect(first.protect(_rtp(6)))[:4] == _rtp(6)[:4]
    with pytest.raises(pylibsrtp.Error):
        hooks.srtp_session(key, inbound=True, libsrtp_profile=PROFILE).unprotect(first.protect(_rtp(7)))
    assert hooks.stream_roc(continued_rx, SSRC) == 1 and hooks.stream_roc(continued_rx, SSRC + 1) is None


def _candidate(host: str, port: int) -> hooks.Candidate:
    return hooks.Candidate(foundation="1", component=1, transport="udp", priority=1, host=host, port=port,
                           type="prflx")


def test_repoint_pair_moves_only_the_pair_at_the_old_address() -> None:
    conn = hooks.Connection(ice_controlling=False)
    assert not hooks.repoint_pair(conn, ("10.0.0.1", 1000), ("10.0.0.2", 2000))  # nothing nominated yet
    pair = hooks.CandidatePair(None, _candidate("10.0.0.1", 1000))
    conn._nominated[1] = pair
    assert not hooks.repoint_pair(conn, ("10.0.0.9", 1000), ("10.0.0.2", 2000))
    assert pair.remote_addr == ("10.0.0.1", 1000)
    assert hooks.repoint_pair(conn, ("10.0.0.1", 1000), ("10.0.0.2", 2000))
    assert hooks.nominated_pair(conn) is pair and pair.remote_addr == ("10.0.0.2", 2000)
    assert pair.remote_candidate.type == "prflx" and pair.remote_candidate.foundation == "1"


@pytest.fixture(scope="module")
def live() -> dict[type, object]:
    return _live_objects()


@pytest.mark.parametrize("hook", hooks.HOOKS, ids=lambda h: f"{h.name}:{h.owner.__name__}.{h.attribute}")
def test_hook_target_is_there(hook: hooks.Hook, live: dict[type, object]) -> None:
    where = f"aiortc_hooks.{hook.name} relies on {hook.owner.__module__}.{hook.owner.__name__}.{hook.attribute}"
    if hook.kind == "instance attribute":
        obj = live[hook.owner]
        assert hook.attribute in vars(obj), f"{where}, which a live instance no longer has"
    else:
        problem = hooks.check_method(hook)
        assert problem is None, f"{where}: {problem}"


def test_every_hook_function_has_its_targets_listed() -> None:
    functions = {name for name, f in vars(hooks).items()
                 if (inspect.isfunction(f) or inspect.isclass(f)) and f.__module__.startswith(hooks.__name__ + ".")
                 and not name.startswith("_")}
    listed = {h.name for h in hooks.HOOKS}
    helpers = {"check_method", "srtp_session", "Hook", "DtlsSecrets", "HeldAudio", "per_call_objects"}
    assert listed <= functions, f"HOOKS names functions that do not exist: {listed - functions}"
    assert functions - helpers <= listed, f"hook functions without a HOOKS entry: {functions - helpers - listed}"


def test_srtp_policy_mirrors_aiortcs() -> None:
    source = inspect.getsource(RTCDtlsTransport._setup_srtp)
    assert f"window_size = {hooks.SRTP_WINDOW_SIZE}" in source, \
        "aiortc's SRTP replay window changed: update aiortc_hooks.SRTP_WINDOW_SIZE"
    assert f"allow_repeat_tx = {hooks.SRTP_ALLOW_REPEAT_TX}" in source, \
        "aiortc's allow_repeat_tx changed: update aiortc_hooks.SRTP_ALLOW_REPEAT_TX"


def test_check_method_names_what_changed() -> None:
    class Moved:
        def _send_rtp(self, data: bytes, extra: int) -> None: ...

    gone = hooks.Hook("x", Moved, "_setup_srtp", "method")
    assert hooks.check_method(gone) == "Moved._setup_srtp is gone"
    not_async = hooks.Hook("x", Moved, "_send_rtp", "async method", ("data",))
    assert hooks.check_method(not_async) == "Moved._send_rtp is no longer a coroutine function"
    moved = hooks.Hook("x", Moved, "_send_rtp", "method", ("data",))
    assert hooks.check_method(moved) == "Moved._send_rtp now takes ('data', 'extra'), not ('data',)"


def test_no_private_access_outside_the_hooks() -> None:
    found = []
    for path in sorted(TRANSCEIVER_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "private attributes reached outside manager/transceiver/aiortc_hooks/:\n" + "\n".join(found)


def test_audio_on_arrival_hands_each_packet_on_and_drops_a_late_one() -> None:
    from aiortc.rtp import RtpPacket

    receiver = _live_objects_receiver()
    hooks.play_audio_on_arrival(receiver)
    buffer = vars(receiver)["_RTCRtpReceiver__jitter_buffer"]

    def packet(seq: int) -> RtpPacket:
        p = RtpPacket(payload_type=111, sequence_number=seq, timestamp=seq * 960)
        p._data = bytes([seq % 256])
        return p

    for seq in (65534, 65535, 0):  # across the wrap: each one out at once, none held
        pli, frame = buffer.add(packet(seq))
        assert not pli and frame.data == bytes([seq % 256]) and frame.timestamp == seq * 960
    assert buffer.add(packet(65535)) == (False, None)  # older than the last handed on: its slot was played
    assert buffer.add(packet(0)) == (False, None)  # a duplicate
    assert buffer.add(packet(1))[1].timestamp == 960


def _live_objects_receiver() -> RTCRtpReceiver:
    async def build() -> RTCRtpReceiver:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            return pc.addTransceiver("audio").receiver
        finally:
            await pc.close()

    return asyncio.run(build())


async def _connected_pair() -> tuple[RTCPeerConnection, RTCPeerConnection]:
    """Two aiortc peers with audio and an open data channel, DTLS done."""
    a, b = RTCPeerConnection(RTCConfiguration(iceServers=[])), RTCPeerConnection(RTCConfiguration(iceServers=[]))
    opened: asyncio.Queue = asyncio.Queue()
    b.on("datachannel", opened.put_nowait)
    a.addTransceiver("audio")
    a.createDataChannel("chat")
    await a.setLocalDescription(await a.createOffer())
    await b.setRemoteDescription(a.localDescription)
    await b.setLocalDescription(await b.createAnswer())
    await a.setRemoteDescription(b.localDescription)
    await asyncio.wait_for(opened.get(), 10)
    return a, b


def _parts(pc: RTCPeerConnection) -> dict[str, weakref.ref]:
    """Weak references to a connection's main parts (the ones that form cycles)."""
    dtls = pc.getTransceivers()[0].receiver.transport
    return {"pc": weakref.ref(pc), "transceiver": weakref.ref(pc.getTransceivers()[0]),
            "receiver": weakref.ref(pc.getTransceivers()[0].receiver), "dtls": weakref.ref(dtls),
            "ice": weakref.ref(dtls.transport), "connection": weakref.ref(hooks.transport_connection(dtls.transport)),
            "sctp": weakref.ref(pc.sctp), "verify_helper": weakref.ref(hooks.dtls_ssl(dtls)._verify_helper)}


@pytest.mark.parametrize("released", [True, False], ids=["released", "not-released"])
def test_release_frees_a_closed_peer_connection_by_reference_counting(released: bool) -> None:
    """With the collector off, a released connection's parts are gone as soon
    as the last reference goes; without the release they stay (the cycles
    this hook is for: if aiortc ever stops forming them, the second case
    says so and the hook can go)."""

    async def scenario() -> dict[str, bool]:
        a, b = await _connected_pair()
        parts = _parts(b)
        gc.disable()
        try:
            await a.close()
            await b.close()
            emptied = await hooks.release_peer_connection(b) if released else 0
            del a, b
            return {name: ref() is not None for name, ref in parts.items()} | {"emptied": emptied > 10}
        finally:
            gc.enable()

    alive = asyncio.run(scenario())
    emptied = alive.pop("emptied")
    if released:
        assert emptied and not any(alive.values()), f"left for the collector: {[k for k, v in alive.items() if v]}"
    else:
        assert all(alive.values()), f"freed without the release: {[k for k, v in alive.items() if not v]}"


def test_per_call_objects_belong_to_one_connection_only() -> None:
    """What the release empties is the connection's own: two connections
    share none of it (a shared object emptied would break every other call)."""

    async def scenario() -> tuple[set[int], set[int], set[type]]:
        a, b = await _connected_pair()
        try:
            mine, _ = hooks.per_call_objects(b)
            theirs, _ = hooks.per_call_objects(a)
            return {id(o) for o in mine}, {id(o) for o in theirs}, {type(o) for o in mine}
        finally:
            await a.close()
            await b.close()

    mine, theirs, kinds = asyncio.run(scenario())
    assert not mine & theirs
    assert {RTCPeerConnection, RTCDtlsTransport, RTCIceTransport, RTCRtpReceiver, RTCSctpTransport,
            hooks.Connection} <= kinds
