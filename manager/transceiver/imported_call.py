"""Imported calls: the media endpoint of a call taken over in a live migration.

The old owner exports a connected call and stops sending (freeze); this
transceiver imports the state (manager.protocol.callstate) and becomes a media
endpoint for the call *without* aiortc: no ICE agent, no DTLS handshake, no
SDP. The client keeps its ICE, DTLS and SRTP state and notices nothing:

* **ICE**: the call's exported local ufrag is registered on the shared
  :class:`~manager.transceiver.ice_mux.IceMux` sockets, and the exported
  selected pair's remote address (the relay's flow port) is claimed, so the
  relay's packets for this call reach us as soon as it flips ownership. We
  answer the client's binding requests (RFC 7675 consent freshness) like the
  old owner's aioice did: MESSAGE-INTEGRITY with the exported local password,
  FINGERPRINT, XOR-MAPPED-ADDRESS. We send no checks of our own; consent
  expires when the client's checks stop for ``consent_timeout`` seconds.
* **SRTP**: fresh libsrtp sessions from the exported master keys, with
  aiortc's policy (aiortc_hooks.srtp_session), each exported SSRC's stream
  started at its exported rollover counter, so calls move whatever their
  length. A client stream within WRAP_MARGIN of its wrap may have wrapped
  before its first packet reaches us: a second session at the next counter
  takes that packet if the first cannot authenticate it.
* **Media**: the client's packets are decoded with aiortc's codec classes and
  fed to a new agent (``import_state`` from the export). The agent's paced
  outbound track is encoded into RTP with the same SSRC and payload type,
  sequence numbers continuing from the old owner's last packet, timestamps
  continued by the time elapsed since the freeze. No media goes out before
  :meth:`ImportedCall.activate` (the relay's flip, or the first authenticated
  packet from the client): anything sent earlier would be dropped by the
  relay and show up at the client as a sequence gap.
* **DTLS / data channels**: the DTLS session and the SCTP association are
  continued from the exported state (imported_data.ImportedDataChannels):
  record keys from the master secret, sequence numbers and replay window
  carried over, aiortc's association rebuilt; the agent's session gets the
  channels at activation. An export that could not carry them (its
  ``sctp.not_carried`` says why) leaves DTLS datagrams dropped and counted.

See docs/transceiver.md, section "Migration".
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import av
import pylibsrtp
from aioice import stun
from aioice.candidate import candidate_foundation, candidate_priority
from aiortc.codecs import get_decoder, get_encoder
from aiortc.codecs.base import Decoder, Encoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpparameters import (
    RTCRtpHeaderExtensionParameters,
    RTCRtpParameters,
)
from aiortc.rtp import HeaderExtensionsMap, RtpPacket, compute_audio_level_dbov, is_rtcp

from manager.protocol.api import OwnerBody
from manager.protocol.callstate import (
    AgentState,
    CallState,
    Candidate,
    Frozen,
    IceState,
    RtcpState,
    RtpState,
    SelectedPair,
    SrtpState,
)
from manager.protocol.rfc7983 import PacketClass, classify

from . import aiortc_hooks as hooks
from .agent import Agent, AgentSession, run_agent
from .call_handle import CallHandle
from .ice_mux import CallPort, IceMux
from .import_plan import ImportPlan
from .imported_data import ImportedDataChannels
from .rtp_streams import WRAP_MARGIN, RtpStreamState

logger = logging.getLogger(__name__)

Addr = tuple[str, int]
U32_MAX = 0xFFFFFFFF
DEFAULT_CONSENT_TIMEOUT = 30.0  # RFC 7675: consent expires 30 s after the last check
#: Cap on the freeze-to-first-packet time used to continue RTP timestamps
#: (clocks of two machines that disagree wildly must not make a huge jump).
MAX_ELAPSED = 60.0
PACKET_TIME = 0.020  # outbound audio is paced in 20 ms frames (agent.py)


class _PortProtocol(asyncio.DatagramProtocol):
    """What the IceMux hands this call's datagrams to, one per shared socket."""

    def __init__(self, call: ImportedCall) -> None:
        self.call = call
        self.port: CallPort | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.port = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Addr) -> None:  # type: ignore[override]
        assert self.port is not None
        self.call.datagram_received(self.port, data, addr)

    def connection_lost(self, exc: Exception | None) -> None:
        pass


