"""Calls on the media engine (docs/media-engine.md): a call placed with
``media_engine=True`` is handed from aiortc to the engine after its handshake,
and everything keeps working on it: the echo of the tone, the data channel,
the client's view (no renegotiation, no sequence gap), hang-up, migration out
and back. Bad input at a live engine call is dropped and counted, never a
crash or a stall (a fuzz of random and mutated packets, a flood).

Loopback, through the userspace relay stand-in (tests/support/transceiver_calls.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import re
import time
import weakref

import numpy as np
import pylibsrtp
import pytest
from aiohttp import ClientSession
from aioice import stun
from aiortc.rtcdtlstransport import SRTP_PROFILES
from aiortc.rtp import is_rtcp

from manager.protocol import rtcp, rtp_header
from manager.protocol.sdp import strip_candidates
from manager.transceiver.agent import Agent, AgentSession, CallEnded
from manager.transceiver.imported_call import ImportedCall
from manager.transceiver.transceiver import Transceiver
from manager.transceiver.webrtc_call import WebRtcCall
from tests.support.speech import FRAME, RATE, SpeechTrack
from tests.support.transceiver_calls import (
    UFRAG_A,
    UFRAG_B,
    ClientCall,
    assert_dominant,
    decrypt_rtp,
    run,
    srtp_session,
)
from tests.support.transceiver_migration import StateLog, inbound_lost, migrate, owner_addr, serve
from tests.support.waiting import eventually_async

# realtime: the checks count media against the wall clock.
pytestmark = pytest.mark.realtime


async def engine_call(tx: Transceiver, conn_id: int, ufrag: str, freq: float = 440) -> tuple[ClientCall, ImportedCall]:
    client = ClientCall(freq)
    await client.place(tx, conn_id, ufrag)
    await client.wait_connected()
    await eventually_async(lambda: isinstance(tx._calls.get(conn_id), ImportedCall), 10,
                           what="the hand-over to the engine")
    call = tx._calls[conn_id]
    assert isinstance(call, ImportedCall) and call.handed_over
    return client, call


def test_placed_call_runs_on_the_engine_and_keeps_everything() -> None:
    async def scenario() -> None:
        ended: list[tuple[int, str]] = []
        async with Transceiver(1, capacity=4, media_engine=True) as tx:
            tx.on_call_ended.append(lambda c, r: ended.append((c, r)))
            client, call = await engine_call(tx, 42, UFRAG_A)
            log = StateLog(client)
            info = tx.call_info(42)
            assert info["media_engine"] == {"carried": True, "handed_over": True}
            assert tx.calls() == [42] and tx.health()["media_engine"]["calls"] == 1
            # The data channel moved with the call: the agent echoes on it, both ways.
            client.dc.send("on the engine")
            assert await asyncio.wait_for(client.messages.get(), 3) == "on the engine"
            # The echo of the tone, following a change (live input, not a replay).
            await asyncio.sleep(1.2)  # pacing: a window of echoed tone to judge
            assert_dominant(client.window(0.5), 440, [660, 880])
            client.track.freq = 660
            await asyncio.sleep(1.0)  # pacing: the new tone's echo fills the window
            assert_dominant(client.window(0.5), 660, [440, 880])
            # aiortc's packets and then the engine's: one SSRC, no sequence gap.
            fwd = client.fwd
            assert fwd is not None
            state = tx.export_call_state(42)
            srtp, audio = state["srtp"], next(m for m in state["media"] if m["kind"] == "audio")
            sent = decrypt_rtp(srtp["profile"], srtp["tx_key"], [p for p in fwd.to_client if not is_rtcp(p)])
            assert {p.ssrc for p in sent} == {audio["local_ssrc"]}
            seqs = [p.sequence_number for p in sent]
            assert seqs == [(seqs[0] + i) & 0xFFFF for i in range(len(seqs))]
            assert await inbound_lost(client) <= 1
            m = tx.call_info(42)["migration"]
            assert m["rx_undecryptable"] == 0 and m["frames_to_agent"] > 80 and m["tx_packets"] > 80
            assert tx.engine.tick_errors == 0
            log.assert_untouched(client)
            # The client hangs up: its DTLS close_notify reaches the engine's call.
            await client.close()
            await eventually_async(lambda: ended, 5, what="the call to end")
            assert ended == [(42, "client hung up")] and tx.calls() == []

    run(scenario(), timeout=40)


def test_a_handed_over_call_leaves_nothing_for_the_cyclic_collector() -> None:
    """aiortc's objects of a handed-over call (its peer connection, transports,
    ICE connection, association) and the WebRtcCall itself go by reference
    counting, with the collector off: none waits for a collection, whose
    pause every call's next packet would wait through (docs/media-engine.md)."""

    async def scenario() -> None:
        async with Transceiver(1, capacity=4, media_engine=True) as tx:
            client = ClientCall(440)
            await client.place(tx, 42, UFRAG_A)
            placed = tx._calls[42]
            assert isinstance(placed, WebRtcCall)
            dtls = placed.dtls
            parts = {"call": weakref.ref(placed), "pc": weakref.ref(placed.pc), "dtls": weakref.ref(dtls),
                     "ice": weakref.ref(dtls.transport), "connection": weakref.ref(placed.connection),
                     "sctp": weakref.ref(placed.pc.sctp), "port": weakref.ref(placed.ports[0])}
            del placed, dtls
            gc.collect()
            gc.disable()
            try:
                await client.wait_connected()
                await eventually_async(lambda: isinstance(tx._calls.get(42), ImportedCall), 10,
                                       what="the hand-over to the engine")
                await eventually_async(lambda: all(ref() is None for ref in parts.values()), 10,
                                       what="aiortc's objects of the call freed without the collector")
            finally:
                gc.enable()
            # And the engine call carries on: the data channel still echoes.
            client.dc.send("after the release")
            assert await asyncio.wait_for(client.messages.get(), 3) == "after the release"
            await client.close()

    run(scenario(), timeout=40)


