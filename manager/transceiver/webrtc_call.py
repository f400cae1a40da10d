"""A call placed on this transceiver: one aiortc RTCPeerConnection answering the
client's offer as the relay's ufrag, on the transceiver's shared ICE sockets.

The client is learnt only as a peer-reflexive candidate: its checks arrive
from a relay-internal address:port. A MediaTap on the DTLS transport captures
what a migration needs of the media (keys, RTP counters) and a DtlsTap what it
needs of the data channels (record keys and numbers); both implement the freeze.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aioice.candidate import Candidate, candidate_foundation, candidate_priority
from aioice.ice import StunProtocol
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc import sdp as aiortc_sdp
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcicetransport import RTCIceTransport

from manager.protocol.api import OwnerBody
from manager.protocol.callstate import (
    AgentState,
    CallState,
    Codec,
    DtlsState,
    Fingerprint,
    Frozen,
    HeaderExtension,
    IceState,
    MediaSection,
    SctpState,
    SelectedPair,
)
from manager.protocol.callstate import (
    Candidate as CandidateState,
)

from . import aiortc_hooks as hooks
from . import dtls_policy
from .agent import Agent, AgentSession, run_agent
from .call_handle import CallHandle
from .dtls_tap import DtlsTap
from .errors import CallStateConflict, InvalidRequest
from .ice_mux import CallPort, IceMux
from .media_tap import MediaTap
from .rtcp_stats import CallQuality

logger = logging.getLogger(__name__)

Addr = tuple[str, int]

OFFER_MEDIA_KINDS = ("audio", "video", "application")


def strip_offer_candidates(offer_sdp: str) -> tuple[str, int]:
    """Drop candidate and end-of-candidates lines the relay should have removed.

    A candidate would let this transceiver reach the client directly, around
    the relay; end-of-candidates with no candidate makes aioice fail ICE at once
    instead of waiting for the peer-reflexive candidate.
    """
    lines = offer_sdp.replace("\r\n", "\n").split("\n")
    kept = [line for line in lines if not line.startswith(("a=candidate:", "a=end-of-candidates"))]
    return "\r\n".join(kept), len(lines) - len(kept)


def validate_offer(offer_sdp: str) -> aiortc_sdp.SessionDescription:
    try:
        desc = aiortc_sdp.SessionDescription.parse(offer_sdp)
    except Exception as exc:
        raise InvalidRequest(f"offer is not valid SDP: {type(exc).__name__}: {exc}") from None
    if not desc.media:
        raise InvalidRequest("offer has no media section")
    mids = [m.rtp.muxId for m in desc.media]
    for m in desc.media:
        if m.kind not in OFFER_MEDIA_KINDS:
            raise InvalidRequest(f"offer has unsupported media kind {m.kind!r}")
        if not m.ice.usernameFragment or not m.ice.password:
            raise InvalidRequest(f"offer media {m.rtp.muxId!r} lacks a=ice-ufrag/a=ice-pwd")
        if m.dtls is None or not m.dtls.fingerprints:
            raise InvalidRequest(f"offer media {m.rtp.muxId!r} lacks a=fingerprint")
    bundle = next((g for g in desc.group if g.semantic == "BUNDLE"), None)
    # One call = one ICE transport = one ufrag: the relay routes by it.
    if len(desc.media) > 1 and (bundle is None or set(bundle.items) != set(mids)):
        raise InvalidRequest("offer must bundle all media sections in one a=group:BUNDLE")
    return desc


def _candidate(c: Candidate) -> CandidateState:
    return CandidateState(host=c.host, port=c.port, type=c.type, priority=c.priority, foundation=c.foundation,
                          component=c.component, transport=c.transport)


class WebRtcCall(CallHandle):
    """A call answered here with aiortc (see the module docstring)."""

    def __init__(self, *, conn_id: int, ufrag: str, pc: RTCPeerConnection, session: AgentSession, agent: Agent,
                 ice: RTCIceTransport, dtls: RTCDtlsTransport, tap: MediaTap, dtls_tap: DtlsTap,
                 ports: list[CallPort], offer: aiortc_sdp.SessionDescription, quality: CallQuality) -> None:
        super().__init__()
        self.quality = quality
        self.conn_id = conn_id
        self.ufrag = ufrag
        self.pc = pc
        self.session = session
        self.agent = agent
        self.ice = ice
        self.dtls = dtls
        self.tap = tap
        self.dtls_tap = dtls_tap
        self.ports = ports
        self.offer = offer
        self.created_at = time.time()
        self.connected_at: float | None = None
        self.candidates_stripped = 0
        self.consent_expired = False
        self.ending = False
        #: Why the call stays on aiortc instead of entering the media engine (None: it did not try).
        self.engine_refused: str | None = None
        self.handed_over = False
        self._agent_task: asyncio.Future | None = None

    @property
    def connection(self):  # the aioice Connection
        return hooks.transport_connection(self.ice)

    # -- set-up ---------------------------------------------------------------------------

    @classmethod
    async def negotiate(cls, *, conn_id: int, ufrag: str, offer_sdp: str, offer: aiortc_sdp.SessionDescription,
                        pc: RTCPeerConnection, session: AgentSession, agent: Agent,
                        muxes: Sequence[IceMux], audio_on_arrival: bool = True) -> WebRtcCall:
        """Answer the offer as `ufrag`, host candidates on the shared sockets;
        `audio_on_arrival`: the agent gets each audio frame as it arrives
        (hooks.play_audio_on_arrival), not after aiortc's 80 ms buffer."""

        @pc.on("track")
        def on_track(track: Any) -> None:
            session.attach_track(track)  # first audio track only, see AgentSession

        @pc.on("datachannel")
        def on_datachannel(channel: Any) -> None:
            session.attach_channel(channel)

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as exc:
            raise InvalidRequest(f"offer rejected: {exc}") from None

        # Send our audio on the first audio m-line; switch other media off
        # (nobody would read them and aiortc would queue their frames forever).
        audio_done = False
        for t in pc.getTransceivers():
            if t.kind == "audio" and not audio_done:
                pc.addTrack(session.out_track)
                if audio_on_arrival:
                    hooks.play_audio_on_arrival(t.receiver)
                audio_done = True
            else:
                t.direction = "inactive"

        dtls_transports = {t.receiver.transport for t in pc.getTransceivers()}
        if pc.sctp is not None:
            dtls_transports.add(pc.sctp.transport)
        if len(dtls_transports) != 1:
            raise InvalidRequest("offer must bundle all media on one transport")
        dtls = dtls_transports.pop()
        hooks.dtls_cipher_policy(dtls, dtls_policy.configure)  # RSA-certificate peers too
        ice = dtls.transport
        connection = hooks.ice_connection(ice.iceGatherer)
        # The caller checked the ufrag with aioice's own validate_username.
        hooks.set_local_ufrag(connection, ufrag)

        ports: list[CallPort] = []

        def shared(conn: Any, component: int) -> list[tuple[StunProtocol, Candidate]]:
            out = []
            for mux in muxes:
                protocol = StunProtocol(conn)
                ports.append(mux.attach(ufrag, protocol))
                host, port = mux.sockname
                out.append((protocol, Candidate(
                    foundation=candidate_foundation("host", "udp", host), component=component, transport="udp",
                    priority=candidate_priority(component, "host"), host=host, port=port, type="host")))
            return out

        hooks.share_host_candidates(connection, shared)
        quality = CallQuality(conn_id)
        # Before the tap: what its migration freeze holds back is not counted as sent.
        hooks.tap_rtcp(dtls, sent=quality.sent, received=quality.rtcp_received)
        tap = MediaTap()
        tap.install(dtls)
        dtls_tap = DtlsTap()
        dtls_tap.install(dtls)
        # The offer was accepted above; a failure from here on is ours, not the client's.
        await pc.setLocalDescription(await pc.createAnswer())
        return cls(conn_id=conn_id, ufrag=ufrag, pc=pc, session=session, agent=agent, ice=ice, dtls=dtls, tap=tap,
                   dtls_tap=dtls_tap, ports=ports, offer=offer, quality=quality)

    def start(self, *, connect_timeout: float, on_end: Callable[[WebRtcCall, str], Awaitable[None]],
              on_connected: Callable[[WebRtcCall], None] | None = None) -> None:
        """Run the agent, watch the connection, and end the call through
        `on_end(call, reason)` when it fails, closes or never connects;
        `on_connected(call)` once ICE and DTLS are up."""

        def consent_expired() -> None:
            self.consent_expired = True

        hooks.on_consent_expired(self.connection, consent_expired)
        pc = self.pc

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            state = pc.connectionState
            if state == "connected" and self.connected_at is None:
                self.connected_at = time.time()
                logger.info("call %d connected via %s", self.conn_id, self.selected_remote())
                if on_connected is not None:
                    on_connected(self)
            elif state in ("failed", "closed"):
                await on_end(self, self._end_reason(state))

        async def watchdog() -> None:
            await asyncio.sleep(connect_timeout)
            if self.connected_at is None:
                await on_end(self, f"not connected within {connect_timeout:g} s")

        self._agent_task = self._tasks.spawn(run_agent(self.agent, self.session, f"call {self.conn_id}"))
        self._spawn(watchdog())

    # -- the media engine -------------------------------------------------------------------

    def handover_blocker(self) -> tuple[bool, str] | None:
        """Why the call cannot enter the media engine now, as (passes by
        itself, reason); None when it can."""
        if self.ending:
            return False, "the call is ending"
        if self.pc.connectionState != "connected" or self.tap.srtp is None:
            return True, "not connected yet"
        if self.tap.frozen_at is not None:
            return True, "frozen for a migration"
        sctp = self.pc.sctp
        if sctp is None:
            return None
        record, why = self.dtls_tap.export(include_secrets=False)
        if record is None:
            settling = hooks.dtls_session_secrets(self.dtls) is None or self.dtls_tap.tx_epoch == 0
            return settling, f"data channels: {why}"
        try:
            hooks.sctp_export(sctp)
        except ValueError as exc:
            return True, f"data channels: {exc}"  # not established yet, a channel opening
        return None

    def hand_over(self) -> tuple[asyncio.Future | None, list[bytes]]:
        """The media engine takes the call (frozen and exported just before,
        in the same step): stop all traffic of aiortc's, leave the session and
        agent running. Returns the agent's task for the new call to keep and
        the client's Opus payloads aiortc held undecoded (its jitter buffer
        keeps 80 ms), for the engine to play first: the agent hears every
        frame the client sent. Then :meth:`close` (quiet) shuts aiortc down."""
        self.ending = True  # its own end (aiortc closing) is not the call's
        self.handed_over = True
        for port in self.ports:
            port.muted = True  # no close_notify, ABORT or consent check of aiortc's goes out
            port.mux.detach(port)  # the engine's call registers the same ufrag and address
        self.session.forget_channels()  # messages wait for the engine's channels (the session is frozen)
        # The session stops reading aiortc's track; what aiortc decoded and
        # queued there reaches the agent now, before the engine's frames.
        self.session.detach_track()
        payloads: list[bytes] = []
        for t in self.pc.getTransceivers():
            if t.kind == "audio":
                held = hooks.take_held_audio(t.receiver)
                for frame in held.frames:
                    self.session.deliver_audio(frame)
                payloads.extend(held.payloads)
        task, self._agent_task = self._agent_task, None
        if task is not None:
            self._tasks.release(task)
        self._cancel_tasks()
        return task, payloads

    def _end_reason(self, state: str) -> str:
        if self.consent_expired:
            return "ICE consent expired"
        if self.ice.state == "failed":
            return "ICE failed"
        if self.dtls.state == "failed":
            return "DTLS failed"
        if state == "closed":
            # We did not initiate it (closing marks the call ending first):
            # the client's DTLS close_notify shut the transport down.
            return "client hung up"
        return "connection failed"

    @property
    def answer_sdp(self) -> str:
        assert self.pc.localDescription is not None
        return self.pc.localDescription.sdp

    def selected_remote(self) -> Addr | None:
        pair = hooks.nominated_pair(self.connection)
        return pair.remote_addr if pair is not None else None

    # -- CallHandle -------------------------------------------------------------------------

    @property
    def frozen_at(self) -> float | None:
        return self.tap.frozen_at

    def check_exportable(self) -> None:
        if self.pc.connectionState != "connected" or self.tap.srtp is None:
            raise CallStateConflict(
                f"call {self.conn_id} is not connected (state {self.pc.connectionState}); "
                "only a connected call can be exported")

    def freeze(self) -> None:
        self.tap.freeze()
        self.dtls_tap.freeze()
        self.session.freeze()

    def unfreeze(self) -> None:
        self.tap.unfreeze()
        self.dtls_tap.unfreeze()
        self.session.unfreeze()
        sctp = self.pc.sctp
        if sctp is not None and sctp.state == "connected":
            # What SCTP sent while frozen was dropped: send it now, not at its next timeout.
            self._spawn(hooks.sctp_resume(sctp))

    def activate(self, by: str) -> None:
        raise CallStateConflict(f"call {self.conn_id} was not imported (it is sending already)")

    async def close(self, *, quiet: bool) -> None:
        if quiet:
            # Released after a migration: the client now talks to the new owner,
            # so no DTLS close_notify, SCTP ABORT or consent check may go out.
            for port in self.ports:
                port.muted = True
        if not self.handed_over:
            self.session.close()  # after a hand-over the session lives on in the engine
        self._cancel_tasks()
        try:
            await self.pc.close()
        except Exception:
            logger.exception("closing call %d", self.conn_id)
        for port in self.ports:  # normally done by aioice's Connection.close()
            port.close()
        if self.handed_over:
            # aiortc's objects form cycles only the collector would free, a
            # pause that grows with the calls (docs/media-engine.md, "The
            # collector"); the engine's call holds nothing of theirs.
            await hooks.release_peer_connection(self.pc)

    async def deliver_srtp(self, data: bytes) -> bool:
        return await hooks.deliver_srtp(self.dtls, data)

    def replies_to(self) -> Addr | None:
        return self.selected_remote()

    def repoint(self, old: Addr, new: Addr) -> bool:
        if not hooks.repoint_pair(self.connection, old, new):
            return False
        family = ipaddress.ip_address(new[0]).version
        for port in self.ports:
            if port.mux.family == family:
                port.mux.claim(new, port)  # its media arrives from there too
        logger.info("call %d: replies now go to %s (was %s)", self.conn_id, new, old)
        return True

    def info(self) -> dict[str, Any]:
        return {
            "conn_id": self.conn_id,
            "imported": False,
            "connection_state": self.pc.connectionState,
            "ice_connection_state": self.pc.iceConnectionState,
            "ice_state": self.ice.state,
            "dtls_state": self.dtls.state,
            "created_at": self.created_at,
            "connected_at": self.connected_at,
            "migration": {"frozen_at": self.tap.frozen_at, "frozen_dropped": self.tap.frozen_dropped,
                          "dtls_frozen_dropped": self.dtls_tap.frozen_dropped},
            "media_engine": {"carried": False, "why": self.engine_refused},
        }

    def export_state(self, transceiver_id: int, owner: dict[str, Any], *, include_secrets: bool) -> CallState:
        conn = self.connection
        pair = hooks.nominated_pair(conn)
        ice = IceState(
            local_ufrag=conn.local_username, remote_ufrag=conn.remote_username,
            role="controlling" if conn.ice_controlling else "controlled",
            tie_breaker=hooks.tie_breaker(conn), state=self.ice.state,
            selected_pair=None if pair is None else SelectedPair(local=_candidate(pair.local_candidate),
                                                                 remote=_candidate(pair.remote_candidate)),
            local_pwd=conn.local_password if include_secrets else None,
            remote_pwd=conn.remote_password if include_secrets else None,
        )
        media = []
        for t in self.pc.getTransceivers():
            ssrc, rtx_ssrc = hooks.sender_ssrcs(t.sender)
            media.append(MediaSection(
                mid=t.mid, kind=t.kind, direction=t.currentDirection, local_ssrc=ssrc, local_rtx_ssrc=rtx_ssrc,
                codecs=[Codec(mime_type=c.mimeType, clock_rate=c.clockRate, channels=c.channels,
                              payload_type=c.payloadType, parameters=dict(c.parameters))
                        for c in hooks.transceiver_codecs(t)],
                remote_ssrcs=sorted({s.ssrc for m in self.offer.media if m.rtp.muxId == t.mid for s in m.ssrc}),
                header_extensions=[HeaderExtension(id=x.id, uri=x.uri)
                                   for x in hooks.transceiver_header_extensions(t)],
            ))
        srtp = self.tap.srtp_state(include_secrets)
        sctp = self.pc.sctp
        # The data channels move when both the record layer and the association can.
        record, not_carried = self.dtls_tap.export(include_secrets=include_secrets)
        association = None
        if sctp is not None and record is not None:
            try:
                association = hooks.sctp_export(sctp)
            except ValueError as exc:
                not_carried = str(exc)
        return CallState(
            transceiver_id=transceiver_id,
            conn_id=self.conn_id,
            created_at=self.created_at,
            connected_at=self.connected_at,
            connection_state=self.pc.connectionState,
            owner=OwnerBody(**owner),
            ice=ice,
            dtls=DtlsState(
                role=hooks.dtls_role(self.dtls), state=self.dtls.state, version=self.tap.dtls_version,
                cipher=self.tap.dtls_cipher,
                local_fingerprints=[Fingerprint(algorithm=f.algorithm, value=f.value)
                                    for f in self.dtls.getLocalParameters().fingerprints],
                remote_fingerprints=[Fingerprint(algorithm=f.algorithm, value=f.value)
                                     for m in self.offer.media[:1] if m.dtls is not None for f in m.dtls.fingerprints],
                srtp_profile=srtp.profile if srtp else None,
                record=record if association is not None else None,
            ),
            srtp=srtp,
            media=media,
            rtp=self.tap.rtp_state(),
            rtcp=self.tap.rtcp_state(last_sr=self.quality.last_sr_state()),
            sctp=None if sctp is None else SctpState(
                mid=sctp.mid, state=sctp.state, port=sctp.port, association=association,
                not_carried=None if association is not None else not_carried),
            agent=AgentState(session=self.session.export_state(), state=self.agent.export_state()),
            frozen=None if self.tap.frozen_at is None else Frozen(at=self.tap.frozen_at,
                                                                    monotonic=self.tap.frozen_monotonic),
            migrations=0,
        )