@dataclass
class MigrationStats:
    imported_at: float = field(default_factory=time.time)
    imported_monotonic: float = field(default_factory=time.monotonic)
    activated_at: float | None = None
    activated_by: str | None = None  # "api", "srtp" or "stun"
    first_sent_at: float | None = None
    import_to_first_sent_s: float | None = None
    activate_to_first_sent_s: float | None = None
    rx_decrypted: int = 0  # SRTP + SRTCP packets unprotected OK
    rx_undecryptable: int = 0  # failed unprotect (wrong key, replay, tampering)
    rx_late: int = 0  # RTP older than what was already decoded (no jitter buffer)
    rx_decode_errors: int = 0
    rx_dtls_dropped: int = 0  # DTLS that did not authenticate, or data channels not carried
    rx_other_dropped: int = 0
    stun_answered: int = 0
    stun_rejected: int = 0  # bad USERNAME / MESSAGE-INTEGRITY / method: not answered
    stun_ignored: int = 0  # responses and indications (e.g. to the old owner's checks)
    tx_packets: int = 0


class ImportedCall(CallHandle):
    """A call imported from another transceiver: ICE responder, SRTP, codecs, agent."""

    def __init__(
        self,
        spec: ImportPlan,
        session: AgentSession,
        agent: Agent,
        *,
        consent_timeout: float = DEFAULT_CONSENT_TIMEOUT,
        on_consent_expired: Callable[[ImportedCall], Awaitable[None]],
        on_closed_by_client: Callable[[ImportedCall, str], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.conn_id = spec.state.conn_id
        self.ufrag = spec.ice.local_ufrag
        self.session = session
        self.agent = agent
        self.consent_timeout = consent_timeout
        self._on_consent_expired = on_consent_expired
        self.created_at: float = spec.state.created_at
        self.connected_at: float | None = spec.state.connected_at
        self.ports: list[CallPort] = []
        self.remote_candidate = spec.remote_candidate.model_copy()
        self.stats = MigrationStats()
        self._local_pwd = (spec.ice.local_pwd or "").encode()
        self.ending = False
        self.consent_expired = False
        self._frozen_at: float | None = None
        self.frozen_monotonic: float | None = None
        self._last_consent = time.monotonic()  # the import counts as the last check

        self.codec = spec.codecs[0]
        self.tx_stream = spec.tx or RtpStreamState(
            ssrc=spec.local_ssrc, payload_type=self.codec.payloadType
        )
        tx = self.tx_stream
        # Our first packet's counter: the next sequence number may wrap.
        tx_roc = (tx.roc + (1 if tx.packets and tx.seq == 0xFFFF else 0)) & U32_MAX
        rx_roc = {ssrc: st.roc for ssrc, st in spec.rx.items()}
        near_wrap = {ssrc: (st.roc + 1) & U32_MAX for ssrc, st in spec.rx.items()
                     if st.packets and 0xFFFF - st.seq < WRAP_MARGIN}
        try:
            self._rx = hooks.srtp_session(spec.rx_key, inbound=True, libsrtp_profile=spec.libsrtp_profile,
                                          rollover=rx_roc)
            self._rx_wrapped = (hooks.srtp_session(spec.rx_key, inbound=True, libsrtp_profile=spec.libsrtp_profile,
                                                   rollover={**rx_roc, **near_wrap}) if near_wrap else None)
            self._tx = hooks.srtp_session(spec.tx_key, inbound=False, libsrtp_profile=spec.libsrtp_profile,
                                          rollover={spec.local_ssrc: tx_roc})
        except pylibsrtp.Error as exc:
            raise ValueError(f"SRTP session setup failed: {exc}") from None
        self.rx_streams = {ssrc: copy.copy(st) for ssrc, st in spec.rx.items()}
        self.rx_rtcp: Counter[str] = Counter(spec.state.rtcp.rx_packets)
        self._encoder: Encoder = get_encoder(self.codec)
        self._decoders: dict[int, Decoder | None] = {}
        self._on_closed_by_client = on_closed_by_client
        state = spec.state
        self.data: ImportedDataChannels | None = None
        self.data_not_carried = state.sctp.not_carried if state.sctp is not None else None
        if state.sctp is not None and state.sctp.association is not None:
            if state.dtls.record is None or state.dtls.role is None or state.dtls.cipher is None:
                raise ValueError("dtls.record/role/cipher: missing (the SCTP association needs the DTLS session)")
            self.data = ImportedDataChannels(role=state.dtls.role, cipher=state.dtls.cipher, record=state.dtls.record,
                                             sctp=state.sctp, send=self._send_dtls, on_closed=self._closed_by_client)
        self._ext_map = HeaderExtensionsMap()
        self._ext_map.configure(
            RTCRtpParameters(
                headerExtensions=[
                    RTCRtpHeaderExtensionParameters(id=x["id"], uri=x["uri"])
                    for x in spec.header_extensions
                ]
            )
        )

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def remote_addr(self) -> Addr:
        return (self.remote_candidate.host, self.remote_candidate.port)

    @property
    def active(self) -> bool:
        return self.stats.activated_at is not None

    def attach(self, muxes: list[IceMux]) -> None:
        """Register the ufrag on every shared socket and claim the relay's flow address."""
        family = ipaddress.ip_address(self.remote_addr[0]).version
        if not any(m.family == family for m in muxes):
            raise ValueError(f"no IPv{family} ICE socket for the call's remote address")
        for mux in muxes:
            port = mux.attach(self.ufrag, _PortProtocol(self))
            self.ports.append(port)
            if mux.family == family:
                # Media from the flow address is routed by source address: claim it
                # now, so the first packets after the relay's flip reach us.
                mux.claim(self.remote_addr, port)

    def start(self) -> None:
        self._spawn(run_agent(self.agent, self.session, f"imported call {self.conn_id}"))
        self._spawn(self._consent_watchdog())

    def activate(self, by: str) -> None:
        """Start sending (the relay flipped ownership, or the client's packets arrive)."""
        if self.active or self.ending:
            return
        self.stats.activated_at = time.time()
        self.stats.activated_by = by
        self._activated_monotonic = time.monotonic()
        self._spawn(self._send_loop())
        if self.data is not None:
            self._spawn(self._activate_data(self.data))
        logger.info("imported call %d activated by %s", self.conn_id, by)

    @property
    def frozen_at(self) -> float | None:
        return self._frozen_at

    def check_exportable(self) -> None:
        pass  # the blocker is checked on the exported state, like any call's

    async def _activate_data(self, data: ImportedDataChannels) -> None:
        # The association first (SACK, retransmissions, what it had queued),
        # then the agent's channels, whose held messages are newer.
        await data.activate()
        for channel in data.channels:
            self.session.attach_channel(channel)

    def freeze(self) -> None:
        if self._frozen_at is None:
            self._frozen_at, self.frozen_monotonic = time.time(), time.monotonic()
        if self.data is not None:
            self.data.freeze()
        self.session.freeze()

    def unfreeze(self) -> None:
        self._frozen_at = self.frozen_monotonic = None
        if self.data is not None:
            self.data.unfreeze()
        self.session.unfreeze()

    async def _closed_by_client(self, reason: str) -> None:
        if self._on_closed_by_client is not None and not self.ending:
            await self._on_closed_by_client(self, reason)

    async def close(self, *, quiet: bool = True) -> None:
        """End; unless `quiet`, the client gets an SCTP ABORT and a DTLS
        close_notify (nothing can be said without the data channels' DTLS)."""
        self.ending = True
        if self.data is not None:
            await self.data.close(quiet=quiet)
        self.session.close()
        self._cancel_tasks()
        for port in self.ports:
            port.close()


    async def _consent_watchdog(self) -> None:
        while True:
            remaining = self._last_consent + self.consent_timeout - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.sleep(remaining)
        logger.info(
            "imported call %d: no consent check for %g s", self.conn_id, self.consent_timeout
        )
        self.consent_expired = True
        await self._on_consent_expired(self)

    # -- inbound -----------------------------------------------------------------------

    def datagram_received(self, port: CallPort, data: bytes, addr: Addr) -> None:
        kind = classify(data)
        if kind is PacketClass.STUN:
            self._stun_received(port, data, addr)
        elif kind is PacketClass.RTP:
            self._srtp_received(data)
        elif kind is PacketClass.DTLS:
            if self.data is not None and self.data.datagram_received(data):
                self.activate("dtls")
            else:
                self.stats.rx_dtls_dropped += 1
        else:
            self.stats.rx_other_dropped += 1

    def _stun_received(self, port: CallPort, data: bytes, addr: Addr) -> None:
        try:
            msg = stun.parse_message(data)  # checks FINGERPRINT when present
        except ValueError:
            self.stats.stun_rejected += 1
            return
        if msg.message_class != stun.Class.REQUEST:
            self.stats.stun_ignored += 1
            return
        # What aioice's Connection.request_received checks (the client is
        # controlling and the pair is nominated: no role conflict to repair).
        if (
            msg.message_method != stun.Method.BINDING
            or msg.attributes.get("USERNAME") != f"{self.ufrag}:{self.spec.ice.remote_ufrag}"
            or not msg.check_message_integrity(self._local_pwd)
        ):
            self.stats.stun_rejected += 1
            return
        response = stun.Message(
            message_method=stun.Method.BINDING,
            message_class=stun.Class.RESPONSE,
            transaction_id=msg.transaction_id,
        )
        response.attributes["XOR-MAPPED-ADDRESS"] = addr
        response.add_message_integrity(self._local_pwd)  # adds FINGERPRINT too
        port.sendto(bytes(response), addr)  # a success response claims addr in the mux
        self.stats.stun_answered += 1
        self._last_consent = time.monotonic()
        if addr != self.remote_addr:
            # The relay rebuilt its flow (new flow port): the latest authenticated
            # source wins, as for the shared socket's address claims.
            logger.info(
                "imported call %d: remote moved %s -> %s", self.conn_id, self.remote_addr, addr
            )
            self.remote_candidate = self.remote_candidate.model_copy(update={"host": addr[0], "port": addr[1]})
        self.activate("stun")

    async def deliver_srtp(self, data: bytes) -> bool:
        return self._srtp_received(data)

    def replies_to(self) -> Addr | None:
        return self.remote_addr

    def repoint(self, old: Addr, new: Addr) -> bool:
        if self.remote_addr != old:
            return False
        self.remote_candidate = self.remote_candidate.model_copy(update={"host": new[0], "port": new[1]})
        family = ipaddress.ip_address(new[0]).version
        for port in self.ports:
            if port.mux.family == family:
                port.mux.claim(new, port)
        logger.info("imported call %d: replies now go to %s (was %s)", self.conn_id, new, old)
        return True

    def _srtp_received(self, data: bytes) -> bool:
        """Unprotect and play one packet; False if it does not authenticate."""
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
                logger.info("imported call %d: the client's stream had wrapped before the switch", self.conn_id)
            except pylibsrtp.Error:
                pass
        if plain is None:
            self.stats.rx_undecryptable += 1
            return False
        self.stats.rx_decrypted += 1
        self.activate("srtp")
        if rtcp:
            if len(plain) >= 8:
                self.rx_rtcp[str(int.from_bytes(plain[4:8], "big"))] += 1
            return True
        try:
            packet = RtpPacket.parse(plain)
        except ValueError:
            self.stats.rx_decode_errors += 1
            return True
        stream = self.rx_streams.get(packet.ssrc)
        if stream is None:
            stream = self.rx_streams[packet.ssrc] = RtpStreamState(
                ssrc=packet.ssrc, payload_type=packet.payload_type
            )
        newer = stream.is_newer(packet.sequence_number)
        stream.update(packet.sequence_number, packet.timestamp, packet.payload_type)
        if not newer:
            self.stats.rx_late += 1  # no jitter buffer: a late packet is skipped
            return True
        decoder = self._decoder(packet.payload_type)
        if decoder is None or not packet.payload:
            return True
        try:
            frames = decoder.decode(JitterFrame(packet.payload, packet.timestamp))
        except (av.FFmpegError, ValueError):
            self.stats.rx_decode_errors += 1
            return True
        for frame in frames:
            self.session.deliver_audio(frame)  # type: ignore[arg-type]
        return True

    def _decoder(self, payload_type: int) -> Decoder | None:
        if payload_type not in self._decoders:
            codec = next((c for c in self.spec.codecs if c.payloadType == payload_type), None)
            try:
                self._decoders[payload_type] = None if codec is None else get_decoder(codec)
            except ValueError:
                self._decoders[payload_type] = None
        return self._decoders[payload_type]

    # -- outbound ----------------------------------------------------------------------

    def _first_timestamp(self) -> int:
        """Continue the old owner's RTP clock: the frame after its last packet,
        plus the time since the freeze (the client hears a pause, no loss)."""
        if self.tx_stream.packets == 0:
            return random.randint(0, U32_MAX)
        elapsed = min(max(time.time() - self.spec.frozen_at, 0.0), MAX_ELAPSED)
        clock = self.codec.clockRate
        return (self.tx_stream.timestamp + round((PACKET_TIME + elapsed) * clock)) & U32_MAX

    async def _send_loop(self) -> None:
        if self.tx_stream.packets == 0:  # the old owner never sent: start like aiortc
            self.tx_stream.seq = random.randint(0, 0xFFFF)
        base = self._first_timestamp()
        track = self.session.out_track
        try:
            while True:
                frame = await track.recv()  # paced 20 ms frames, silence when idle
                level = compute_audio_level_dbov(frame)
                payloads, enc_ts = self._encoder.encode(frame)
                # Encode even while frozen: the RTP clock keeps real time and the
                # encoder state stays continuous for an unfreeze.
                if not payloads or self._frozen_at is not None:
                    continue
                for i, payload in enumerate(payloads):
                    self._send_rtp(
                        payload, (base + enc_ts) & U32_MAX, i == len(payloads) - 1, level
                    )
        except MediaStreamError:
            pass  # the call ended: the session stopped the track
        except Exception:
            logger.exception("imported call %d: sending stopped", self.conn_id)

    def _send_rtp(self, payload: bytes, timestamp: int, marker: bool, level: int) -> None:
        seq = (self.tx_stream.seq + 1) & 0xFFFF if self.tx_stream.packets else self.tx_stream.seq
        packet = RtpPacket(
            payload_type=self.codec.payloadType,
            marker=int(marker),  # as aiortc's sender: the last packet of a frame
            sequence_number=seq,
            timestamp=timestamp,
            ssrc=self.spec.local_ssrc,
            payload=payload,
        )
        packet.extensions.mid = self.spec.mid
        packet.extensions.audio_level = (False, -level)
        data = self._tx.protect(packet.serialize(self._ext_map))
        port = self._port_for(self.remote_addr)
        if port is None:
            return
        port.sendto(data, self.remote_addr)
        self.tx_stream.update(seq, timestamp, self.codec.payloadType)
        self.stats.tx_packets += 1
        if self.stats.first_sent_at is None:
            now = time.monotonic()
            self.stats.first_sent_at = time.time()
            self.stats.import_to_first_sent_s = now - self.stats.imported_monotonic
            self.stats.activate_to_first_sent_s = now - self._activated_monotonic

    def _send_dtls(self, data: bytes) -> None:
        port = self._port_for(self.remote_addr)
        if port is not None:
            port.sendto(data, self.remote_addr)

    def _port_for(self, addr: Addr) -> CallPort | None:
        family = ipaddress.ip_address(addr[0]).version
        return next((p for p in self.ports if p.mux.family == family), None)

    # -- state ---------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "conn_id": self.conn_id,
            "imported": True,
            "connection_state": "connected",  # as far as the client is concerned
            "ice_connection_state": "completed",
            "ice_state": "completed",
            "dtls_state": "not migrated" if self.data is None else "connected",
            "created_at": self.created_at,
            "connected_at": self.connected_at,
            "migration": self.migration_info(),
        }

    def migration_info(self) -> dict[str, Any]:
        stats = dict(vars(self.stats))
        del stats["imported_monotonic"]
        stats.update(
            active=self.active,
            frozen_at=self._frozen_at,
            remote=list(self.remote_addr),
            consent_age_s=round(time.monotonic() - self._last_consent, 3),
            data_channels=None if self.data is None else self.data.info(),
            data_not_carried=self.data_not_carried,
        )
        return stats

    def export_state(self, transceiver_id: int, owner: dict[str, Any], *, include_secrets: bool) -> CallState:
        """The same schema as a placed call's export, so the call can move again."""
        spec = self.spec
        old = spec.state
        port = self._port_for(self.remote_addr)
        host, lport = port.mux.sockname if port is not None else ("0.0.0.0", 0)
        local = Candidate(host=host, port=lport, type="host", priority=candidate_priority(1, "host"),
                          foundation=candidate_foundation("host", "udp", host), component=1, transport="udp")
        ice = IceState(
            local_ufrag=spec.ice.local_ufrag, remote_ufrag=spec.ice.remote_ufrag, role="controlled",
            tie_breaker=spec.ice.tie_breaker, state="completed",
            selected_pair=SelectedPair(local=local, remote=self.remote_candidate),
            local_pwd=spec.ice.local_pwd if include_secrets else None,
            remote_pwd=spec.ice.remote_pwd if include_secrets else None,
        )
        assert old.srtp is not None
        srtp = SrtpState(profile=old.srtp.profile)
        if include_secrets:
            srtp = SrtpState(profile=old.srtp.profile, keying_material=spec.keying_material.hex(),
                             tx_key=spec.tx_key.hex(), rx_key=spec.rx_key.hex())
        tx = {str(self.tx_stream.ssrc): self.tx_stream.to_model()} if self.tx_stream.packets else {}
        record, association, not_carried = None, None, self.data_not_carried
        if self.data is not None:
            record, association, not_carried = self.data.export(include_secrets=include_secrets)
            if association is None:
                record = None
        return CallState(
            transceiver_id=transceiver_id,
            conn_id=self.conn_id,
            created_at=self.created_at,
            connected_at=self.connected_at,
            connection_state="connected",
            owner=OwnerBody(**owner),
            ice=ice,
            dtls=old.dtls.model_copy(update={"state": "connected" if record is not None else "not migrated",
                                             "record": record}),
            srtp=srtp,
            media=[m.model_copy(deep=True) for m in old.media],
            rtp=RtpState(tx=tx, rx={str(s): st.to_model() for s, st in self.rx_streams.items()}),
            # We send no RTCP: the SRTCP index stays where the old owner left it.
            rtcp=RtcpState(tx_srtcp_index=dict(old.rtcp.tx_srtcp_index), rx_packets=dict(self.rx_rtcp)),
            sctp=None if old.sctp is None else old.sctp.model_copy(
                update={"association": association, "not_carried": not_carried}),
            agent=AgentState(session=self.session.export_state(), state=self.agent.export_state()),
            frozen=None if self._frozen_at is None else Frozen(at=self._frozen_at, monotonic=self.frozen_monotonic),
            migrations=old.migrations + 1,
        )
