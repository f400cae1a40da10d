"""One engine call's media (manager/transceiver/call_media.py) without a
network: the client's SRTP in, frames to the agent per tick (marked when
concealed) or on arrival, the agent's audio out as SRTP that continues the
old owner's numbering, answered at once on the engine; bad packets counted."""

from __future__ import annotations

import array
import asyncio
import itertools
import math
import os
import time

import pylibsrtp
from aiortc.rtp import is_rtcp

from manager.lab.client import tone_power
from manager.protocol import rtcp, rtp_header
from manager.transceiver.agent import AgentSession, EchoAgent
from manager.transceiver.call_media import AUDIO_LEVEL_URI, MID_URI, CallMedia, MediaPlan, RateLimit, audio_level
from manager.transceiver.media_engine import MediaEngine
from manager.transceiver.opus import Encoder
from manager.transceiver.rtp_streams import RtpStreamState
from tests.support.waiting import eventually_async

PROFILE = pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80
CLIENT_KEY = os.urandom(30)  # what the client protects with: our rx key
OUR_KEY = os.urandom(30)
CLIENT_SSRC = 4444


def session(key: bytes, inbound: bool) -> pylibsrtp.Session:
    kind = pylibsrtp.Policy.SSRC_ANY_INBOUND if inbound else pylibsrtp.Policy.SSRC_ANY_OUTBOUND
    return pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=kind, srtp_profile=PROFILE))


def tone(frames: int, freq: float = 440.0) -> list[bytes]:
    pcm = array.array("h", (int(8000 * math.sin(2 * math.pi * freq * i / 48000)) for i in range(960 * frames)))
    return [pcm[i * 960:(i + 1) * 960].tobytes() for i in range(frames)]


def media(sent: list[bytes], tx: RtpStreamState | None = None) -> tuple[CallMedia, AgentSession]:
    plan = MediaPlan(conn_id=1, libsrtp_profile=PROFILE, tx_key=OUR_KEY, rx_key=CLIENT_KEY, local_ssrc=777,
                     payload_type=111, mid="0",
                     header_extensions=[{"id": 1, "uri": MID_URI}, {"id": 10, "uri": AUDIO_LEVEL_URI}],
                     tx=tx, rx={}, frozen_at=time.time(), rtcp_rx={})
    s = AgentSession(1)
    return CallMedia(plan, s, sent.append), s


def client_packets(frames: int, first_seq: int = 100) -> list[bytes]:
    enc, srtp = Encoder(), session(CLIENT_KEY, inbound=False)
    return [srtp.protect(rtp_header.build(111, True, first_seq + i, i * 960, CLIENT_SSRC, enc.encode(f)))
            for i, f in enumerate(tone(frames))]


def drain(s: AgentSession) -> list:
    frames = []
    while not s._audio.empty():
        frames.append(s._audio.get_nowait())
    return frames


def test_client_audio_reaches_the_agent_one_frame_per_tick_with_losses_marked() -> None:
    async def scenario() -> None:
        sent: list[bytes] = []
        m, s = media(sent)
        packets = client_packets(60)
        lost = {20, 40, 41}
        for i, p in enumerate(packets):
            if i not in lost:
                assert m.receive(p, i * 0.02)
            m.tick()
        frames = drain(s)
        marks = [f.opaque for f in frames]
        assert len(frames) >= 58 and {f.format.name for f in frames} == {"s16"}
        assert {f.layout.name for f in frames} == {"mono"} and {f.samples for f in frames} == {960}
        assert marks.count("plc") >= 1 and marks.count("fec") >= 1  # 20 concealed first, 41 from 42's FEC
        assert m.stats.frames_to_agent == len(frames)
        pcm = array.array("h", b"".join(bytes(f.planes[0])[:1920] for f in frames[5:]))
        assert tone_power(pcm, 440) > 20 * tone_power(pcm, 1000)
        assert m.stats.rx_decrypted == 57 and m.stats.rx_undecryptable == 0

    asyncio.run(scenario())