class Listener(Agent):
    """Records the RMS and the concealment mark of every frame it hears."""

    def __init__(self) -> None:
        self.heard: list[tuple[float, str | None]] = []

    async def run(self, session: AgentSession) -> None:
        try:
            while True:
                frame = await session.recv_audio()
                mono = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0].astype(np.float64)
                self.heard.append((float(np.sqrt((mono**2).mean())), frame.opaque))
        except CallEnded:
            pass


@pytest.mark.parametrize("aiortc_audio_buffer", [True, False], ids=["aiortc-buffer", "on-arrival"])
def test_the_hand_over_loses_none_of_the_clients_first_frames(aiortc_audio_buffer: bool) -> None:
    """The client speaks from its first frame: with aiortc's audio buffer,
    aiortc holds its last 80 ms undecoded at the hand-over (its prefetch);
    the engine plays them first. Without it (the default) frames reach the
    agent as they arrive. Either way the agent hears every frame of the
    tone, once."""
    tone_frames = 100
    t = np.arange(tone_frames * FRAME) / RATE
    tone = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)

    async def scenario() -> tuple[list[tuple[float, str | None]], dict]:
        listener = Listener()
        async with Transceiver(1, capacity=2, media_engine=True, agent_factory=lambda: listener,
                               aiortc_audio_buffer=aiortc_audio_buffer) as tx:
            track = SpeechTrack()
            track.say(tone)  # queued before the call exists: the first frame sent is the tone's first
            client = ClientCall(0, track=track)
            try:
                await client.place(tx, 42, UFRAG_A)
                await client.wait_connected()
                await eventually_async(lambda: isinstance(tx._calls.get(42), ImportedCall), 10,
                                       what="the hand-over to the engine")
                await eventually_async(lambda: not track.speaking, 10, what="the tone sent")
                # The tone's tail reaches the agent, then silence.
                await eventually_async(lambda: len(listener.heard) > 10 and listener.heard[-1][0] < 100, 5,
                                       what="silence after the tone")
                return listener.heard, tx.call_info(42)["migration"]
            finally:
                await client.close()

    heard, media = run(scenario(), timeout=40)
    loud = [mark for rms, mark in heard if rms > 2000]
    jitter = media["jitter"]  # the engine's buffer, after the hand-over
    # No loss on loopback: no frame rebuilt from FEC, none given up that did not come after all.
    assert "fec" not in loud and jitter["lost"] == jitter["late"], jitter
    # A packet that comes after its tick (the client, aiortc and the engine share one event
    # loop: a busy machine delays it) is waited for with a concealed frame, an expansion,
    # and then played: the concealment is the machine's scheduling, no frame of the tone is missing.
    assert loud.count("plc") <= jitter["expanded"] + jitter["lost"], jitter
    # Every frame of the tone reached the agent decoded from its packet, once (or came too
    # late to play). Opus's onset and release can each smear one frame over the threshold or under it.
    decoded = loud.count(None) + jitter["late"]
    assert tone_frames - 1 <= decoded <= tone_frames + 1, f"{loud.count(None)} loud frames decoded, {jitter}"
    if aiortc_audio_buffer:
        assert media["frames_held"] > 0  # aiortc held some: the hand-over came while the tone played


