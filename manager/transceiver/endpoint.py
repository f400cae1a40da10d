"""Transceiver endpoint: owns every call's WebRTC state (ICE, DTLS, SRTP, lifecycle).

The relay's signaling places a call here with :meth:`Transceiver.create_call`:
the client's offer (candidates stripped), a connection id and the server-side
ICE ufrag that carries the relay's routing hint. We answer with aiortc using
exactly that ufrag, and learn the client only as a peer-reflexive candidate:
its checks arrive from a relay-internal address:port.

Port model: ONE UDP socket per bind address for all calls (see
docs/transceiver.md). aioice opens a socket per ``Connection``; instead each
call's ``Connection`` gets a :class:`aioice.ice.StunProtocol` whose transport is
a :class:`_CallPort` view on the shared :class:`IceMux` socket. The mux routes a
STUN request by the local ufrag in its USERNAME and everything else (STUN
responses, DTLS, SRTP) by the source address, which a call claims when it
answers a check with a success response (i.e. after aioice authenticated it).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from aioice.candidate import Candidate, candidate_foundation, candidate_priority
from aioice.ice import Connection, StunProtocol, validate_username
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc import sdp as aiortc_sdp
from aiortc.rtcconfiguration import RTCBundlePolicy
from aiortc.rtcdtlstransport import SRTP_PROFILES, RTCDtlsTransport
from aiortc.rtcicetransport import RTCIceTransport
from aiortc.rtp import is_rtcp

from manager.protocol.rfc7983 import STUN_REQUEST, STUN_SUCCESS, stun_class, stun_username

from .agent import Agent, AgentFactory, AgentSession, EchoAgent, run_agent
from .migrated import (
    DEFAULT_CONSENT_TIMEOUT,
    ImportSpec,
    MigratedCall,
    RtpStreamState,
    migration_blocker,
)

logger = logging.getLogger(__name__)

Addr = tuple[str, int]

#: A call that is not connected (ICE + DTLS) this long after its answer is dropped:
#: aioice keeps waiting for candidates forever, as end-of-candidates never comes.
DEFAULT_CONNECT_TIMEOUT = 30.0
U32_MAX = 0xFFFFFFFF


# -- errors ----------------------------------------------------------------------------


class TransceiverError(Exception):
    """Base class; ``str(exc)`` is a message fit for an API client."""


class InvalidRequest(TransceiverError):
    """Bad conn_id, ufrag or offer (HTTP 400)."""


class DuplicateCall(TransceiverError):
    """conn_id or ufrag already in use on this transceiver (HTTP 409)."""


class CapacityExceeded(TransceiverError):
    """The transceiver already carries ``capacity`` calls (HTTP 503)."""


class UnknownCall(TransceiverError):
    """No such conn_id (HTTP 404)."""


class CallStateConflict(TransceiverError):
    """The call's state does not allow this operation now (HTTP 409), e.g. an
    export of a call that is not connected or cannot be migrated."""


# -- shared ICE socket --------------------------------------------------------------------


class _CallPort(asyncio.DatagramTransport):
    """One call's view of the shared socket, handed to aioice as its transport."""

    def __init__(self, mux: IceMux, ufrag: str, protocol: StunProtocol) -> None:
        super().__init__()
        self.mux = mux
        self.ufrag = ufrag
        self.protocol = protocol
        self.addrs: set[Addr] = set()
        self._closing = False
        #: Drop everything this call sends (it was released after a migration:
        #: its DTLS close_notify, SCTP ABORT and consent checks must not go out).
        self.muted = False

    def sendto(self, data: bytes, addr: Addr | None = None) -> None:  # type: ignore[override]
        if self._closing or self.muted or addr is None or self.mux.transport is None:
            return
        addr = (addr[0], addr[1])
        # Claim the source address only when this call's ICE agent answers a
        # check with success or sends its own check: both happen only after
        # aioice verified MESSAGE-INTEGRITY with this call's password. Error
        # responses (400/401 to a forged check) claim nothing.
        if addr not in self.addrs and stun_class(data) in (STUN_REQUEST, STUN_SUCCESS):
            self.mux.claim(addr, self)
        self.mux.transport.sendto(data, addr)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.mux.detach(self)
        # StunProtocol.close() waits for connection_lost, as for a real socket.
        asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self._closing

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname":
            return self.mux.sockname
        return default  # notably no "socket": the shared one is not the call's to tune


