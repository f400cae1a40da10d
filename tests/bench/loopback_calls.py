"""The density benchmark's load generator: aiortc clients that are cheap once connected.

Each call's ICE and DTLS handshake is aiortc's (a real client per call);
everything after it is this module's. From the moment a client is placed,
RTP and RTCP reaching its socket skip aiortc: before the hand-over they are
dropped (aiortc would decode the transceiver's audio in a thread per call,
which is what starved the event loop of earlier runs: 125 placements took
43 s, and 72 of the calls were ended by the transceiver before the media),
after it they are
unprotected with the call's SRTP keys and counted by sequence number
(:meth:`CheapCall.on_rtp`). STUN (consent checks) and DTLS still reach
aiortc. Media is sent by :meth:`CheapCall.send` with the call's keys.

Calls are placed in batches (``BATCH`` offers, then a wait until they
connected or failed): the transceiver's handshakes run a batch at a time,
as a fleet's would arrive, instead of all at once.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import pylibsrtp
from aiortc.mediastreams import MediaStreamTrack

from manager.protocol import rtp_header
from tests.bench.profile_transceiver import place_client
from tests.support.waiting import NotYet, eventually_async

#: Offers placed before waiting for them to connect.
BATCH = 25
#: Seconds a batch may take to connect (a loaded 2-core machine), and the hand-overs.
BATCH_TIMEOUT = 30.0
HANDOVER_TIMEOUT = 30.0
#: Packets of the transceiver's audio a call receives before its media starts.
SETTLED_RTP = 10
#: Echo payloads longer than this carry sound, by the transceiver's encoder:
#: the engine's (20 kb/s mono) codes silence in under 15 bytes and the tone
#: in 20-75; aiortc's (96 kb/s stereo) silence after a tone in up to 90
#: bytes, the tone in 180-410.
VOICED_BYTES = {"engine": 15, "aiortc": 150}
#: Frames of tone in a burst, then as many of silence.
BURST = 25


class Silent(MediaStreamTrack):
    """A track with no frame ever: aiortc's sender waits on it and sends nothing."""

    kind = "audio"

    async def recv(self):
        await asyncio.Future()


def _is_rtcp(data: bytes) -> bool:
    return len(data) > 1 and 192 <= data[1] <= 208  # RFC 5761 4: RTCP packet types 192-208


@dataclass
class CheapCall:
    """One aiortc client whose media this process drives by hand."""

    pc: object
    payload_type: int
    extensions: bytes
    keep_payloads: bool = False
    voiced_bytes: int = VOICED_BYTES["engine"]
    loss: float = 0.0  # the sender's own drop probability (when the kernel does not drop)
    ssrc: int = 0
    seq: int = 0
    ts_base: int = 0
    sent: int = 0
    echoes: int = 0
    voiced: int = 0  # echoes carrying sound
    lost: int = 0
    last_seq: int | None = None
    payloads: list[bytes] = field(default_factory=list)
    ended: bool = False
    dropped: int = 0
    tone_sent: int = 0
    onset_at: float | None = None  # send time of the current burst's first packet, until its echo
    was_voiced: bool = False
    latencies: list[float] = field(default_factory=list)
    early_rtp: int = 0  # RTP packets from the transceiver before the take-over
    _rx: object = None  # the call's SRTP receive session, once taken over

    @classmethod
    def placed(cls, pc, answer: str, **kwargs) -> CheapCall:
        pt = int(re.search(r"a=rtpmap:(\d+) opus/48000", answer, re.I).group(1))
        mid = re.search(r"a=mid:(\S+)", answer).group(1)
        ext = re.search(r"a=extmap:(\d+) urn:ietf:params:rtp-hdrext:sdes:mid", answer)
        extensions = rtp_header.one_byte_extensions([(int(ext.group(1)), mid.encode())]) if ext else b""
        call = cls(pc, pt, extensions, **kwargs)
        call._bypass_aiortc()
        return call

    def _bypass_aiortc(self) -> None:
        # aiortc internals of the *client* (a load generator, not the transceiver):
        # the ICE connection's sockets, one per gathered host address.
        connection = self.pc.getTransceivers()[0].sender.transport.transport._connection
        for protocol in connection._protocols:
            original = protocol.datagram_received

            def datagram_received(data: bytes, addr, original=original) -> None:
                if 127 < data[0] < 192:  # SRTP or SRTCP (RFC 7983): ours, never aiortc's
                    if _is_rtcp(data):
                        return
                    if self._rx is None:
                        self.early_rtp += 1  # the transceiver's audio (silence) before the media
                        return
                    try:
                        self.on_rtp(self._rx.unprotect(data))
                    except pylibsrtp.Error:
                        pass
                    return
                original(data, addr)

            protocol.datagram_received = datagram_received

    def take_over(self) -> bool:
        """Start this call's media; False if it is no longer connected."""
        t = self.pc.getTransceivers()[0]
        dtls = t.sender.transport
        pair = dtls.transport._connection._nominated.get(1)
        if pair is None or dtls._rx_srtp is None:
            return False
        # aiortc's sender never sent (its track has no frame) and stays (its
        # stop() would send RTCP BYE, and aiortc's transceiver would end the
        # call's incoming track): its SSRC's stream starts here.
        self.ssrc = t.sender._ssrc
        self.seq, self.ts_base = random.randint(0, 0xFFFF), random.randint(0, 0xFFFFFFFF)
        self._tx = dtls._tx_srtp
        self._transport, self._addr = pair.protocol.transport, pair.remote_addr
        self._rx = dtls._rx_srtp
        return True

    def on_rtp(self, data: bytes) -> None:
        """An echo, unprotected: counted, not decoded (but kept on sampled calls)."""
        header = rtp_header.parse(data)
        if header is None:
            return
        if self.last_seq is not None:
            gap = (header.sequence - self.last_seq) & 0xFFFF
            if 1 < gap < 0x8000:
                self.lost += gap - 1
        self.last_seq = header.sequence
        self.echoes += 1
        voiced = len(header.payload) > self.voiced_bytes
        if voiced:
            self.voiced += 1
            if not self.was_voiced and self.onset_at is not None:
                self.latencies.append(time.monotonic() - self.onset_at)
                self.onset_at = None
        self.was_voiced = voiced
        if self.keep_payloads:
            self.payloads.append(header.payload)

    def send(self, payload: bytes, k: int, now: float) -> None:
        """Frame `k` of the signal (see tone_packets); dropped here with probability `loss`."""
        phase = k % (2 * BURST)
        if phase < BURST:
            self.tone_sent += 1
            if phase == 0:
                self.onset_at = now
        packet = rtp_header.build(self.payload_type, False, self.seq, self.ts_base + self.sent * 960, self.ssrc,
                                  payload, self.extensions)
        protected = self._tx.protect(packet)  # protected even when dropped: the SRTP index moves on
        self.seq = (self.seq + 1) & 0xFFFF
        self.sent += 1
        if self.loss and random.random() < self.loss:
            self.dropped += 1
        elif self._transport.is_closing():  # the call ended (an overloaded transceiver let consent expire)
            self.ended = True
        else:
            self._transport.sendto(protected, self._addr)