def test_engine_call_migrates_out_and_back(fast_consent: None) -> None:
    async def scenario() -> None:
        async with (
            Transceiver(1, capacity=2, media_engine=True) as tx_a,
            Transceiver(2, capacity=2, media_engine=True) as tx_b,
            ClientSession() as http,
        ):
            run_a, api_a = await serve(tx_a, http)
            run_b, api_b = await serve(tx_b, http)
            client, first = await engine_call(tx_a, 42, UFRAG_A)
            srtcp = ClientSrtcp.install(client)
            try:
                log = StateLog(client)
                # Some media, and a sender report: the client's SRTCP replay window has seen our index.
                await eventually_async(lambda: first.media.stats.tx_rtcp >= 1, 10, what="the first owner's SR")
                for src, dst, src_tx, dst_tx in ((api_a, api_b, tx_a, tx_b), (api_b, api_a, tx_b, tx_a)):
                    await eventually_async(lambda: sender_report_seen(client), 10, what="an SR at the client")
                    took = await sender_report_seen(client)  # the old owner's last, as the client saw it

                    def carried_sr(state: dict, dst_tx: Transceiver = dst_tx) -> None:
                        # The client's last SR reached the old owner: the new one cites it in
                        # its first report (LSR, DLSR counting from its arrival there).
                        ((ssrc, last),) = state["rtcp"]["rx_last_sr"].items()
                        lsr, at = dst_tx._calls[42].quality.remote_sr[int(ssrc)]
                        assert lsr == last["ntp_middle32"] != 0 and 0 <= last["age"] < 5
                        assert time.time() - at >= last["age"]

                    m = await migrate(client, 42, src, dst, owner_addr(src_tx.owner), before_flip=carried_sr)
                    assert src_tx.calls() == [] and dst_tx.calls() == [42]
                    # The new owner's SRTCP index goes on past the old one's: the client takes
                    # its SRs (same SSRC, packet and octet counts going on: RFC 3550 6.4.1), and
                    # cites them (an RTT here).
                    moved = dst_tx._calls[42]
                    assert isinstance(moved, ImportedCall)
                    await eventually_async(lambda moved=moved: moved.quality.rtt_ms is not None, 15,
                                           what="an RTT on the new owner")

                    async def newer_sr(took: dict = took) -> bool:
                        seen = await sender_report_seen(client)
                        return seen is not None and seen["at"] > took["at"]

                    await eventually_async(newer_sr, 15, what="the client took the new owner's SR")
                    seen = await sender_report_seen(client)
                    assert seen["ssrc"] == moved.media.plan.local_ssrc and seen["packets"] <= moved.media.tx_stream.packets
                    assert seen["packets"] > took["packets"] and seen["bytes"] > took["bytes"]
                    # The first report block after the move cites the client's SR (LSR, not 0).
                    (first, *_) = engine_compounds(client, m["state"], m["switch_index"])
                    assert first.reports[0].blocks[0].lsr != 0 and first.byes == []
                    await asyncio.sleep(1.2)  # pacing: a window of echoed tone to judge
                    assert_dominant(client.window(0.5), 440, [660])
                    assert await inbound_lost(client) - m["lost_before"] <= 1
                    while not client.messages.empty():
                        client.messages.get_nowait()
                    client.dc.send("moved")
                    assert await asyncio.wait_for(client.messages.get(), 3) == "moved"
                assert srtcp.refused == 0 and srtcp.taken >= 3  # not one SR of the three owners refused
                # No owner said BYE: the call went on (aiortc's receiver stops its decoder on one).
                assert all(c.byes == [] for c in engine_compounds(client, m["state"], 0))
                log.assert_untouched(client)
            finally:
                await client.close()
                await run_a.cleanup()
                await run_b.cleanup()

    run(scenario(), timeout=75)