def test_agent_audio_goes_out_continuing_the_old_owners_numbering() -> None:
    async def scenario() -> None:
        sent: list[bytes] = []
        old = RtpStreamState(ssrc=777, payload_type=111, seq=65534, timestamp=1000, roc=0, packets=500)
        m, s = media(sent, tx=old)
        for f in tone(5):
            s.out_track.push(_frame(f))
        m.start_sending()
        for _ in range(5):
            m.tick()
        rx = pylibsrtp.Session(pylibsrtp.Policy(key=OUR_KEY, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
                                                srtp_profile=PROFILE))
        rx.add_stream(pylibsrtp.Policy(key=OUR_KEY, ssrc_type=pylibsrtp.Policy.SSRC_SPECIFIC, ssrc_value=777,
                                       srtp_profile=PROFILE))
        headers = [rtp_header.parse(rx.unprotect(p)) for p in sent]
        assert [h.sequence for h in headers] == [65535, 0, 1, 2, 3]
        ts = [h.timestamp for h in headers]
        assert [b - a for a, b in itertools.pairwise(ts)] == [960] * 4 and ts[0] >= 1000 + 960
        assert {h.ssrc for h in headers} == {777} and {h.payload_type for h in headers} == {111}
        assert m.tx_stream.roc == 1 and m.stats.tx_packets == 5
        # Frozen: the clock runs on, nothing goes out.
        m.frozen = True
        m.tick()
        assert len(sent) == 5

    asyncio.run(scenario())


def _frame(pcm: bytes):
    import av

    f = av.AudioFrame(format="s16", layout="mono", samples=960)
    f.planes[0].update(pcm)
    f.sample_rate = 48000
    return f


def test_bad_packets_are_counted_not_raised() -> None:
    async def scenario() -> None:
        m, s = media([])
        good = client_packets(3)
        assert not m.receive(os.urandom(100), 0.0)
        tampered = bytearray(good[0])
        tampered[20] ^= 1
        assert not m.receive(bytes(tampered), 0.0)
        assert m.receive(good[0], 0.0)
        assert not m.receive(good[0], 0.0)  # a replay
        liar = session(CLIENT_KEY, inbound=False)
        plain = rtp_header.build(111, False, 5000, 0, 9999, b"\x00" * 8)
        assert m.receive(liar.protect(bytes([plain[0] | 0x20]) + plain[1:] + b"\xff"), 0.0)  # padding 255
        assert m.stats.rx_undecryptable == 3 and m.stats.rx_malformed == 1
        other = liar.protect(rtp_header.build(0, False, 6000, 0, 9999, b"\x00" * 8))
        assert m.receive(other, 0.0) and m.stats.rx_other_payload == 1
        garbage = liar.protect(rtp_header.build(111, False, 6001, 960, 9999, os.urandom(40)))
        assert m.receive(garbage, 0.0)
        for _ in range(4):
            m.tick()  # an undecodable payload is concealed, never raised
        assert m.stats.frames_to_agent >= 1

    asyncio.run(scenario())


def test_rate_limit_and_audio_level() -> None:
    bucket = RateLimit(rate=100, burst=10)
    now = time.monotonic()
    allowed = sum(bucket.allow(now) for _ in range(50))
    assert allowed == 10
    assert bucket.allow(now + 0.1)  # refilled
    assert audio_level(bytes(1920)) == 127
    assert audio_level(array.array("h", [32767, -32767] * 480).tobytes()) == 0
    assert 14 <= audio_level(tone(1)[0]) <= 16  # peak 8000: -12.2 dBFS, rms -15.2 dBov


def test_a_frame_in_order_reaches_the_agent_on_arrival_and_the_answer_goes_out_at_once() -> None:
    async def scenario() -> None:
        sent: list[bytes] = []
        m, s = media(sent)
        asked: list[CallMedia] = []
        m.answer_soon = asked.append  # what the engine sets
        m.start_sending()
        packets = client_packets(3)
        assert m.receive(packets[0], 0.0)
        (frame,) = drain(s)  # before any tick
        assert frame.opaque is None and m.stats.frames_early == 1 and asked == [m]
        m.answer()  # the agent has nothing yet: nothing goes out early
        assert sent == []
        s.out_track.push(frame)  # an echo
        m.answer()
        assert len(sent) == 1 and m.stats.tx_early == 1
        m.tick()  # the tick this frame stood for: nothing played, nothing sent
        assert len(sent) == 1 and drain(s) == []
        m.tick()
        assert len(sent) == 2 and m.stats.tx_packets == 2  # the next tick sends (silence)
        assert drain(s)[0].opaque == "plc"  # and conceals the frame that did not come
        for _ in range(3):  # an agent ahead of the clock: at most two frames go out early
            s.out_track.push(frame)
        m.answer()
        assert len(sent) == 4 and m.stats.tx_early == 3
        m.tick()
        m.tick()
        assert len(sent) == 4
        m.tick()
        assert len(sent) == 5

    asyncio.run(scenario())