def _connecting(calls: list[CheapCall]) -> int:
    return sum(c.pc.connectionState in ("new", "connecting") for c in calls)


async def place_calls(conn: Connection, n: int, *, loss: float = 0.0, host: str = "127.0.0.1",
                      sampled: int = 0, batch: int = BATCH,
                      voiced_bytes: int = VOICED_BYTES["engine"]) -> tuple[list[CheapCall], dict]:
    """Place `n` calls in batches, wait for the transceiver's hand-overs, take
    the connected ones over: (those calls, how the set-up went)."""
    calls: list[CheapCall] = []
    t0 = time.monotonic()
    for start in range(0, n, batch):
        group = []
        for i in range(start, min(n, start + batch)):
            pc, answer = await place_client(conn, i + 1, Silent(), host=host)
            group.append(CheapCall.placed(pc, answer, keep_payloads=i < sampled, loss=loss,
                                          voiced_bytes=voiced_bytes))
        try:
            await eventually_async(lambda group=group: _connecting(group) == 0, BATCH_TIMEOUT,
                                   what="a batch of calls to connect", interval=0.05)
        except NotYet:
            pass  # counted below: a call that never connected is not carried
        calls += group
    connected = [c for c in calls if c.pc.connectionState == "connected"]
    loop = asyncio.get_running_loop()

    async def handed_over() -> bool:
        conn.send("calls")
        placed = await loop.run_in_executor(None, conn.recv)
        return placed["settled"] >= len(connected)

    try:
        await eventually_async(handed_over, HANDOVER_TIMEOUT, what="the hand-overs to the engine", interval=0.2)
    except NotYet:
        pass  # the calls not handed over yet stay on aiortc: measured as they are
    # The transceiver's audio (silence) reaches every call from its final
    # owner: its output runs (on the aiortc path an echo pushed before
    # aiortc's sender started would wait in the agent's queue).
    for c in connected:
        c.early_rtp = 0
    try:
        await eventually_async(lambda: all(c.early_rtp >= SETTLED_RTP for c in connected), HANDOVER_TIMEOUT,
                               what="the transceiver's audio to every call", interval=0.05)
    except NotYet:
        pass
    taken = [c for c in connected if c.take_over()]
    setup = {"setup_s": round(time.monotonic() - t0, 1), "failed": sum(c.pc.connectionState != "connected"
                                                                     for c in calls)}
    return taken, setup