class IceMux(asyncio.DatagramProtocol):
    """A UDP socket shared by all calls, demultiplexing to each call's aioice protocol."""

    def __init__(self, bind_addr: str) -> None:
        self.bind_addr = bind_addr
        self.transport: asyncio.DatagramTransport | None = None
        self.sockname: Addr = (bind_addr, 0)
        self._by_ufrag: dict[str, _CallPort] = {}
        self._by_addr: dict[Addr, _CallPort] = {}
        self.stats: Counter[str] = Counter()

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.bind_addr).version

    async def open(self, port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=(self.bind_addr, port))
        assert self.transport is not None
        sockname = self.transport.get_extra_info("sockname")
        self.sockname = (sockname[0], sockname[1])

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def attach(self, ufrag: str, protocol: StunProtocol) -> _CallPort:
        if ufrag in self._by_ufrag:
            raise DuplicateCall(f"ufrag {ufrag!r} is already in use")
        port = _CallPort(self, ufrag, protocol)
        self._by_ufrag[ufrag] = port
        protocol.connection_made(port)
        return port

    def detach(self, port: _CallPort) -> None:
        if self._by_ufrag.get(port.ufrag) is port:
            del self._by_ufrag[port.ufrag]
        for addr in port.addrs:
            if self._by_addr.get(addr) is port:
                del self._by_addr[addr]
        port.addrs.clear()

    def claim(self, addr: Addr, port: _CallPort) -> None:
        previous = self._by_addr.get(addr)
        if previous is not None and previous is not port:
            # The relay reused a flow port for another call: the newest
            # authenticated owner wins.
            previous.addrs.discard(addr)
            logger.info("ICE source %s moved from ufrag %s to %s", addr, previous.ufrag, port.ufrag)
        self._by_addr[addr] = port
        port.addrs.add(addr)

    def route(self, data: bytes, addr: Addr) -> _CallPort | None:
        """Pick the call a datagram belongs to, or None to drop it."""
        if stun_class(data) == STUN_REQUEST:
            # A check names its target in USERNAME "<our ufrag>:<theirs>"; that
            # beats the source address (a reused flow port, an ICE restart).
            username = stun_username(data)
            if username is None:
                self.stats["drop_stun_no_username"] += 1
                return None
            port = self._by_ufrag.get(username.partition(":")[0])
            if port is None:
                self.stats["drop_unknown_ufrag"] += 1
            return port
        port = self._by_addr.get(addr)
        if port is None:
            self.stats["drop_unknown_source"] += 1
        return port

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        addr = (addr[0], addr[1])  # IPv6 four-tuple to two-tuple, as aioice does
        port = self.route(data, addr)
        if port is None:
            return
        self.stats["rx"] += 1
        port.protocol.datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.stats["socket_errors"] += 1
        logger.debug("ICE socket %s: %s", self.sockname, exc)


# -- per-call media/crypto state capture ---------------------------------------------------


@dataclass
class SrtpKeys:
    profile: str  # OpenSSL name, e.g. "SRTP_AEAD_AES_128_GCM"
    keying_material: bytes  # RFC 5764 EXTRACTOR-dtls_srtp output
    tx_key: bytes  # master key || master salt we protect with
    rx_key: bytes  # master key || master salt we unprotect with