def test_the_engine_echoes_a_frame_between_its_ticks() -> None:
    """A real MediaEngine and the echo agent: each client frame is heard and
    answered by the engine's answer pass (two loop callbacks), not by a tick.
    The engine's own clock is held still, and its tick is played by the test
    between frames, so no timing decides the outcome."""

    async def scenario() -> None:
        sent: list[bytes] = []
        engine = MediaEngine()
        engine._run = lambda: asyncio.sleep(3600)  # the clock held still: the test ticks
        m, s = media(sent)
        agent_task = asyncio.ensure_future(EchoAgent().run(s))
        engine.add(1, m)
        m.start_sending()
        try:
            for i, p in enumerate(client_packets(20)):
                before = len(sent)
                assert m.receive(p, time.monotonic())
                await eventually_async(lambda before=before: len(sent) > before, 1, what=f"the echo of {i}")
                assert m.stats.tx_early == i + 1 and m.stats.frames_early == i + 1
                m.play()  # the tick this frame stood for: nothing to play, nothing to send
                m.send()
                assert len(sent) == before + 1 and m.stats.frames_to_agent == i + 1
            assert engine.answer_passes >= 20 and engine.tick_errors == 0 and m.stats.frames_concealed == 0
        finally:
            engine.remove(1, m)
            s.close()
            agent_task.cancel()
            await engine.stop()

    asyncio.run(scenario())


def test_sender_reports_keep_the_streams_clock_and_counts() -> None:
    """The SR's RTP timestamp is the tick's frame's, whether frames went out
    early or not; its packet and octet counts go on from the old owner's."""

    async def scenario() -> None:
        sent: list[bytes] = []
        old = RtpStreamState(ssrc=777, payload_type=111, seq=100, timestamp=5000, roc=0, packets=500, octets=40000)
        m, s = media(sent, tx=old)
        m.start_sending()
        m.rtcp.next_at = 0.0  # a report is due at the first tick
        s.out_track.push(_frame(tone(1)[0]))
        s.out_track.push(_frame(tone(1)[0]))
        m.answer()  # two frames out ahead of their ticks
        m.tick()
        rx = pylibsrtp.Session(pylibsrtp.Policy(key=OUR_KEY, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
                                                srtp_profile=PROFILE))
        rtp = [rtp_header.parse(rx.unprotect(p)) for p in sent if not is_rtcp(p)]
        (sr,) = [rtcp.parse(rx.unprotect_rtcp(p)).reports[0] for p in sent if is_rtcp(p)]
        assert [h.timestamp - rtp[0].timestamp for h in rtp] == [0, 960]
        assert sr.sender.rtp_timestamp == rtp[0].timestamp  # the first tick's frame: the first sent
        assert sr.sender.packets == 502 and sr.sender.octets == 40000 + sum(len(h.payload) for h in rtp)
        assert m.stats.tx_rtcp == 1 and m.rtcp.srtcp_used == 1
        assert m.tx_stream.to_model().octets == sr.sender.octets  # what the export carries on

    asyncio.run(scenario())


def test_a_call_that_ends_here_says_bye_one_that_moves_on_does_not() -> None:
    """RFC 3550 6.6: the last compound of a call that ends is SR + SDES +
    BYE for our SSRC. Frozen for a migration (the SSRC goes on at the new
    owner) or never sending (a new owner not activated), nothing goes out."""

    async def scenario() -> None:
        sent: list[bytes] = []
        m, s = media(sent)
        m.send_bye()
        assert sent == []  # not sending yet
        m.start_sending()
        s.out_track.push(_frame(tone(1)[0]))
        m.tick()
        m.frozen = True
        m.send_bye()
        assert not any(is_rtcp(p) for p in sent)
        m.frozen = False
        m.send_bye()
        rx = session(OUR_KEY, inbound=True)
        rtp = [rtp_header.parse(rx.unprotect(p)) for p in sent if not is_rtcp(p)]
        (last,) = [rtcp.parse(rx.unprotect_rtcp(p)) for p in sent if is_rtcp(p)]
        assert [r.ssrc for r in last.reports] == [777] and last.reports[0].sender.packets == len(rtp) == 1
        assert last.sdes[0].cnames[0][0] == 777 and last.byes == [rtcp.Bye((777,))]
        assert m.stats.tx_bye == 1 and m.rtcp.srtcp_used == 1

    asyncio.run(scenario())
