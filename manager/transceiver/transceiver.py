"""The transceiver: owns every call's WebRTC state (ICE, DTLS, SRTP, lifecycle).

The relay's signaling places a call here with :meth:`Transceiver.create_call`:
the client's offer (candidates stripped), a connection id and the server-side
ICE ufrag that carries the relay's routing hint. We answer with aiortc using
exactly that ufrag (webrtc_call.py); a migration imports calls exported by
another transceiver (imported_call.py). Both kinds are CallHandles: this
module never asks which kind a call is.

Port model: ONE UDP socket per bind address for all calls (ice_mux.py,
docs/transceiver.md).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Self

from aioice.ice import validate_username
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.rtcconfiguration import RTCBundlePolicy

from manager.observability import tracing
from manager.observability.logs import bind_call
from manager.protocol.log_budget import LogBudget
from manager.protocol.tasks import TaskSet
from manager.protocol.ufrag import HintKeys, UfragError, decode_ufrag, is_ice_ufrag

from . import runtime
from .agent import AgentFactory, AgentSession, EchoAgent
from .call_handle import CallHandle
from .call_migration import CallMigration, check_conn_id
from .errors import CapacityExceeded, DuplicateCall, InvalidRequest, UnknownCall
from .ice_mux import Addr, IceMux
from .import_plan import ImportPlan
from .imported_call import DEFAULT_CONSENT_TIMEOUT, ImportedCall
from .media_engine import MediaEngine
from .opus import DEFAULT_COMPLEXITY
from .rtcp_stats import EndedFigures
from .webrtc_call import WebRtcCall, strip_offer_candidates, validate_offer

logger = logging.getLogger(__name__)
# A refused media check is one line per spoofed packet a relay passes on.
_refusal_log = LogBudget(logger)

#: A call that is not connected (ICE + DTLS) this long after its answer is dropped:
#: aioice keeps waiting for candidates forever, as end-of-candidates never comes.
DEFAULT_CONNECT_TIMEOUT = 30.0
#: A migration freeze lasts at most this long without a release or unfreeze.
DEFAULT_FREEZE_LEASE = 5.0
#: How long a connected call may take to become exportable (its SCTP
#: association established, its data channels open) before it stays on aiortc.
HANDOVER_TIMEOUT = 10.0


def _figures(call: CallHandle) -> dict[str, Any]:
    return {**call.quality.figures(), "created_at": call.created_at, "connected_at": call.connected_at}


class Transceiver(CallMigration):
    """Programmatic transceiver: one aiortc RTCPeerConnection per call, one shared ICE port.

    :param transceiver_id: id registered with the relay manager.
    :param capacity: maximum number of simultaneous calls.
    :param agent_factory: builds one :class:`Agent` per call.
    :param bind_addrs: concrete IPv4 and/or IPv6 addresses for the shared ICE
        socket(s); each becomes a host candidate of every call.
    :param ice_port: UDP port for all those sockets (0: one ephemeral port,
        the same for every family when possible).
    :param connect_timeout: seconds a call may stay unconnected before it is dropped.
    :param consent_timeout: seconds an imported call lives without a consent
        check from the client (calls placed here use aioice's own consent logic).
    :param media_engine: hand each call placed here to the media engine right
        after its handshake (docs/media-engine.md); False keeps them on aiortc.
        Imported calls always run on the engine.
    :param opus_complexity: the engine's Opus encoder complexity (0-10).
    :param aiortc_audio_buffer: calls on aiortc keep aiortc's audio jitter
        buffer (4 frames held, 80 ms); False hands each frame to the agent
        as it arrives.
    """

    def __init__(
        self,
        transceiver_id: int,
        *,
        capacity: int,
        agent_factory: AgentFactory = EchoAgent,
        bind_addrs: Sequence[str] = ("127.0.0.1",),
        ice_port: int = 0,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        consent_timeout: float = DEFAULT_CONSENT_TIMEOUT,
        hint_key: HintKeys | Callable[[], HintKeys] | None = None,
        freeze_lease: float = DEFAULT_FREEZE_LEASE,
        media_engine: bool = True,
        opus_complexity: int = DEFAULT_COMPLEXITY,
        aiortc_audio_buffer: bool = False,
    ) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        if not bind_addrs:
            raise ValueError("at least one bind address is needed for the ICE socket")
        seen_families: set[int] = set()
        for addr in bind_addrs:
            try:
                ip = ipaddress.ip_address(addr)
            except ValueError:
                raise ValueError(f"bind address {addr!r} is not an IP address") from None
            if ip.is_unspecified:
                # The bound address is advertised as the host candidate and
                # reported to the relay as the owner address.
                raise ValueError(f"bind address {addr} is unspecified; give a concrete address")
            if ip.version in seen_families:
                raise ValueError(f"more than one IPv{ip.version} bind address given")
            seen_families.add(ip.version)
        if not 0 <= ice_port <= 65535:
            raise ValueError("ice_port must be in 0..65535")
        self.id = transceiver_id
        self.capacity = capacity
        self.agent_factory = agent_factory
        self.bind_addrs = list(bind_addrs)
        self.ice_port = ice_port
        self.connect_timeout = connect_timeout
        self.consent_timeout = consent_timeout
        # The relay's routing-hint key: every call asked of us must carry a
        # ufrag the relay minted for this transceiver and connection id. None
        # (in-process tests only) accepts any ufrag; the service always sets it.
        self.hint_key = hint_key
        # A frozen call resumes by itself after this long unless it is
        # released (it moved) or unfrozen: a relayd that died mid-migration
        # must not leave it muted.
        self.freeze_lease = freeze_lease
        self.aiortc_audio_buffer = aiortc_audio_buffer
        self._leases: dict[int, asyncio.Task[None]] = {}
        self.engine = MediaEngine(complexity=opus_complexity, handover=media_engine)
        self._handovers = TaskSet(f"transceiver {transceiver_id}: hand-over to the media engine")
        self.leases_expired = 0
        # Relays' media checks of packets from new client addresses, by outcome.
        self.media_checks: Counter[str] = Counter()
        self.ended_figures = EndedFigures()  # RTCP figures of calls that ended here, for relayd
        #: Called with (conn_id, reason) when a call ends, whatever the cause.
        self.on_call_ended: list[Callable[[int, str], None]] = []
        self._muxes: list[IceMux] = []
        self._calls: dict[int, CallHandle] = {}
        self._reserved: set[int] = set()
        self._ufrags: set[str] = set()
        self._started = False
        self._stopping = False
        self.draining = False  # leaving: takes no new call (manager.transceiver.drain)

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the shared ICE socket(s). Idempotent."""
        if self._started:
            return
        self._stopping = False
        port = self.ice_port
        try:
            for addr in self.bind_addrs:
                mux = IceMux(addr)
                try:
                    await mux.open(port)
                except OSError as exc:
                    if self.ice_port or exc.errno != errno.EADDRINUSE:
                        raise
                    await mux.open(0)  # our ephemeral v4 port is taken in v6: any port will do
                self._muxes.append(mux)
                port = port or mux.sockname[1]  # same port for the other family, if free
        except OSError as exc:
            for mux in self._muxes:
                mux.close()
            self._muxes.clear()
            raise OSError(
                exc.errno, f"cannot bind the ICE socket on {addr} port {port}: {exc.strerror}"
            ) from None
        self._started = True
        logger.info("transceiver %d: ICE on %s", self.id, [m.sockname for m in self._muxes])

    async def stop(self) -> None:
        """End every call and close the ICE sockets."""
        self._stopping = True
        await self._handovers.close()  # no call moves while they end
        await asyncio.gather(
            *(self._end_call(c, "transceiver stopping") for c in list(self._calls.values()))
        )
        await self.engine.stop()
        for mux in self._muxes:
            mux.close()
        self._muxes.clear()
        self._started = False

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- queries ----------------------------------------------------------------------

    @property
    def owner(self) -> dict[str, Any]:
        """Where the relay sends every call's packets: the shared ICE socket(s)."""
        owner: dict[str, Any] = {"addr4": None, "port4": 0, "addr6": None, "port6": 0}
        for mux in self._muxes:
            suffix = "4" if mux.family == 4 else "6"
            owner["addr" + suffix], owner["port" + suffix] = mux.sockname
        return owner

    def calls(self) -> list[int]:
        """Connection ids of the live calls (what the heartbeat reports)."""
        return sorted(self._calls)

    @property
    def healthy(self) -> bool:
        return (
            self._started
            and not self._stopping
            and all(m.transport is not None for m in self._muxes)
        )

    def health(self) -> dict[str, Any]:
        demux: Counter[str] = Counter()
        for mux in self._muxes:
            demux.update(mux.stats)
        calls = list(self._calls.values())
        return {
            "id": self.id,
            "healthy": self.healthy,
            "draining": self.draining,
            "capacity": self.capacity,
            "calls": len(self._calls),
            "owner": self.owner,
            "demux": dict(demux),
            "media_checks": dict(self.media_checks),
            "media_engine": self.engine.info(),
            "runtime": runtime.info(),
            "migration": {
                "frozen": sorted(c.conn_id for c in calls if c.frozen_at is not None),
                "leases_expired": self.leases_expired,
                "imported": {
                    str(c.conn_id): info for c in calls if (info := c.migration_info()) is not None
                },
            },
        }

    def _get(self, conn_id: int) -> CallHandle:
        call = self._calls.get(conn_id)
        if call is None:
            raise UnknownCall(f"no call with conn_id {conn_id}")
        return call

    def agent_session(self, conn_id: int) -> AgentSession:
        """The call's agent session (its sideband events go through it)."""
        return self._get(conn_id).session

    def call_quality(self, conn_id: int) -> dict[str, Any]:
        """A call's RTCP figures (rtcp_stats), live or of a call that ended here lately."""
        call = self._calls.get(conn_id)
        if call is not None:
            return {**_figures(call), "ended": False}
        ended = self.ended_figures.get(conn_id)
        if ended is None:
            raise UnknownCall(f"no call with conn_id {conn_id}, live or ended lately")
        return ended

    def call_info(self, conn_id: int) -> dict[str, Any]:
        """Live state of a call, without secrets."""
        call = self._get(conn_id)
        return {**call.info(), "export": self.export_call_state(conn_id, include_secrets=False)}

    # -- calls ------------------------------------------------------------------------

    async def create_call(self, conn_id: int, ufrag: str, offer_sdp: str, *,
                          session: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Answer ``offer_sdp`` as call ``conn_id`` with local ICE ufrag ``ufrag``;
        ``session`` (the client's session JSON) becomes the agent's ``AgentSession.config``.

        Returns ``(answer_sdp, owner)``; raises :class:`InvalidRequest`,
        :class:`DuplicateCall` or :class:`CapacityExceeded`.
        """
        check_conn_id(conn_id)
        bind_call(conn_id=conn_id)  # the call's tasks, started below, carry it too
        if not isinstance(ufrag, str):
            raise InvalidRequest("ufrag must be a string")
        try:
            validate_username(ufrag)  # aioice's own rule: 4..256 ice-chars
        except ValueError:
            raise InvalidRequest("ufrag must be 4 to 256 ICE characters [A-Za-z0-9+/]") from None
        if not isinstance(offer_sdp, str) or not offer_sdp.strip():
            raise InvalidRequest("offer must be a non-empty SDP string")
        self._check_hint(ufrag, conn_id, placed_here=True)
        self._check_room(conn_id, ufrag)
        offer_sdp, stripped = strip_offer_candidates(offer_sdp)
        offer = validate_offer(offer_sdp)

        # Reserve before the first await so concurrent duplicates are caught.
        self._reserved.add(conn_id)
        self._ufrags.add(ufrag)
        pc: RTCPeerConnection | None = None
        session_config, session = session, None
        try:
            await self.start()
            session = AgentSession(conn_id, config=session_config)
            # No STUN/TURN server: the only useful candidate is the host one on
            # the shared socket, the relay advertises its public address.
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE))
            call = await WebRtcCall.negotiate(conn_id=conn_id, ufrag=ufrag, offer_sdp=offer_sdp, offer=offer,
                                              pc=pc, session=session, agent=self.agent_factory(),
                                              muxes=self._muxes, audio_on_arrival=not self.aiortc_audio_buffer)
            call.candidates_stripped = stripped
        except BaseException:
            self._reserved.discard(conn_id)
            self._ufrags.discard(ufrag)
            if session is not None:
                session.close()
            if pc is not None:
                await pc.close()
            raise
        self._reserved.discard(conn_id)
        self._calls[conn_id] = call
        call.start(connect_timeout=self.connect_timeout, on_end=self._end_call, on_connected=self._connected)
        tracing.follow("transceiver.connect", "connect", conn_id, conn_id=conn_id, transceiver_id=self.id)
        return call.answer_sdp, self.owner

    # -- the media engine -------------------------------------------------------------

    def _connected(self, call: WebRtcCall) -> None:
        tracing.advance("connect", call.conn_id, None)
        if self.engine.handover:
            self._start_handover(call)

    def _start_handover(self, call: WebRtcCall) -> None:
        self._handovers.spawn(self._hand_over(call))

    async def _hand_over(self, call: WebRtcCall) -> None:
        """Move a call placed here onto the media engine once it is exportable,
        as a migration from this transceiver to itself: one established-call
        path. A call that cannot move stays on aiortc and says why
        (``media_engine.why`` in its info)."""
        bind_call(conn_id=call.conn_id)
        deadline = time.monotonic() + HANDOVER_TIMEOUT
        while (blocker := call.handover_blocker()) is not None:
            settling, why = blocker
            if not settling or time.monotonic() > deadline or self._calls.get(call.conn_id) is not call:
                call.engine_refused = why
                logger.info("call %d stays on aiortc: %s", call.conn_id, why)
                return
            await asyncio.sleep(0.05)  # pacing: a poll until the SCTP association settles
        # From the freeze to the new call's registration nothing awaits: no
        # packet reaches either call in between.
        call.freeze()
        try:
            plan = ImportPlan.from_state(call.export_state(self.id, self.owner, include_secrets=True))
        except ValueError as exc:
            call.unfreeze()
            call.engine_refused = str(exc)
            logger.info("call %d stays on aiortc: %s", call.conn_id, exc)
            return
        agent_task, held = call.hand_over()
        try:
            new = self._engine_call(plan, call.session, call.agent, handed_over=True)
            new.media.play_held(held)
        except (ValueError, InvalidRequest) as exc:
            logger.error("call %d: the media engine could not take it after the hand-over: %s", call.conn_id, exc)
            call.session.close()
            self._calls.pop(call.conn_id, None)
            self._ufrags.discard(call.ufrag)
            await call.close(quiet=False)
            return
        self._calls[call.conn_id] = new
        new.media.quality.carry_on(call.quality)
        new.start(agent_task=agent_task)
        new.activate("handover")
        logger.info("call %d handed over to the media engine", call.conn_id)
        await call.close(quiet=True)

    def _engine_call(self, plan: ImportPlan, session: AgentSession, agent: Any, *,
                     handed_over: bool = False) -> ImportedCall:
        """An engine call from `plan`, attached to the shared sockets (ValueError if it cannot be)."""

        async def consent_expired(c: ImportedCall) -> None:
            await self._end_call(c, "ICE consent expired")

        call = ImportedCall(plan, session, agent, engine=self.engine, consent_timeout=self.consent_timeout,
                            on_consent_expired=consent_expired,
                            on_closed_by_client=lambda c, reason: self._end_call(c, reason), handed_over=handed_over)
        call.attach(self._muxes)
        return call

    def _check_hint(self, ufrag: str, conn_id: int, *, placed_here: bool) -> None:
        if self.hint_key is None:
            return
        # A key ring file is followed as it changes (a rotation: manager.pki.KeyRingFile).
        keys = self.hint_key() if callable(self.hint_key) else self.hint_key
        try:
            hint = decode_ufrag(keys, ufrag)
        except UfragError as exc:
            raise InvalidRequest(f"ufrag carries no valid routing hint: {exc}") from None
        if hint.conn_id != conn_id:
            raise InvalidRequest(f"ufrag routes to conn_id {hint.conn_id}, not {conn_id}")
        if placed_here and hint.transceiver_id != self.id:
            raise InvalidRequest(f"ufrag routes to transceiver {hint.transceiver_id}, not {self.id}")

    def _check_room(self, conn_id: int, ufrag: str) -> None:
        if self._stopping or self.draining:
            raise CapacityExceeded(f"transceiver is {'stopping' if self._stopping else 'draining'}")
        if conn_id in self._calls or conn_id in self._reserved:
            raise DuplicateCall(f"conn_id {conn_id} already has a call")
        if ufrag in self._ufrags:
            raise DuplicateCall(f"ufrag {ufrag!r} is already in use")
        if len(self._calls) + len(self._reserved) >= self.capacity:
            raise CapacityExceeded(f"at capacity ({self.capacity} calls)")

    async def close_call(self, conn_id: int, reason: str = "closed by control API") -> None:
        """Hang up call ``conn_id``; raises :class:`UnknownCall`. The client
        gets an SCTP ABORT and a DTLS close_notify (an imported call whose data
        channels did not move has no DTLS session: it just stops, and the
        client notices by consent or silence)."""
        await self._end_call(self._get(conn_id), reason)

    async def _end_call(self, call: CallHandle, reason: str, *, quiet: bool = False) -> None:
        if call.ending:
            return
        call.ending = True
        # Forget it first, so the heartbeat stops listing it right away.
        self._calls.pop(call.conn_id, None)
        self._ufrags.difference_update(call.all_ufrags())
        self._stop_lease(call.conn_id)
        await call.close(quiet=quiet)
        tracing.drop("connect", call.conn_id, reason)  # never connected
        self.ended_figures.add(call.conn_id, _figures(call), reason)  # relayd reads them after the end
        logger.info("call %d ended: %s", call.conn_id, reason, extra={"conn_id": call.conn_id})
        for callback in list(self.on_call_ended):
            try:
                callback(call.conn_id, reason)
            except Exception:
                logger.exception("on_call_ended callback failed")

    def restart_ice(self, conn_id: int, ufrag: str, remote_ufrag: str, remote_pwd: str) -> dict[str, str]:
        """An ICE restart the relay asks for: `ufrag` is the new local ufrag it
        minted (its routing hint names this call), `remote_*` the client's new
        credentials. Returns the call's new local credentials for the answer.
        Raises InvalidRequest, UnknownCall, DuplicateCall or CallStateConflict
        (a call that cannot restart: on aiortc, or frozen)."""
        call = self._get(conn_id)
        bind_call(conn_id=conn_id)
        for name, value in (("ufrag", ufrag), ("remote_ufrag", remote_ufrag)):
            if not isinstance(value, str) or not is_ice_ufrag(value):
                raise InvalidRequest(f"{name} must be 4 to 256 ICE characters [A-Za-z0-9+/]")
        if not isinstance(remote_pwd, str) or not 22 <= len(remote_pwd) <= 256 or not is_ice_ufrag(remote_pwd):
            raise InvalidRequest("remote_pwd must be 22 to 256 ICE characters [A-Za-z0-9+/] (RFC 8445)")
        # The hint's transceiver id names the call's first owner, which a migration may have left.
        self._check_hint(ufrag, conn_id, placed_here=False)
        if ufrag in self._ufrags:
            raise DuplicateCall(f"ufrag {ufrag!r} is already in use")
        pwd = call.restart_ice(ufrag, remote_ufrag, remote_pwd)
        self._ufrags.add(ufrag)
        return {"ufrag": ufrag, "pwd": pwd}

    async def check_media(self, conn_id: int, packet: bytes, path: tuple[Addr, Addr] | None = None) -> bool:
        """The relay holds this SRTP packet from a client address it does not
        know yet (a NAT rebinding, or a relay taking a call over): True if it
        authenticates as the call's client, and then the call has taken it as
        its media. With `path` (old, new flow source) an authentic packet also
        moves the call's replies to the new source."""
        call = self._get(conn_id)
        authentic = await call.deliver_srtp(packet)
        self.media_checks["authentic" if authentic else "refused"] += 1
        if not authentic:
            _refusal_log.log(logging.INFO, conn_id, "call %d: a packet the relay held from a new client address "
                             "did not authenticate", conn_id)
        elif path is not None:
            call.repoint(*path)
        return authentic

    def repoint_call(self, conn_id: int, old: Addr | None, new: Addr) -> bool:
        """A relay took over a client tuple after the call answered a check
        from the relay's flow source `new`: replies go there from now on.
        Only an address the call itself claimed (by answering a check it
        authenticated with its ICE password) is accepted. `old` None: from
        wherever the call replies now."""
        call = self._get(conn_id)
        if not any(new in port.addrs for port in call.ports):
            raise InvalidRequest(f"call {conn_id} has not authenticated a check from {new[0]}:{new[1]}")
        if call.replies_to() == new:
            # Already there: an engine call follows the client's authenticated checks itself.
            return True
        if old is None:  # wherever it replies now (a relay's new ICE-TCP connection)
            old = call.replies_to()
            if old is None:
                return False
        return call.repoint(old, new)