class ClientSrtcp:
    """Counts the SRTCP packets the client's libsrtp takes and refuses (aiortc only logs a refusal)."""

    def __init__(self, session: pylibsrtp.Session) -> None:
        self.session = session
        self.taken = self.refused = 0

    @classmethod
    def install(cls, client: ClientCall) -> ClientSrtcp:
        dtls = client.pc.getTransceivers()[0].receiver.transport
        counter = dtls._rx_srtp = cls(dtls._rx_srtp)
        return counter

    def unprotect(self, data: bytes) -> bytes:
        return self.session.unprotect(data)

    def unprotect_rtcp(self, data: bytes) -> bytes:
        try:
            plain = self.session.unprotect_rtcp(data)
        except pylibsrtp.Error:
            self.refused += 1
            raise
        self.taken += 1
        return plain


async def sender_report_seen(client: ClientCall) -> dict | None:
    """The client's view of our last sender report (aiortc's receiver records each one it takes)."""
    report = await client.pc.getStats()
    return next(({"packets": s.packetsSent, "bytes": s.bytesSent, "ssrc": s.ssrc, "at": s.remoteTimestamp}
                 for s in report.values() if s.type == "remote-outbound-rtp"), None)


def engine_compounds(client: ClientCall, state: dict, since: int) -> list[rtcp.Compound]:
    """Our SRTCP the relay stand-in forwarded to the client from index `since` on, decrypted."""
    assert client.fwd is not None
    session = srtp_session(state["srtp"]["profile"], state["srtp"]["tx_key"])
    out = []
    for p in client.fwd.to_client[since:]:
        if is_rtcp(p):
            with contextlib.suppress(pylibsrtp.Error):  # aiortc's, before the hand-over
                out.append(rtcp.parse(session.unprotect_rtcp(p)))
    return out


def test_the_answer_negotiates_no_feedback_for_audio() -> None:
    """The engine neither asks for nor answers NACKs (docs/media-engine.md, "No
    NACK"): an offer asking for them for Opus (and transport-cc, as
    Chromium's and Firefox's do) is answered without any feedback for audio,
    so no client sends one for our stream or expects one answered."""

    async def scenario() -> None:
        async with Transceiver(1, capacity=2, media_engine=True) as tx:
            client = ClientCall(440)
            offer = await client.offer()
            match = re.search(r"a=rtpmap:(\d+) opus/48000/2\r\n", offer)
            assert match is not None
            pt = match.group(1)
            asked = offer.replace(match.group(0), f"{match.group(0)}a=rtcp-fb:{pt} nack\r\n"
                                                  f"a=rtcp-fb:{pt} transport-cc\r\n")
            answer, _ = await tx.create_call(42, UFRAG_A, strip_candidates(asked))
            audio = answer.split("m=audio", 1)[1].split("\r\nm=", 1)[0]
            assert f"a=rtpmap:{pt} opus/48000/2" in audio and "a=rtcp-fb" not in audio
            await tx.close_call(42)
            await client.pc.close()

    run(scenario(), timeout=20)


def test_switch_off_keeps_placed_calls_on_aiortc() -> None:
    async def scenario() -> None:
        async with Transceiver(1, capacity=2, media_engine=False) as tx:
            client = ClientCall(440)
            await client.place(tx, 42, UFRAG_A)
            await client.wait_connected()
            await asyncio.sleep(0.5)  # pacing: the call would have been handed over by now
            assert isinstance(tx._calls[42], WebRtcCall)
            assert tx.call_info(42)["media_engine"] == {"carried": False, "why": None}
            await client.close()

    run(scenario(), timeout=20)


def _client_srtp(state: dict) -> pylibsrtp.Session:
    """An SRTP session with the client's key: authentic packets of a stream of our own."""
    profile = next(p for p in SRTP_PROFILES if p.openssl_profile.decode() == state["srtp"]["profile"])
    policy = pylibsrtp.Policy(key=bytes.fromhex(state["srtp"]["rx_key"]),
                              ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND, srtp_profile=profile.libsrtp_profile)
    return pylibsrtp.Session(policy)


