"""One engine call's media: SRTP both ways, the client's RTP through the jitter
buffer and the Opus decoder to the agent, the agent's audio encoded out.

Nothing here waits: :meth:`CallMedia.receive` runs per datagram,
:meth:`CallMedia.tick` once per 20 ms for every call from the media engine's
one clock (media_engine.py). The wire formats are read and written by
manager.protocol.rtp_header; SRTP is libsrtp (pylibsrtp) with aiortc's
policy, each continued SSRC's stream started at its exported rollover
counter (aiortc_hooks.srtp_session).

On arrival: a packet that is a coming tick's frame, while the jitter buffer
is one frame deep (SpeechJitterBuffer.pop_ready), is decoded and delivered
at once, and the engine sends the agent's answer as soon as the agent ran
(:meth:`CallMedia.answer`, at most MAX_AHEAD frames ahead of the ticks, as
on the way in); the tick then skips what was served early.
Concealment, and frames held for measured jitter or for FEC, stay the
tick's. RTCP (rtcp_sender): a compound SR + SDES at RFC 3550's interval,
checked at each tick, and SR + SDES + BYE when the call ends here.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import av
import pylibsrtp
from aiortc.rtp import is_rtcp

from manager.protocol import rtp_header

from . import aiortc_hooks as hooks
from .agent import FRAME_SAMPLES, SAMPLE_RATE, TIME_BASE, AgentSession
from .jitter import MAX_AHEAD, SpeechJitterBuffer
from .opus import DEFAULT_COMPLEXITY, Decoder, Encoder, OpusError
from .rtcp_sender import RtcpSender, cname_for, skip_srtcp_indices
from .rtcp_stats import CallQuality
from .rtp_streams import WRAP_MARGIN, RtpStreamState

logger = logging.getLogger(__name__)

U32_MAX = 0xFFFFFFFF


class FrameMark(str):
    """A frame's mark ("plc", "fec"), one object per frame: PyAV keeps
    ``frame.opaque`` in a table keyed by the object's id and drops the entry
    when any frame holding it is freed, so frames sharing the interned "plc"
    lost their mark (read None, as real audio) once another frame was freed."""

    __slots__ = ()
MID_URI = "urn:ietf:params:rtp-hdrext:sdes:mid"
AUDIO_LEVEL_URI = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"
#: Cap on the freeze-to-first-packet time used to continue RTP timestamps
#: (clocks of two machines that disagree wildly must not make a huge jump).
MAX_ELAPSED = 60.0
PACKET_TIME = FRAME_SAMPLES / SAMPLE_RATE
#: Datagrams a call may send us per second, and in one burst: Opus at 50/s,
#: RTCP, consent checks and data-channel records stay far below.
RATE_LIMIT = 400.0
RATE_BURST = 200.0


def since_freeze(frozen_at: float) -> float:
    """Seconds since the old owner's freeze (its wall clock), within 0..MAX_ELAPSED."""
    return min(max(time.time() - frozen_at, 0.0), MAX_ELAPSED)


@dataclass
class MediaStats:
    rx_decrypted: int = 0  # SRTP + SRTCP packets unprotected OK
    rx_undecryptable: int = 0  # failed unprotect (wrong key, replay, tampering)
    rx_malformed: int = 0  # authenticated, but an RTP header that does not fit the packet
    rx_late: int = 0  # arrived after its slot was played (or concealed)
    rx_duplicates: int = 0
    rx_other_payload: int = 0  # an RTP payload type that is not the call's Opus
    rx_decode_errors: int = 0
    rx_over_rate: int = 0  # datagrams beyond the call's rate, dropped before any work
    tx_packets: int = 0
    tx_early: int = 0  # of those, the agent's answer sent at once (not at the tick)
    tx_rtcp: int = 0  # SRTCP compounds sent
    tx_bye: int = 0  # of those, the call's goodbye (it ended here)
    frozen_dropped: int = 0  # frames encoded but not sent while frozen for a migration
    frames_to_agent: int = 0
    frames_early: int = 0  # of those, delivered on arrival (not at the tick)
    frames_concealed: int = 0  # of those, played by PLC (nothing to decode)
    frames_fec: int = 0  # of those, rebuilt from the next packet's FEC
    frames_held: int = 0  # of those, what aiortc held at the hand-over (played at once)
    rtcp: Counter[str] = field(default_factory=Counter)  # SRTCP packets by sender SSRC


class RateLimit:
    """A token bucket: `rate` per second, at most `burst` at once."""

    def __init__(self, rate: float = RATE_LIMIT, burst: float = RATE_BURST) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = burst
        self._at = time.monotonic()

    def allow(self, now: float) -> bool:
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