class MediaTap:
    """Observes one DTLS transport to capture what a migration must carry.

    aiortc exposes none of this, so three per-instance wrappers are installed
    on the call's :class:`RTCDtlsTransport` (instance attributes shadow the
    methods, only this call is affected):

    * ``_setup_srtp``: aiortc derives the SRTP master keys there right after the
      handshake and keeps them only inside libsrtp sessions. After it ran we ask
      the same OpenSSL connection for the same exporter output
      (``export_keying_material``, deterministic for a session) and split it
      with aiortc's own profile table and role rule, so the keys are exactly
      the ones the sessions hold.
    * ``_send_rtp``: plaintext RTP/RTCP right before protection: tx SSRC,
      sequence, timestamp, ROC, SRTCP index.
    * ``_handle_rtp_data`` / ``_handle_rtcp_data``: plaintext after
      unprotection: the same for rx.

    The ``_send_rtp`` wrapper also implements the migration *freeze*: while
    frozen, outgoing RTP/RTCP is dropped before protection (so neither a
    sequence number the client sees nor an SRTCP index is used up), and
    :meth:`unfreeze` renumbers the packets that follow so the client sees no
    sequence gap (only a timestamp jump, like a pause in speech).
    """

    def __init__(self) -> None:
        self.srtp: SrtpKeys | None = None
        self.dtls_version: str | None = None
        self.dtls_cipher: str | None = None
        self.tx: dict[int, RtpStreamState] = {}
        self.rx: dict[int, RtpStreamState] = {}
        self.tx_rtcp: Counter[int] = Counter()  # per sender SSRC = next SRTCP index
        self.rx_rtcp: Counter[int] = Counter()
        self.frozen_at: float | None = None  # wall clock of the freeze (for the new owner)
        self.frozen_monotonic: float | None = None
        self.frozen_dropped = 0  # RTP + RTCP packets not sent while frozen
        self._seq_shift: Counter[int] = Counter()  # per tx SSRC: RTP packets dropped frozen

    @property
    def frozen(self) -> bool:
        return self.frozen_at is not None

    def freeze(self) -> None:
        if self.frozen_at is None:
            self.frozen_at, self.frozen_monotonic = time.time(), time.monotonic()

    def unfreeze(self) -> None:
        self.frozen_at = self.frozen_monotonic = None

    def install(self, dtls: RTCDtlsTransport) -> None:
        orig_setup = dtls._setup_srtp
        orig_send = dtls._send_rtp
        orig_rtp = dtls._handle_rtp_data
        orig_rtcp = dtls._handle_rtcp_data

        def setup_srtp() -> None:
            orig_setup()
            if dtls._rx_srtp is not None and dtls._ssl is not None:
                self._capture_keys(dtls)

        async def send_rtp(data: bytes) -> None:
            if self.frozen_at is not None:
                self._drop_frozen(data)
                return
            data = self._renumber(data)
            await orig_send(data)  # raises if not connected: nothing was protected
            self._observe(data, self.tx, self.tx_rtcp)

        async def handle_rtp_data(data: bytes, arrival_time_ms: int) -> None:
            self._observe(data, self.rx, self.rx_rtcp)
            await orig_rtp(data, arrival_time_ms)

        async def handle_rtcp_data(data: bytes) -> None:
            self._observe(data, self.rx, self.rx_rtcp)
            await orig_rtcp(data)

        dtls._setup_srtp = setup_srtp  # type: ignore[method-assign]
        dtls._send_rtp = send_rtp  # type: ignore[method-assign]
        dtls._handle_rtp_data = handle_rtp_data  # type: ignore[method-assign]
        dtls._handle_rtcp_data = handle_rtcp_data  # type: ignore[method-assign]

    def _capture_keys(self, dtls: RTCDtlsTransport) -> None:
        ssl = dtls._ssl
        assert ssl is not None
        name = ssl.get_selected_srtp_profile()
        profile = next((p for p in SRTP_PROFILES if p.openssl_profile == name), None)
        if profile is None:
            return
        material = ssl.export_keying_material(
            b"EXTRACTOR-dtls_srtp", 2 * (profile.key_length + profile.salt_length)
        )
        # RFC 5764 4.2: the client's keys come first; aiortc's role rule.
        tx_idx, rx_idx = (1, 0) if dtls._role == "server" else (0, 1)
        self.srtp = SrtpKeys(
            profile=name.decode(),
            keying_material=bytes(material),
            tx_key=profile.get_key_and_salt(material, tx_idx),
            rx_key=profile.get_key_and_salt(material, rx_idx),
        )
        self.dtls_version = ssl.get_protocol_version_name()
        self.dtls_cipher = ssl.get_cipher_name()

    def _drop_frozen(self, data: bytes) -> None:
        self.frozen_dropped += 1
        if len(data) >= 12 and not is_rtcp(data):
            self._seq_shift[int.from_bytes(data[8:12], "big")] += 1

    def _renumber(self, data: bytes) -> bytes:
        # aiortc's sender numbered the packets dropped while frozen too; close
        # that gap. (Audio gets no NACK retransmissions from aiortc, whose
        # history is keyed by its own numbers.)
        if not self._seq_shift or len(data) < 12 or is_rtcp(data):
            return data
        shift = self._seq_shift.get(int.from_bytes(data[8:12], "big"), 0)
        if not shift:
            return data
        seq = (int.from_bytes(data[2:4], "big") - shift) & 0xFFFF
        return data[:2] + seq.to_bytes(2, "big") + data[4:]

    @staticmethod
    def _observe(data: bytes, streams: dict[int, RtpStreamState], rtcp: Counter[int]) -> None:
        if len(data) < 12:
            return
        if is_rtcp(data):
            rtcp[int.from_bytes(data[4:8], "big")] += 1
            return
        ssrc = int.from_bytes(data[8:12], "big")
        pt = data[1] & 0x7F
        stream = streams.get(ssrc)
        if stream is None:
            stream = streams[ssrc] = RtpStreamState(ssrc=ssrc, payload_type=pt)
        stream.update(int.from_bytes(data[2:4], "big"), int.from_bytes(data[4:8], "big"), pt)

    def export(self, include_secrets: bool) -> dict[str, Any]:
        srtp: dict[str, Any] | None = None
        if self.srtp is not None:
            srtp = {"profile": self.srtp.profile}
            if include_secrets:
                srtp.update(
                    keying_material=self.srtp.keying_material.hex(),
                    tx_key=self.srtp.tx_key.hex(),
                    rx_key=self.srtp.rx_key.hex(),
                )
        return {
            "srtp": srtp,
            "rtp": {
                "tx": {str(s): st.to_dict() for s, st in self.tx.items()},
                "rx": {str(s): st.to_dict() for s, st in self.rx.items()},
            },
            "rtcp": {
                "tx_srtcp_index": {str(s): n for s, n in self.tx_rtcp.items()},
                "rx_packets": {str(s): n for s, n in self.rx_rtcp.items()},
            },
        }