def test_bad_input_is_dropped_and_counted_never_a_crash_or_stall() -> None:
    """Random and mutated packets from the client's own (claimed) address at a
    live engine call, beside a second call that must not notice: undecryptable,
    replayed, malformed after authentication (an RTP header lying about its
    length), DTLS records failing their tag, then a flood far beyond the rate."""

    async def scenario() -> None:
        async with Transceiver(1, capacity=4, media_engine=True) as tx:
            client, call = await engine_call(tx, 42, UFRAG_A)
            other, other_call = await engine_call(tx, 43, UFRAG_B, freq=660)
            await asyncio.sleep(1.0)  # pacing: both calls echo before the bad input
            fwd = client.fwd
            assert fwd is not None and fwd.legs
            leg = next(iter(fwd.legs.values()))  # the relay flow socket the call claimed
            owner = owner_addr(tx.owner)
            state = tx.export_call_state(42)
            rng = random.Random(25)
            captured = [p for p in fwd.to_owner[-50:]]
            dtls = [p for p in fwd.to_owner if 19 < p[0] < 64][-5:] or [bytes([23, 254, 253]) + bytes(40)]
            fake = _client_srtp(state)
            before = dict(call.media.stats.__dict__)

            def send(data: bytes) -> None:
                try:
                    leg.sendto(data, owner)
                except BlockingIOError:
                    pass  # the leg's buffer is full: that packet is not sent

            for i in range(1200):
                choice = i % 6
                if choice == 0:  # random bytes of any class
                    data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))
                elif choice == 1:  # a captured SRTP packet with bits flipped: fails its tag
                    data = bytearray(rng.choice(captured))
                    data[rng.randrange(12, len(data))] ^= 1 << rng.randrange(8)
                    data = bytes(data)
                elif choice == 2:  # a replay of a captured packet
                    data = rng.choice(captured)
                elif choice == 3:  # authentic, but its padding count (encrypted) lies about the length
                    plain = rtp_header.build(111, False, 1000 + i, i * 960, 0x5EED, b"\x00" * 8)
                    data = fake.protect(bytes([plain[0] | 0x20]) + plain[1:] + bytes([200 if i % 2 else 0]))
                elif choice == 4:  # a DTLS record failing its tag
                    data = bytearray(rng.choice(dtls))
                    data[-1] ^= 0xFF
                    data = bytes(data)
                else:  # a consent check to the call's ufrag that fails MESSAGE-INTEGRITY
                    check = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
                    check.attributes["USERNAME"] = f"{UFRAG_A}:{state['ice']['remote_ufrag']}"
                    check.add_message_integrity(rng.randbytes(16))
                    data = bytes(check)
                send(data)
                if i % 6 == 0:
                    await asyncio.sleep(0.02)  # pacing: 300/s, under the call's rate limit (no flood yet)
            await asyncio.sleep(1.5)  # pacing: a window of echo after the bad input
            stats = call.media.stats
            assert stats.rx_undecryptable > before["rx_undecryptable"] + 300
            assert stats.rx_malformed > before["rx_malformed"]
            assert call.stats.rx_dtls_dropped > 0 and call.stats.stun_rejected > 0
            # Both calls still echo: nothing stalled.
            assert_dominant(client.window(0.5), 440, [660])
            assert_dominant(other.window(0.5), 660, [440])
            # A flood far beyond a call's rate: dropped before any work.
            for _ in range(100):
                for _ in range(100):
                    send(rng.choice(captured))
                await asyncio.sleep(0.002)  # pacing: let the transceiver (same process) read them
            await asyncio.sleep(1.5)  # pacing: a window of echo after the bad input
            assert call.media.stats.rx_over_rate > 1000
            assert_dominant(client.window(0.5), 440, [660])
            assert_dominant(other.window(0.5), 660, [440])
            assert other_call.media.stats.rx_over_rate == 0
            assert tx.engine.tick_errors == 0 and tx.calls() == [42, 43]
            info = tx.call_info(42)["migration"]
            for key in ("rx_undecryptable", "rx_malformed", "rx_over_rate", "rx_dtls_dropped", "stun_rejected"):
                assert info[key] > 0, key
            await client.close()
            await other.close()

    run(scenario(), timeout=60)