def audio_level(pcm: bytes) -> int:
    """RFC 6464 level (0 = loudest, 127 = silence) from every eighth sample."""
    samples = memoryview(pcm[:len(pcm) & ~1]).cast("h")[::8]
    if not samples:
        return 127
    # map(mul) runs the products in C: a third of a generator's time.
    rms = math.sqrt(sum(map(operator.mul, samples, samples)) / len(samples))
    if rms < 1:
        return 127
    return min(127, max(0, round(-20 * math.log10(rms / 32767))))


@dataclass
class MediaPlan:
    """What a call's media continues from (an ImportPlan's media part)."""

    conn_id: int
    libsrtp_profile: int
    tx_key: bytes
    rx_key: bytes
    local_ssrc: int
    payload_type: int  # the call's Opus
    mid: str | None
    header_extensions: list[dict]
    tx: RtpStreamState | None
    rx: dict[int, RtpStreamState]
    frozen_at: float  # wall clock of the old owner's freeze
    rtcp_rx: dict[str, int]
    #: SRTCP packets the call's previous owners sent on local_ssrc (its index goes on from there).
    srtcp_used: int = 0
    cname: str | None = None  # the SDES CNAME of our reports (default: from tx_key)


class CallMedia:
    """SRTP, jitter buffer, Opus and RTP for one call (see the module docstring)."""

    def __init__(self, plan: MediaPlan, session: AgentSession, send: Callable[[bytes], None], *,
                 complexity: int = DEFAULT_COMPLEXITY) -> None:
        self.plan = plan
        self.session = session
        self._send = send
        self.stats = MediaStats(rtcp=Counter(plan.rtcp_rx))
        self.tx_stream = plan.tx or RtpStreamState(ssrc=plan.local_ssrc, payload_type=plan.payload_type)
        tx = self.tx_stream
        # Our first packet's counter: the next sequence number may wrap.
        tx_roc = (tx.roc + (1 if tx.packets and tx.seq == 0xFFFF else 0)) & U32_MAX
        rx_roc = {ssrc: st.roc for ssrc, st in plan.rx.items()}
        near_wrap = {ssrc: (st.roc + 1) & U32_MAX for ssrc, st in plan.rx.items()
                     if st.packets and 0xFFFF - st.seq < WRAP_MARGIN}
        profile = plan.libsrtp_profile
        try:
            self._rx = hooks.srtp_session(plan.rx_key, inbound=True, libsrtp_profile=profile, rollover=rx_roc)
            self._rx_wrapped = (hooks.srtp_session(plan.rx_key, inbound=True, libsrtp_profile=profile,
                                                   rollover={**rx_roc, **near_wrap}) if near_wrap else None)
            self._tx = hooks.srtp_session(plan.tx_key, inbound=False, libsrtp_profile=profile,
                                          rollover={plan.local_ssrc: tx_roc})
            skip_srtcp_indices(self._tx, plan.local_ssrc, plan.srtcp_used)
        except pylibsrtp.Error as exc:
            raise ValueError(f"SRTP session setup failed: {exc}") from None
        self.rx_streams = {ssrc: copy.copy(st) for ssrc, st in plan.rx.items()}
        self.jitter = SpeechJitterBuffer()
        self._jitter_ssrc: int | None = None
        self._decoder = Decoder()
        self._encoder = Encoder(complexity=complexity)
        ids = {x["uri"]: x["id"] for x in plan.header_extensions}
        self._mid_ext = (ids[MID_URI], plan.mid.encode()) if MID_URI in ids and plan.mid else None
        self._level_id = ids.get(AUDIO_LEVEL_URI)
        self._ext_by_level: dict[int, bytes] = {}  # at most 128 (RFC 6464 levels)
        self._rx_pts = 0
        self._tx_base: int | None = None  # RTP timestamp of the first frame we send
        self._tx_frames = 0
        self._tx_ahead = 0  # coming ticks whose frame went out early (answer)
        #: Set by the engine: asks for :meth:`answer` once this call's agent had
        #: a chance to answer a frame delivered on arrival.
        self.answer_soon: Callable[[CallMedia], None] | None = None
        self.sending = False
        self.frozen = False
        self.rate = RateLimit()
        self.quality = CallQuality(plan.conn_id)  # RTCP figures (rtcp_stats); fed below
        self.quality.local_ssrcs.add(plan.local_ssrc)
        self.rtcp = RtcpSender(plan.local_ssrc, plan.cname or cname_for(plan.tx_key, plan.local_ssrc),
                               self.quality, sent_before=plan.srtcp_used)

    # -- inbound -----------------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> bool:
        """Unprotect one SRTP/SRTCP packet and take it in; False if it does not authenticate."""
        rtcp = is_rtcp(data)
        try:
            plain = self._rx.unprotect_rtcp(data) if rtcp else self._rx.unprotect(data)
            if not rtcp:
                self._rx_wrapped = None  # a stream authenticated at its exported counter
        except pylibsrtp.Error:
            plain = None
        if plain is None and self._rx_wrapped is not None and not rtcp:
            try:  # the client's stream wrapped before its first packet reached us
                plain = self._rx_wrapped.unprotect(data)
                self._rx, self._rx_wrapped = self._rx_wrapped, None
                logger.info("call %d: the client's stream had wrapped before the switch", self.plan.conn_id)
            except pylibsrtp.Error:
                pass
        if plain is None:
            self.stats.rx_undecryptable += 1
            return False
        self.stats.rx_decrypted += 1
        if rtcp:
            if len(plain) >= 8:
                self.stats.rtcp[str(int.from_bytes(plain[4:8], "big"))] += 1
            self.quality.rtcp_received(plain)
            return True
        header = rtp_header.parse(plain)
        if header is None:
            self.stats.rx_malformed += 1
            return True
        stream = self.rx_streams.get(header.ssrc)
        if stream is None:
            stream = self.rx_streams[header.ssrc] = RtpStreamState(ssrc=header.ssrc,
                                                                   payload_type=header.payload_type)
        stream.update(header.sequence, header.timestamp, header.payload_type, len(header.payload))
        self.quality.rtp_received(header.ssrc, header.sequence, header.timestamp, now, stream.roc)
        if header.payload_type != self.plan.payload_type or not header.payload:
            self.stats.rx_other_payload += 1
            return True
        if header.ssrc != self._jitter_ssrc:
            if self._jitter_ssrc is not None:
                logger.info("call %d: client audio SSRC %d -> %d", self.plan.conn_id, self._jitter_ssrc,
                            header.ssrc)
                self.jitter = SpeechJitterBuffer()
            self._jitter_ssrc = header.ssrc
        outcome = self.jitter.push(header.sequence, header.timestamp, header.payload, now)
        if outcome == "late":
            self.stats.rx_late += 1
        elif outcome == "duplicate":
            self.stats.rx_duplicates += 1
        else:
            self._play_on_arrival()
        return True

    def _play_on_arrival(self) -> None:
        out = self.jitter.pop_ready()
        if out is None:
            return
        self._deliver(*self._decode(out.kind, out.payload))
        self.stats.frames_early += 1
        if self.answer_soon is not None and self.sending:
            self.answer_soon(self)

    # -- the 20 ms tick ----------------------------------------------------------------

    def tick(self) -> None:
        """One frame each way: the client's to the agent, the agent's to the client."""
        self.play()
        self.send()

    def play(self) -> None:
        """The tick's first half: the client's next frame to the agent."""
        self._play()

    def send(self) -> None:
        """The tick's second half: the agent's next 20 ms to the client (unless
        it went out early), and an RTCP report when one is due."""
        if not self.sending:
            return
        if self._tx_ahead:
            self._tx_ahead -= 1
        else:
            self._send_frame()
        if not self.frozen:
            now = time.monotonic()
            if self.rtcp.due(now):
                self._send_rtcp(now)

    def answer(self) -> None:
        """The agent's queued whole frames now (it answered frames delivered on
        arrival), as far as MAX_AHEAD frames ahead of the ticks they stand for."""
        if not self.sending or self.frozen:
            return
        while self._tx_ahead < MAX_AHEAD and self.session.out_track.buffered_samples >= FRAME_SAMPLES:
            self._send_frame()
            self._tx_ahead += 1
            self.stats.tx_early += 1

    def play_held(self, payloads: list[bytes]) -> None:
        """Decode and deliver at once the client's frames the previous owner
        (aiortc, at a hand-over) received and had not played, oldest first;
        the decoder goes on from them to the engine's first packet."""
        for payload in payloads:
            self._deliver(*self._decode("packet", payload))
            self.stats.frames_held += 1

    def _play(self) -> None:
        out = self.jitter.pop()
        if out is not None:
            self._deliver(*self._decode(out.kind, out.payload))

    def _decode(self, kind: str, payload: bytes | None) -> tuple[bytes, str | None]:
        """PCM for one playout decision and its mark ("fec", "plc" or None)."""
        try:
            if kind == "packet":
                assert payload is not None
                return self._decoder.decode(payload), None
            if kind == "fec":
                assert payload is not None
                return self._decoder.decode_fec(payload), "fec"
            return self._decoder.conceal(), "plc"
        except OpusError:
            self.stats.rx_decode_errors += 1  # an authenticated but broken payload: conceal it
            return self._decoder.conceal(), "plc"

    def _deliver(self, pcm: bytes, mark: str | None) -> None:
        samples = len(pcm) // 2
        frame = av.AudioFrame(format="s16", layout="mono", samples=samples)
        plane = frame.planes[0]
        plane.update(pcm if len(pcm) == plane.buffer_size else pcm.ljust(plane.buffer_size, b"\0"))
        frame.sample_rate = SAMPLE_RATE
        frame.time_base = TIME_BASE
        frame.pts = self._rx_pts
        frame.opaque = None if mark is None else FrameMark(mark)
        self._rx_pts += samples
        self.stats.frames_to_agent += 1
        if mark == "plc":
            self.stats.frames_concealed += 1
        elif mark == "fec":
            self.stats.frames_fec += 1
        self.session.deliver_audio(frame)

    def start_sending(self) -> None:
        """Continue the old owner's RTP: sequence numbers from its last + 1, the
        clock from its last timestamp + one frame + the time since its freeze
        (the client hears a pause, no loss)."""
        tx = self.tx_stream
        if tx.packets == 0:  # the old owner never sent: start like aiortc
            tx.seq = random.randint(0, 0xFFFF)
            self._tx_base = random.randint(0, U32_MAX)
        else:
            elapsed = since_freeze(self.plan.frozen_at)
            self._tx_base = (tx.timestamp + round((PACKET_TIME + elapsed) * SAMPLE_RATE)) & U32_MAX
        self.sending = True

    def _send_frame(self) -> None:
        pcm = self.session.out_track.next_pcm()
        payload = self._encoder.encode(pcm)
        assert self._tx_base is not None
        timestamp = (self._tx_base + self._tx_frames * FRAME_SAMPLES) & U32_MAX
        self._tx_frames += 1  # the clock keeps real time while frozen
        if self.frozen:
            self.stats.frozen_dropped += 1
            return
        tx = self.tx_stream
        seq = (tx.seq + 1) & 0xFFFF if tx.packets else tx.seq
        ext = self._extensions(audio_level(pcm) if self._level_id is not None else 0)
        # Marker on every packet, as aiortc's sender: each is the last of its frame.
        packet = rtp_header.build(self.plan.payload_type, True, seq, timestamp, self.plan.local_ssrc, payload, ext)
        self._send(self._tx.protect(packet))
        tx.update(seq, timestamp, self.plan.payload_type, len(payload))
        self.stats.tx_packets += 1
        if self.quality.first_rtp_sent_at is None:
            self.quality.rtp_sent(self.plan.local_ssrc)

    def _extensions(self, level: int) -> bytes:
        """The header extension block for a packet at audio `level` (built once per level)."""
        ext = self._ext_by_level.get(level)
        if ext is None:
            items = [self._mid_ext] if self._mid_ext else []
            if self._level_id is not None:
                items.append((self._level_id, bytes([level])))
            ext = self._ext_by_level[level] = rtp_header.one_byte_extensions(items) if items else b""
        return ext

    def _rtp_clock(self, now: float) -> int:
        """Our stream's RTP timestamp now, at a tick: its frame's (the frames
        sent ahead of their ticks are not yet due; those skipped while frozen
        kept the clock running)."""
        return ((self._tx_base or 0) + (self._tx_frames - self._tx_ahead - 1) * FRAME_SAMPLES) & U32_MAX

    def _send_rtcp(self, now: float) -> None:
        plain = self.rtcp.report(now, rtp_timestamp=self._rtp_clock, packets=self.tx_stream.packets,
                                 octets=self.tx_stream.octets)
        self._send(self._tx.protect_rtcp(plain))
        self.stats.tx_rtcp += 1

    def send_bye(self) -> None:
        """The call ends here: a last report with a BYE for our SSRC (RFC 3550
        6.6). Not while frozen (the SSRC goes on at the call's new owner) or
        before sending (a new owner not yet active)."""
        if not self.sending or self.frozen:
            return
        plain = self.rtcp.bye(time.monotonic(), rtp_timestamp=self._rtp_clock, packets=self.tx_stream.packets,
                              octets=self.tx_stream.octets)
        self._send(self._tx.protect_rtcp(plain))
        self.stats.tx_rtcp += 1
        self.stats.tx_bye += 1

    def info(self) -> dict:
        stats = dict(vars(self.stats))
        stats["rtcp"] = dict(self.stats.rtcp)
        return {**stats, "jitter": self.jitter.info()}