# -- calls ------------------------------------------------------------------------------


@dataclass
class Call:
    conn_id: int
    ufrag: str
    pc: RTCPeerConnection
    session: AgentSession
    agent: Agent
    ice: RTCIceTransport
    dtls: RTCDtlsTransport
    tap: MediaTap
    ports: list[_CallPort]
    offer: aiortc_sdp.SessionDescription
    answer: aiortc_sdp.SessionDescription
    created_at: float = field(default_factory=time.time)
    connected_at: float | None = None
    agent_task: asyncio.Task[None] | None = None
    timeout_task: asyncio.Task[None] | None = None
    candidates_stripped: int = 0
    consent_expired: bool = False
    ending: bool = False

    @property
    def connection(self) -> Connection:
        return self.ice._connection


def _strip_offer_candidates(offer_sdp: str) -> tuple[str, int]:
    """Drop candidate and end-of-candidates lines the relay should have removed.

    A candidate would let this transceiver reach the client directly, around
    the relay; end-of-candidates with no candidate makes aioice fail ICE at once
    instead of waiting for the peer-reflexive candidate.
    """
    lines = offer_sdp.replace("\r\n", "\n").split("\n")
    kept = [line for line in lines if not line.startswith(("a=candidate:", "a=end-of-candidates"))]
    return "\r\n".join(kept), len(lines) - len(kept)


def _validate_offer(offer_sdp: str) -> aiortc_sdp.SessionDescription:
    try:
        desc = aiortc_sdp.SessionDescription.parse(offer_sdp)
    except Exception as exc:  # noqa: BLE001 - aiortc's parser raises whatever the bad line triggers
        raise InvalidRequest(f"offer is not valid SDP: {type(exc).__name__}: {exc}") from None
    if not desc.media:
        raise InvalidRequest("offer has no media section")
    mids = [m.rtp.muxId for m in desc.media]
    for m in desc.media:
        if m.kind not in ("audio", "video", "application"):
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


def _candidate_dict(c: Candidate) -> dict[str, Any]:
    return {
        "host": c.host,
        "port": c.port,
        "type": c.type,
        "priority": c.priority,
        "foundation": c.foundation,
        "component": c.component,
        "transport": c.transport,
    }


