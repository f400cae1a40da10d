"""Engine calls: the media endpoint of a call taken over in a live migration,
or handed over by this transceiver's aiortc after its handshake.

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
  FINGERPRINT, XOR-MAPPED-ADDRESS. Once sending, we also ask the client
  for consent with checks of our own; consent expires when neither its
  checks nor its answers come for ``consent_timeout`` seconds. An ICE
  restart (:meth:`ImportedCall.restart_ice`) gives the call new credentials
  beside the old ones until the first check with them (ice_credentials).
* **SRTP**: fresh libsrtp sessions from the exported master keys, with
  aiortc's policy (aiortc_hooks.srtp_session), each exported SSRC's stream
  started at its exported rollover counter, so calls move whatever their
  length. A client stream within WRAP_MARGIN of its wrap may have wrapped
  before its first packet reaches us: a second session at the next counter
  takes that packet if the first cannot authenticate it.
* **Media**: the call's SRTP, jitter buffer and Opus run on the
  transceiver's media engine (call_media.CallMedia, one 20 ms clock for all
  calls in media_engine.MediaEngine), feeding the agent (``import_state``
  from the export, or the very agent aiortc ran when this transceiver hands
  a call it placed over to the engine). Outbound RTP keeps the SSRC and
  payload type, sequence numbers continuing from the old owner's last
  packet, timestamps continued by the time elapsed since the freeze. No
  media goes out before :meth:`ImportedCall.activate` (the relay's flip, or
  the first authenticated packet from the client): anything sent earlier
  would be dropped by the relay and show up at the client as a sequence gap.
* **RTCP**: the engine sends the call's sender reports (rtcp_sender) on the
  same SSRC, its SRTCP index going on past the ones the previous owners
  used (``rtcp.tx_srtcp_index`` of the export, and of ours), its packet and
  octet counts going on from the exported stream's (``rtp.tx``), its first
  report block citing the client's last sender report received by the old
  owner (``rtcp.rx_last_sr``); the client's reports feed the call's
  figures and RTT (rtcp_stats). A call that ends here says BYE; one that
  moves on does not.
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
import ipaddress
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aioice.ice
from aioice import stun
from aioice.candidate import candidate_foundation, candidate_priority

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

from .agent import Agent, AgentSession, run_agent
from .call_handle import CallHandle
from .call_media import CallMedia, MediaPlan, since_freeze
from .engine_ice_restart import EngineIceRestart
from .errors import CallStateConflict
from .ice_credentials import Credentials, IceCredentials
from .ice_mux import CallPort, IceMux
from .import_plan import ImportPlan
from .imported_data import ImportedDataChannels
from .media_engine import MediaEngine
from .rtcp_sender import cname_for

logger = logging.getLogger(__name__)

Addr = tuple[str, int]
DEFAULT_CONSENT_TIMEOUT = 30.0  # RFC 7675: consent expires 30 s after the last check
# A check from another address moves the call's replies there when it nominates
# that pair (USE-CANDIDATE) or nothing authentic came from the current one this
# long: a client keeps checking its other pairs (Chromium's ICE-TCP connections
# of both families), and those checks must not take the media along.
PATH_SILENT = 1.0


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
    rx_dtls_dropped: int = 0  # DTLS that did not authenticate, or data channels not carried
    rx_other_dropped: int = 0
    stun_answered: int = 0
    stun_rejected: int = 0  # bad USERNAME / MESSAGE-INTEGRITY / method: not answered
    stun_ignored: int = 0  # responses and indications (e.g. to the old owner's checks)
    consent_checks_sent: int = 0
    consent_checks_answered: int = 0
    checks_elsewhere: int = 0  # answered from another address, the media kept on its path
    ice_restarts_asked: int = 0  # by the relay; completed ones: IceCredentials.restarts


class ImportedCall(EngineIceRestart, CallHandle):
    """A call on the media engine: ICE responder, DTLS records, agent; its media in CallMedia."""

    def __init__(
        self,
        spec: ImportPlan,
        session: AgentSession,
        agent: Agent,
        *,
        engine: MediaEngine,
        consent_timeout: float = DEFAULT_CONSENT_TIMEOUT,
        on_consent_expired: Callable[[ImportedCall], Awaitable[None]],
        on_closed_by_client: Callable[[ImportedCall, str], Awaitable[None]] | None = None,
        handed_over: bool = False,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.conn_id = spec.state.conn_id
        self.ufrag = spec.ice.local_ufrag
        self.session = session
        self.agent = agent
        self.engine = engine
        #: Placed here and handed over by aiortc after its handshake (not migrated in).
        self.handed_over = handed_over
        self.consent_timeout = consent_timeout
        self._on_consent_expired = on_consent_expired
        self.created_at: float = spec.state.created_at
        self.connected_at: float | None = spec.state.connected_at
        self.ports: list[CallPort] = []
        self.remote_candidate = spec.remote_candidate.model_copy()
        self.stats = MigrationStats()
        self.ice = IceCredentials(Credentials(local_ufrag=spec.ice.local_ufrag, local_pwd=spec.ice.local_pwd or "",
                                              remote_ufrag=spec.ice.remote_ufrag or "",
                                              remote_pwd=spec.ice.remote_pwd or ""))
        self._ufrags_used = {self.ufrag}  # every local ufrag the call had: the transceiver frees them at the end
        self.ending = False
        self.consent_expired = False
        self._frozen_at: float | None = None
        self.frozen_monotonic: float | None = None
        self._last_consent = time.monotonic()  # the import counts as the last check
        # The last authentic packet from remote_addr. aiortc's selected pair (a
        # hand-over) is live; a migrated call has heard nothing here yet, so the
        # first authenticated check (the relay's flow after the flip) takes it.
        self._heard_at = time.monotonic() if handed_over else float("-inf")
        self._checks: dict[bytes, bytes] = {}  # our consent checks awaiting an answer -> the password to verify it
        self._reply_addr: Addr | None = None
        self._reply_port: CallPort | None = None
        self.codec = spec.codecs[0]
        self.media = CallMedia(MediaPlan(
            conn_id=self.conn_id, libsrtp_profile=spec.libsrtp_profile, tx_key=spec.tx_key, rx_key=spec.rx_key,
            local_ssrc=spec.local_ssrc, payload_type=self.codec.payloadType, mid=spec.mid,
            header_extensions=spec.header_extensions, tx=spec.tx, rx=spec.rx, frozen_at=spec.frozen_at,
            rtcp_rx=dict(spec.state.rtcp.rx_packets),
            srtcp_used=spec.state.rtcp.tx_srtcp_index.get(str(spec.local_ssrc), 0),
            cname=cname_for(spec.keying_material, spec.local_ssrc)), session, self._send_media,
            complexity=engine.complexity)
        # The client's last SR, as old as it was at the freeze and since: our first report cites it.
        self.media.quality.continue_last_sr(spec.state.rtcp.rx_last_sr, since_freeze(spec.frozen_at))
        # The client's stream's loss and jitter counts go on: its reports see one call.
        self.media.quality.continue_reception(spec.state.rtcp.rx_reception,
                                              {str(s): (st.seq, st.roc) for s, st in spec.rx.items()})
        self._on_closed_by_client = on_closed_by_client
        state = spec.state
        self.data: ImportedDataChannels | None = None
        self.data_not_carried = state.sctp.not_carried if state.sctp is not None else None
        if state.sctp is not None and state.sctp.association is not None:
            if state.dtls.record is None or state.dtls.role is None or state.dtls.cipher is None:
                raise ValueError("dtls.record/role/cipher: missing (the SCTP association needs the DTLS session)")
            self.data = ImportedDataChannels(role=state.dtls.role, cipher=state.dtls.cipher, record=state.dtls.record,
                                             sctp=state.sctp, send=self._send_dtls, on_closed=self._closed_by_client)

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def quality(self):  # its RTCP figures live with its media
        return self.media.quality

    @property
    def remote_candidate(self) -> Candidate:
        return self._remote_candidate

    @remote_candidate.setter
    def remote_candidate(self, candidate: Candidate) -> None:
        self._remote_candidate = candidate
        # Read per packet both ways: a tuple, not two model attribute reads.
        self.remote_addr: Addr = (candidate.host, candidate.port)

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

    def start(self, agent_task: asyncio.Future | None = None) -> None:
        """Run the agent (or adopt `agent_task`, the agent aiortc's call ran),
        the consent watchdog, and the call's media on the engine's clock."""
        if agent_task is None:
            self._spawn(run_agent(self.agent, self.session, f"imported call {self.conn_id}"))
        else:
            self._tasks.adopt(agent_task)
        self._spawn(self._consent_watchdog())
        self.engine.add(self.conn_id, self.media)

    def activate(self, by: str) -> None:
        """Start sending (the relay flipped ownership, or the client's packets arrive)."""
        if self.handed_over and by == "api":
            raise CallStateConflict(f"call {self.conn_id} was not imported (it is sending already)")
        if self.active or self.ending:
            return
        self.stats.activated_at = time.time()
        self.stats.activated_by = by
        self._activated_monotonic = time.monotonic()
        self.media.start_sending()
        self._spawn(self._consent_checks())
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
        data.sctp.on("datachannel", self.session.attach_channel)  # channels the client opens later
        await data.activate()
        for channel in data.channels:
            self.session.attach_channel(channel)
        self.session.unfreeze()  # a handed-over call's session was frozen for the handover

    def freeze(self) -> None:
        if self._frozen_at is None:
            self._frozen_at, self.frozen_monotonic = time.time(), time.monotonic()
        self.media.frozen = True
        if self.data is not None:
            self.data.freeze()
        self.session.freeze()

    def unfreeze(self) -> None:
        self._frozen_at = self.frozen_monotonic = None
        self.media.frozen = False
        if self.data is not None:
            self.data.unfreeze()
        self.session.unfreeze()

    async def _closed_by_client(self, reason: str) -> None:
        if self._on_closed_by_client is not None and not self.ending:
            await self._on_closed_by_client(self, reason)

    async def close(self, *, quiet: bool = True) -> None:
        """End; unless `quiet`, the client gets an RTCP BYE, an SCTP ABORT and
        a DTLS close_notify (the last two need the data channels' DTLS). After
        consent expired nothing is sent (RFC 7675)."""
        self.ending = True
        if not quiet and not self.consent_expired:
            self.media.send_bye()
        self.engine.remove(self.conn_id, self.media)
        if self.data is not None:
            await self.data.close(quiet=quiet)
        self.session.close()
        self._cancel_tasks()
        for port in self.ports:
            port.close()


    def _consent_timeout(self) -> float:
        # A call handed over by aiortc keeps aioice's consent timing (read at
        # run time, as aioice does); a migrated call the transceiver's, which
        # also covers the time before the relay's flip.
        if self.handed_over:
            return aioice.ice.CONSENT_INTERVAL * aioice.ice.CONSENT_FAILURES
        return self.consent_timeout

    async def _consent_watchdog(self) -> None:
        while True:
            remaining = self._last_consent + self._consent_timeout() - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.sleep(remaining)
        logger.info("call %d: no consent for %g s", self.conn_id, self._consent_timeout())
        self.consent_expired = True
        await self._on_consent_expired(self)

    async def _consent_checks(self) -> None:
        """RFC 7675: ask the client for consent to keep sending, at aioice's
        interval (randomised by +-20 %, as RFC 7675 asks); an answer, like a
        check of the client's, refreshes consent."""
        while True:
            await asyncio.sleep(aioice.ice.CONSENT_INTERVAL * (0.8 + 0.4 * random.random()))  # pacing
            port = self._port_for(self.remote_addr)
            if port is None or self._frozen_at is not None:
                continue
            creds = self.ice.current  # the client's new credentials once a restart completed
            check = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
            check.attributes["USERNAME"] = creds.outbound_username
            check.attributes["PRIORITY"] = candidate_priority(1, "host")
            check.attributes["ICE-CONTROLLED"] = self.spec.ice.tie_breaker
            check.add_message_integrity(creds.remote_pwd.encode())
            port.sendto(bytes(check), self.remote_addr)
            self._checks[check.transaction_id] = creds.remote_pwd.encode()
            while len(self._checks) > 8:  # unanswered ones are forgotten
                del self._checks[next(iter(self._checks))]
            self.stats.consent_checks_sent += 1

    # -- inbound -----------------------------------------------------------------------

    def datagram_received(self, port: CallPort, data: bytes, addr: Addr) -> None:
        now = time.monotonic()
        if not self.media.rate.allow(now):
            self.media.stats.rx_over_rate += 1  # a flood: dropped before any crypto
            return
        kind = classify(data)
        if kind is PacketClass.STUN:
            self._stun_received(port, data, addr)
        elif kind is PacketClass.RTP:
            if self._srtp_received(data, now) and addr == self.remote_addr:
                self._heard_at = now
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
            pwd = self._checks.pop(msg.transaction_id, None) if msg.message_class == stun.Class.RESPONSE else None
            if pwd is not None and msg.check_message_integrity(pwd):
                self._last_consent = time.monotonic()
                self.stats.consent_checks_answered += 1
            else:
                self.stats.stun_ignored += 1
            return
        # What aioice's Connection.request_received checks (the client is
        # controlling and the pair is nominated: no role conflict to repair).
        # During an ICE restart the USERNAME names the old or the new credentials.
        creds = self.ice.for_request(msg.attributes.get("USERNAME"))
        if (
            msg.message_method != stun.Method.BINDING
            or creds is None
            or not msg.check_message_integrity(creds.local_pwd.encode())
        ):
            self.stats.stun_rejected += 1
            return
        response = stun.Message(
            message_method=stun.Method.BINDING,
            message_class=stun.Class.RESPONSE,
            transaction_id=msg.transaction_id,
        )
        response.attributes["XOR-MAPPED-ADDRESS"] = addr
        response.add_message_integrity(creds.local_pwd.encode())  # adds FINGERPRINT too
        port.sendto(bytes(response), addr)  # a success response claims addr in the mux
        self.stats.stun_answered += 1
        if creds is self.ice.pending:
            self._restart_completed()
        now = self._last_consent = time.monotonic()
        if addr != self.remote_addr:
            if "USE-CANDIDATE" not in msg.attributes and now - self._heard_at < PATH_SILENT:
                self.stats.checks_elsewhere += 1  # another pair's check: the media stays (PATH_SILENT)
                return
            # Nominated there, or the current path went silent (the relay
            # rebuilt its flow: a new flow port): the replies follow.
            logger.info(
                "imported call %d: remote moved %s -> %s", self.conn_id, self.remote_addr, addr
            )
            self.remote_candidate = self.remote_candidate.model_copy(update={"host": addr[0], "port": addr[1]})
        self._heard_at = now
        self.activate("stun")

    async def deliver_srtp(self, data: bytes) -> bool:
        return self._srtp_received(data, time.monotonic())

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

    def _srtp_received(self, data: bytes, now: float) -> bool:
        """One SRTP/SRTCP packet; False if it does not authenticate."""
        if not self.media.receive(data, now):
            return False
        if self.stats.activated_at is None:
            self.activate("srtp")
        return True

    def _send_media(self, data: bytes) -> None:
        addr = self.remote_addr
        if addr != self._reply_addr:  # looked up once per remote address, not per packet
            self._reply_addr, self._reply_port = addr, self._port_for(addr)
        port = self._reply_port
        if port is None:
            return
        port.sendto(data, addr)
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
            "media_engine": {"carried": True, "handed_over": self.handed_over},
            # The agent's session object: the same one across ICE restarts and a hand-over.
            "agent_session": f"{id(self.session):x}",
            "ice": {"ufrag": self.ufrag, "restarts": self.ice.restarts,
                    "restart_pending": self.ice.pending is not None},
        }

    def migration_info(self) -> dict[str, Any]:
        stats = dict(vars(self.stats))
        del stats["imported_monotonic"]
        stats.update(self.media.info())
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
        creds = self.ice.latest  # after a restart's answer the client holds these (and a new owner needs them)
        port = self._port_for(self.remote_addr)
        host, lport = port.mux.sockname if port is not None else ("0.0.0.0", 0)
        local = Candidate(host=host, port=lport, type="host", priority=candidate_priority(1, "host"),
                          foundation=candidate_foundation("host", "udp", host), component=1, transport="udp")
        ice = IceState(
            local_ufrag=creds.local_ufrag, remote_ufrag=creds.remote_ufrag, role="controlled",
            tie_breaker=spec.ice.tie_breaker, state="completed",
            selected_pair=SelectedPair(local=local, remote=self.remote_candidate),
            local_pwd=creds.local_pwd if include_secrets else None,
            remote_pwd=creds.remote_pwd if include_secrets else None,
        )
        assert old.srtp is not None
        srtp = SrtpState(profile=old.srtp.profile)
        if include_secrets:
            srtp = SrtpState(profile=old.srtp.profile, keying_material=spec.keying_material.hex(),
                             tx_key=spec.tx_key.hex(), rx_key=spec.rx_key.hex())
        tx_stream = self.media.tx_stream
        tx = {str(tx_stream.ssrc): tx_stream.to_model()} if tx_stream.packets else {}
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
            rtp=RtpState(tx=tx, rx={str(s): st.to_model() for s, st in self.media.rx_streams.items()}),
            # Our SRTCP index goes on from the previous owners' (rtcp_sender): the next owner's too.
            rtcp=RtcpState(tx_srtcp_index={**old.rtcp.tx_srtcp_index,
                                           str(self.spec.local_ssrc): self.media.rtcp.srtcp_used},
                           rx_packets=dict(self.media.stats.rtcp), rx_last_sr=self.quality.last_sr_state(),
                           rx_reception=self.quality.reception_state()),
            sctp=None if old.sctp is None else old.sctp.model_copy(
                update={"association": association, "not_carried": not_carried}),
            agent=AgentState(session=self.session.export_state(), state=self.agent.export_state()),
            frozen=None if self._frozen_at is None else Frozen(at=self._frozen_at, monotonic=self.frozen_monotonic),
            # A hand-over from this transceiver's aiortc is not a migration.
            migrations=old.migrations + (0 if self.handed_over else 1),
        )