class Transceiver:
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
        #: Called with (conn_id, reason) when a call ends, whatever the cause.
        self.on_call_ended: list[Callable[[int, str], None]] = []
        self.ended: deque[dict[str, Any]] = deque(maxlen=100)
        self._muxes: list[IceMux] = []
        self._calls: dict[int, Call | MigratedCall] = {}
        self._reserved: set[int] = set()
        self._ufrags: set[str] = set()
        self._started = False
        self._stopping = False

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
        await asyncio.gather(
            *(self._end_call(c, "transceiver stopping") for c in list(self._calls.values()))
        )
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
            "capacity": self.capacity,
            "calls": len(self._calls),
            "owner": self.owner,
            "demux": dict(demux),
            "migration": {
                "frozen": sorted(c.conn_id for c in calls if self._frozen_at(c) is not None),
                "imported": {
                    str(c.conn_id): c.info() for c in calls if isinstance(c, MigratedCall)
                },
            },
        }

    def _get(self, conn_id: int) -> Call | MigratedCall:
        call = self._calls.get(conn_id)
        if call is None:
            raise UnknownCall(f"no call with conn_id {conn_id}")
        return call

    @staticmethod
    def _frozen_at(call: Call | MigratedCall) -> float | None:
        return call.tap.frozen_at if isinstance(call, Call) else call.frozen_at

    def call_info(self, conn_id: int) -> dict[str, Any]:
        """Live state of a call, without secrets."""
        call = self._get(conn_id)
        if isinstance(call, MigratedCall):
            return {
                "conn_id": conn_id,
                "imported": True,
                "connection_state": "connected",  # as far as the client is concerned
                "ice_connection_state": "completed",
                "ice_state": "completed",
                "dtls_state": "not migrated",
                "created_at": call.created_at,
                "connected_at": call.connected_at,
                "migration": call.info(),
                "export": self.export_call_state(conn_id, include_secrets=False),
            }
        return {
            "conn_id": conn_id,
            "imported": False,
            "connection_state": call.pc.connectionState,
            "ice_connection_state": call.pc.iceConnectionState,
            "ice_state": call.ice.state,
            "dtls_state": call.dtls.state,
            "created_at": call.created_at,
            "connected_at": call.connected_at,
            "migration": {
                "frozen_at": call.tap.frozen_at,
                "frozen_dropped": call.tap.frozen_dropped,
            },
            "export": self.export_call_state(conn_id, include_secrets=False),
        }

    # -- calls ------------------------------------------------------------------------

    async def create_call(
        self, conn_id: int, ufrag: str, offer_sdp: str
    ) -> tuple[str, dict[str, Any]]:
        """Answer ``offer_sdp`` as call ``conn_id`` with local ICE ufrag ``ufrag``.

        Returns ``(answer_sdp, owner)``; raises :class:`InvalidRequest`,
        :class:`DuplicateCall` or :class:`CapacityExceeded`.
        """
        if isinstance(conn_id, bool) or not isinstance(conn_id, int) or not 0 <= conn_id <= U32_MAX:
            raise InvalidRequest("conn_id must be an integer in 0..4294967295")
        if not isinstance(ufrag, str):
            raise InvalidRequest("ufrag must be a string")
        try:
            validate_username(ufrag)  # aioice's own rule: 4..256 ice-chars
        except ValueError:
            raise InvalidRequest("ufrag must be 4 to 256 ICE characters [A-Za-z0-9+/]") from None
        if not isinstance(offer_sdp, str) or not offer_sdp.strip():
            raise InvalidRequest("offer must be a non-empty SDP string")
        if self._stopping:
            raise CapacityExceeded("transceiver is stopping")
        if conn_id in self._calls or conn_id in self._reserved:
            raise DuplicateCall(f"conn_id {conn_id} already has a call")
        if ufrag in self._ufrags:
            raise DuplicateCall(f"ufrag {ufrag!r} is already in use")
        if len(self._calls) + len(self._reserved) >= self.capacity:
            raise CapacityExceeded(f"at capacity ({self.capacity} calls)")
        offer_sdp, stripped = _strip_offer_candidates(offer_sdp)
        offer = _validate_offer(offer_sdp)

        # Reserve before the first await so concurrent duplicates are caught.
        self._reserved.add(conn_id)
        self._ufrags.add(ufrag)
        pc: RTCPeerConnection | None = None
        session: AgentSession | None = None
        try:
            await self.start()
            session = AgentSession(conn_id)
            # No STUN/TURN server: the only useful candidate is the host one on
            # the shared socket, the relay advertises its public address.
            pc = RTCPeerConnection(
                RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
            )
            call = await self._negotiate(pc, session, conn_id, ufrag, offer_sdp, offer)
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

        # aioice's consent loop (RFC 7675) only returns when consent expired
        # (it closes the Connection itself; on our close it is cancelled), so
        # wrapping it tells a vanished client apart from a hang-up. connect()
        # starts it as a task via self.query_consent, hence the instance hook.
        orig_consent = call.connection.query_consent

        async def query_consent() -> None:
            await orig_consent()
            call.consent_expired = True

        call.connection.query_consent = query_consent  # type: ignore[method-assign]

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            state = pc.connectionState
            if state == "connected" and call.connected_at is None:
                call.connected_at = time.time()
                if call.timeout_task is not None:
                    call.timeout_task.cancel()
                logger.info("call %d connected via %s", conn_id, self._selected_remote(call))
            elif state in ("failed", "closed"):
                await self._end_call(call, self._end_reason(call, state))

        call.agent_task = asyncio.ensure_future(run_agent(call.agent, call.session, f"call {call.conn_id}"))
        call.timeout_task = asyncio.ensure_future(self._connect_watchdog(call))
        assert pc.localDescription is not None
        return pc.localDescription.sdp, self.owner

    async def _negotiate(
        self,
        pc: RTCPeerConnection,
        session: AgentSession,
        conn_id: int,
        ufrag: str,
        offer_sdp: str,
        offer: aiortc_sdp.SessionDescription,
    ) -> Call:
        @pc.on("track")
        def on_track(track: Any) -> None:
            session.attach_track(track)  # first audio track only, see AgentSession

        @pc.on("datachannel")
        def on_datachannel(channel: Any) -> None:
            session.attach_channel(channel)

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as exc:  # noqa: BLE001 - aiortc reports bad offers with assorted types
            raise InvalidRequest(f"offer rejected: {exc}") from None

        # Send our audio on the first audio m-line; switch other media off
        # (nobody would read them and aiortc would queue their frames forever).
        audio_done = False
        for t in pc.getTransceivers():
            if t.kind == "audio" and not audio_done:
                pc.addTrack(session.out_track)
                audio_done = True
            else:
                t.direction = "inactive"

        dtls_transports = {t.receiver.transport for t in pc.getTransceivers()}
        if pc.sctp is not None:
            dtls_transports.add(pc.sctp.transport)
        if len(dtls_transports) != 1:
            raise InvalidRequest("offer must bundle all media on one transport")
        dtls = dtls_transports.pop()
        ice = dtls.transport
        connection = ice.iceGatherer._connection

        # Local ICE ufrag hook. aiortc creates the RTCIceGatherer (and its aioice
        # Connection, where the ufrag lives as `local_username`) inside
        # setRemoteDescription with a random ufrag, and only reads it back in
        # setLocalDescription (gather + add_transport_description). Between the
        # two, the gatherer has not gathered and nothing has used the ufrag, so
        # we replace it on this one Connection: no global patching, aiortc and
        # aioice then use it for the answer, for checking incoming USERNAMEs and
        # for building our own checks. aioice exposes it read-only (set at
        # construction), hence the private attribute; create_call
        # already checked the value with aioice's own validate_username.
        connection._local_username = ufrag

        # Shared-socket hook. aioice's gather_candidates() asks
        # get_component_candidates() for host candidates, which would bind a
        # new socket per call. This per-instance replacement attaches the call
        # to each shared IceMux instead and returns the host candidate(s) on it.
        ports: list[_CallPort] = []

        async def shared_candidates(
            component: int, addresses: list[str], timeout: int = 5
        ) -> list[Candidate]:
            candidates = []
            for mux in self._muxes:
                protocol = StunProtocol(connection)
                ports.append(mux.attach(ufrag, protocol))
                host, port = mux.sockname
                protocol.local_candidate = Candidate(
                    foundation=candidate_foundation("host", "udp", host),
                    component=component,
                    transport="udp",
                    priority=candidate_priority(component, "host"),
                    host=host,
                    port=port,
                    type="host",
                )
                connection._protocols.append(protocol)  # what pairing iterates over
                candidates.append(protocol.local_candidate)
            return candidates

        connection.get_component_candidates = shared_candidates  # type: ignore[method-assign]

        tap = MediaTap()
        tap.install(dtls)

        # The offer was accepted above; a failure from here on is ours, not the client's.
        await pc.setLocalDescription(await pc.createAnswer())
        assert pc.localDescription is not None
        answer_desc = aiortc_sdp.SessionDescription.parse(pc.localDescription.sdp)

        agent = self.agent_factory()
        return Call(
            conn_id=conn_id,
            ufrag=ufrag,
            pc=pc,
            session=session,
            agent=agent,
            ice=ice,
            dtls=dtls,
            tap=tap,
            ports=ports,
            offer=offer,
            answer=answer_desc,
        )

    @staticmethod
    def _end_reason(call: Call, state: str) -> str:
        if call.consent_expired:
            return "ICE consent expired"
        if call.ice.state == "failed":
            return "ICE failed"
        if call.dtls.state == "failed":
            return "DTLS failed"
        if state == "closed":
            # We did not initiate it (close_call marks the call ending first):
            # the client's DTLS close_notify shut the transport down.
            return "client hung up"
        return "connection failed"


    async def _connect_watchdog(self, call: Call) -> None:
        await asyncio.sleep(self.connect_timeout)
        if call.connected_at is None:
            await self._end_call(call, f"not connected within {self.connect_timeout:g} s")

    async def close_call(self, conn_id: int, reason: str = "closed by control API") -> None:
        """Hang up call ``conn_id`` (DTLS close_notify to the client); raises :class:`UnknownCall`.

        An imported call has no DTLS session, so it just stops (the client
        notices by consent failure or silence).
        """
        await self._end_call(self._get(conn_id), reason)

    async def _end_call(
        self, call: Call | MigratedCall, reason: str, *, quiet: bool = False
    ) -> None:
        if call.ending:
            return
        call.ending = True
        # Forget it first, so the heartbeat stops listing it right away.
        self._calls.pop(call.conn_id, None)
        self._ufrags.discard(call.ufrag)
        if isinstance(call, MigratedCall):
            await call.close()
        else:
            await self._close_peer(call, quiet)
        self.ended.append({"conn_id": call.conn_id, "reason": reason, "ended_at": time.time()})
        logger.info("call %d ended: %s", call.conn_id, reason)
        for callback in list(self.on_call_ended):
            try:
                callback(call.conn_id, reason)
            except Exception:
                logger.exception("on_call_ended callback failed")

    async def _close_peer(self, call: Call, quiet: bool) -> None:
        if quiet:
            # Released after a migration: the client now talks to the new owner,
            # so no DTLS close_notify, SCTP ABORT or consent check may go out.
            for port in call.ports:
                port.muted = True
        call.session.close()
        for task in (call.agent_task, call.timeout_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        try:
            await call.pc.close()
        except Exception:
            logger.exception("closing call %d", call.conn_id)
        for port in call.ports:  # normally done by aioice's Connection.close()
            port.close()

    # -- live migration ----------------------------------------------------------------

    def export_call(self, conn_id: int, *, freeze: bool = False) -> dict[str, Any]:
        """State for a new owner (with secrets); with ``freeze``, stop sending RTP/RTCP now.

        A frozen call keeps receiving and answering ICE checks; its state
        carries the last sequence number/timestamp sent and the freeze time.
        Raises :class:`UnknownCall`, or :class:`CallStateConflict` when the
        call is not connected or cannot be migrated (see :func:`migration_blocker`).
        """
        call = self._get(conn_id)
        if isinstance(call, Call) and (
            call.pc.connectionState != "connected" or call.tap.srtp is None
        ):
            raise CallStateConflict(
                f"call {conn_id} is not connected (state {call.pc.connectionState}); "
                "only a connected call can be exported"
            )
        problem = migration_blocker(self.export_call_state(conn_id))
        if problem is not None:
            raise CallStateConflict(f"call {conn_id} cannot be migrated: {problem}")
        if freeze:
            if isinstance(call, Call):
                call.tap.freeze()
            else:
                call.freeze()
            logger.info("call %d frozen for migration", conn_id)
        return self.export_call_state(conn_id)

    def unfreeze_call(self, conn_id: int) -> None:
        """Resume sending after a failed migration (no-op if not frozen)."""
        call = self._get(conn_id)
        if isinstance(call, Call):
            call.tap.unfreeze()
        else:
            call.unfreeze()
        logger.info("call %d unfrozen", conn_id)

    async def release_call(self, conn_id: int) -> None:
        """Drop a call that now belongs to another transceiver, sending nothing to the client."""
        await self._end_call(self._get(conn_id), "released after migration", quiet=True)

    async def import_call(self, conn_id: int, state: Any) -> dict[str, Any]:
        """Take over a call exported by another transceiver; returns the owner address.

        Afterwards the call answers the client's consent checks and decrypts
        its media, but sends no media until :meth:`activate_call` or the first
        authenticated packet from the client. Raises :class:`InvalidRequest`
        (bad state), :class:`DuplicateCall` or :class:`CapacityExceeded`.
        """
        if isinstance(conn_id, bool) or not isinstance(conn_id, int) or not 0 <= conn_id <= U32_MAX:
            raise InvalidRequest("conn_id must be an integer in 0..4294967295")
        if self._stopping:
            raise CapacityExceeded("transceiver is stopping")
        await self.start()
        if conn_id in self._calls or conn_id in self._reserved:
            raise DuplicateCall(f"conn_id {conn_id} already has a call")
        try:
            spec = ImportSpec.parse(state)
        except ValueError as exc:
            raise InvalidRequest(f"state rejected: {exc}") from None
        if spec.conn_id != conn_id:
            raise InvalidRequest(f"state is for conn_id {spec.conn_id}, not {conn_id}")
        if spec.local_ufrag in self._ufrags:
            raise DuplicateCall(f"ufrag {spec.local_ufrag!r} is already in use")
        if len(self._calls) + len(self._reserved) >= self.capacity:
            raise CapacityExceeded(f"at capacity ({self.capacity} calls)")

        session = AgentSession(conn_id)
        session.import_state(spec.session_state)
        agent = self.agent_factory()
        try:
            agent.import_state(spec.agent_state)
        except Exception as exc:  # noqa: BLE001 - the agent's own validation
            raise InvalidRequest(f"agent state rejected: {exc}") from None

        async def consent_expired(c: MigratedCall) -> None:
            await self._end_call(c, "ICE consent expired")

        try:
            call = MigratedCall(
                spec,
                session,
                agent,
                consent_timeout=self.consent_timeout,
                on_consent_expired=consent_expired,
            )
            call.attach(self._muxes)
        except ValueError as exc:
            session.close()
            raise InvalidRequest(f"state rejected: {exc}") from None
        self._calls[conn_id] = call
        self._ufrags.add(call.ufrag)
        call.start()
        logger.info("call %d imported (from transceiver %s)", conn_id, state.get("transceiver_id"))
        return self.owner

    def activate_call(self, conn_id: int) -> None:
        """The relay flipped ownership: an imported call starts sending now (idempotent)."""
        call = self._get(conn_id)
        if not isinstance(call, MigratedCall):
            raise CallStateConflict(f"call {conn_id} was not imported (it is sending already)")
        call.activate("api")

    # -- state export -------------------------------------------------------------------

    @staticmethod
    def _selected_pair(call: Call) -> Any:
        # aioice keeps the nominated pair per component in a private dict; there
        # is no public accessor (aiortc uses rtcp-mux: component 1 only).
        return call.connection._nominated.get(1)

    def _selected_remote(self, call: Call) -> Addr | None:
        pair = self._selected_pair(call)
        return pair.remote_addr if pair is not None else None

    def export_call_state(self, conn_id: int, *, include_secrets: bool = True) -> dict[str, Any]:
        """JSON-serialisable state a new owner needs to take the call over.

        Secrets (ICE passwords, DTLS exporter output, SRTP master keys+salts)
        are hex/str; ``include_secrets=False`` leaves them out.
        """
        call = self._get(conn_id)
        if isinstance(call, MigratedCall):
            return call.export(self.id, self.owner, include_secrets)
        conn = call.connection
        pair = self._selected_pair(call)
        ice: dict[str, Any] = {
            "local_ufrag": conn.local_username,
            "remote_ufrag": conn.remote_username,
            "role": "controlling" if conn.ice_controlling else "controlled",
            "tie_breaker": conn._tie_breaker,
            "state": call.ice.state,
            "selected_pair": None
            if pair is None
            else {
                "local": _candidate_dict(pair.local_candidate),
                "remote": _candidate_dict(pair.remote_candidate),
            },
        }
        if include_secrets:
            ice["local_pwd"] = conn.local_password
            ice["remote_pwd"] = conn.remote_password

        remote_fps = [
            {"algorithm": f.algorithm, "value": f.value}
            for m in call.offer.media[:1]
            if m.dtls is not None
            for f in m.dtls.fingerprints
        ]
        media = []
        for t in call.pc.getTransceivers():
            sender = t.sender
            media.append(
                {
                    "mid": t.mid,
                    "kind": t.kind,
                    "direction": t.currentDirection,
                    "local_ssrc": sender._ssrc,  # aiortc picks it at random, no public getter
                    "local_rtx_ssrc": sender._rtx_ssrc,
                    "codecs": [
                        {
                            "mime_type": c.mimeType,
                            "clock_rate": c.clockRate,
                            "channels": c.channels,
                            "payload_type": c.payloadType,
                            "parameters": dict(c.parameters),
                        }
                        for c in t._codecs
                    ],
                    "remote_ssrcs": sorted(
                        {s.ssrc for m in call.offer.media if m.rtp.muxId == t.mid for s in m.ssrc}
                    ),
                    "header_extensions": [{"id": x.id, "uri": x.uri} for x in t._headerExtensions],
                }
            )
        tapped = call.tap.export(include_secrets)
        sctp = call.pc.sctp
        state: dict[str, Any] = {
            "version": 1,
            "transceiver_id": self.id,
            "conn_id": conn_id,
            "created_at": call.created_at,
            "connected_at": call.connected_at,
            "connection_state": call.pc.connectionState,
            "owner": self.owner,
            "ice": ice,
            "dtls": {
                "role": call.dtls._role,
                "state": call.dtls.state,
                "version": call.tap.dtls_version,
                "cipher": call.tap.dtls_cipher,
                "local_fingerprints": [
                    {"algorithm": f.algorithm, "value": f.value}
                    for f in call.dtls.getLocalParameters().fingerprints
                ],
                "remote_fingerprints": remote_fps,
                "srtp_profile": tapped["srtp"]["profile"] if tapped["srtp"] else None,
            },
            "srtp": tapped["srtp"],
            "media": media,
            "rtp": tapped["rtp"],
            "rtcp": tapped["rtcp"],
            "sctp": None
            if sctp is None
            else {"mid": sctp.mid, "state": sctp.state, "port": sctp.port},
            "agent": {"session": call.session.export_state(), "state": call.agent.export_state()},
            "frozen": None
            if call.tap.frozen_at is None
            else {"at": call.tap.frozen_at, "monotonic": call.tap.frozen_monotonic},
            "migrations": 0,  # times this call was imported (an imported call counts on)
        }
        return state
