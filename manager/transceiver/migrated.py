"""Imported calls: the media endpoint of a call taken over in a live migration.

The old owner exports a connected call (``Transceiver.export_call``) and stops
sending (freeze); this transceiver imports the state and becomes a media
endpoint for the call *without* aiortc: no ICE agent, no DTLS handshake, no
SDP. The client keeps its ICE, DTLS and SRTP state and notices nothing:

* **ICE**: the call's exported local ufrag is registered on the shared
  :class:`~manager.transceiver.endpoint.IceMux` sockets, and the exported
  selected pair's remote address (the relay's flow port) is claimed, so the
  relay's packets for this call reach us as soon as it flips ownership. We
  answer the client's binding requests (RFC 7675 consent freshness) like the
  old owner's aioice did: MESSAGE-INTEGRITY with the exported local password,
  FINGERPRINT, XOR-MAPPED-ADDRESS. We send no checks of our own; consent
  expires when the client's checks stop for ``consent_timeout`` seconds.
* **SRTP**: fresh libsrtp sessions from the exported master keys (rx for the
  client's SRTP/SRTCP, tx for ours). libsrtp starts a fresh stream at
  rollover counter 0 and pylibsrtp 1.0 cannot set it, so only calls whose
  sequence numbers have not wrapped can move (:func:`migration_blocker`).
* **Media**: the client's packets are decoded with aiortc's codec classes and
  fed to a new agent (``import_state`` from the export). The agent's paced
  outbound track is encoded into RTP with the same SSRC and payload type,
  sequence numbers continuing from the old owner's last packet, timestamps
  continued by the time elapsed since the freeze. No media goes out before
  :meth:`MigratedCall.activate` (the relay's flip, or the first authenticated
  packet from the client): anything sent earlier would be dropped by the
  relay and show up at the client as a sequence gap.
* **DTLS / data channels**: the DTLS record layer and the SCTP association
  cannot be exported with pyOpenSSL, so DTLS datagrams are dropped (counted).

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
from typing import TYPE_CHECKING, Any

import av
import pylibsrtp
from aioice import stun
from aioice.candidate import candidate_foundation, candidate_priority
from aioice.ice import validate_username
from aiortc.codecs import get_decoder, get_encoder
from aiortc.codecs.base import Decoder, Encoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcdtlstransport import SRTP_PROFILES
from aiortc.rtcrtpparameters import (
    RTCRtpCodecParameters,
    RTCRtpHeaderExtensionParameters,
    RTCRtpParameters,
)
from aiortc.rtp import HeaderExtensionsMap, RtpPacket, compute_audio_level_dbov, is_rtcp

from manager.protocol.rfc7983 import PacketClass, classify

from .agent import Agent, AgentSession, run_agent

if TYPE_CHECKING:
    from .endpoint import IceMux, _CallPort

logger = logging.getLogger(__name__)

Addr = tuple[str, int]
U32_MAX = 0xFFFFFFFF
STATE_VERSION = 1
DEFAULT_CONSENT_TIMEOUT = 30.0  # RFC 7675: consent expires 30 s after the last check
#: A call whose sequence number is this close to 65535 is not exported: the
#: new owner's fresh libsrtp session would see the wrap as rollover counter 0
#: (about 10 s of packets at 50 packets/s; a retry a little later succeeds).
WRAP_MARGIN = 500
#: Cap on the freeze-to-first-packet time used to continue RTP timestamps
#: (clocks of two machines that disagree wildly must not make a huge jump).
MAX_ELAPSED = 60.0
PACKET_TIME = 0.020  # outbound audio is paced in 20 ms frames (agent.py)


# -- per-SSRC RTP state ----------------------------------------------------------------


@dataclass
class RtpStreamState:
    """What a new owner needs to continue (tx) or accept (rx) one SSRC's RTP stream."""

    ssrc: int
    payload_type: int
    seq: int = 0  # highest sequence number seen
    timestamp: int = 0  # RTP timestamp of that packet
    roc: int = 0  # SRTP rollover counter (RFC 3711 3.3.1), counts seq wraps
    packets: int = 0

    def is_newer(self, seq: int) -> bool:
        """Whether ``seq`` is after the highest one seen (modulo 2^16)."""
        return self.packets == 0 or 0 < ((seq - self.seq) & 0xFFFF) < 0x8000

    def update(self, seq: int, timestamp: int, payload_type: int) -> None:
        if self.packets == 0:
            self.seq, self.timestamp = seq, timestamp
        elif self.is_newer(seq):  # else duplicate/reordered
            if seq < self.seq:
                self.roc = (self.roc + 1) & U32_MAX
            self.seq, self.timestamp = seq, timestamp
        self.payload_type = payload_type
        self.packets += 1

    def to_dict(self) -> dict[str, int]:
        return {
            "ssrc": self.ssrc,
            "payload_type": self.payload_type,
            "seq": self.seq,
            "timestamp": self.timestamp,
            "roc": self.roc,
            "packets": self.packets,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str) -> RtpStreamState:
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be an object")
        values = {}
        for key, limit in (
            ("ssrc", U32_MAX),
            ("payload_type", 127),
            ("seq", 0xFFFF),
            ("timestamp", U32_MAX),
            ("roc", U32_MAX),
            ("packets", 2**63),
        ):
            v = d.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= limit:
                raise ValueError(f"{where}.{key} must be an integer in 0..{limit}")
            values[key] = v
        return cls(**values)


def migration_blocker(state: dict[str, Any]) -> str | None:
    """Why an exported call cannot move to a fresh libsrtp session, or None.

    pylibsrtp 1.0 has no call to set a stream's rollover counter: a new
    owner's session starts every SSRC at ROC 0, which is right only while
    the sequence numbers have not wrapped (and will not wrap before the new
    owner's first packet).
    """
    if not state.get("srtp") or "tx_key" not in state["srtp"]:
        return "the call has no SRTP keys yet (DTLS not finished)"
    for direction in ("tx", "rx"):
        for ssrc, st in state["rtp"][direction].items():
            if st["roc"] > 0:
                return (
                    f"{direction} SSRC {ssrc} has an SRTP rollover counter of {st['roc']} "
                    "(its sequence number wrapped); pylibsrtp 1.0 cannot start a session "
                    "at a rollover counter > 0, so this call cannot be migrated"
                )
            if st["packets"] and 0xFFFF - st["seq"] < WRAP_MARGIN:
                return (
                    f"{direction} SSRC {ssrc} sequence number {st['seq']} is about to wrap "
                    "(the new owner's SRTP session would get the rollover counter wrong); "
                    "retry in a few seconds"
                )
    return None


# -- the imported state ------------------------------------------------------------------


def _get(state: Any, path: str, kind: type | tuple[type, ...]) -> Any:
    cur = state
    for key in path.split("."):
        if not isinstance(cur, dict) or key not in cur:
            raise ValueError(f"state.{path} is missing")
        cur = cur[key]
    if not isinstance(cur, kind) or (isinstance(cur, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ValueError(f"state.{path} must be of type {names}")
    return cur


def _hex(state: Any, path: str) -> bytes:
    try:
        return bytes.fromhex(_get(state, path, str))
    except ValueError as exc:
        if "missing" in str(exc) or "type" in str(exc):
            raise
        raise ValueError(f"state.{path} is not hex") from None


@dataclass
class ImportSpec:
    """An exported call state, validated (``parse`` raises ValueError with a clear message)."""

    conn_id: int
    local_ufrag: str
    local_pwd: str
    remote_ufrag: str
    remote_pwd: str
    tie_breaker: int
    remote_candidate: dict[str, Any]
    srtp_profile: str
    libsrtp_profile: int
    keying_material: bytes
    tx_key: bytes
    rx_key: bytes
    mid: str | None
    local_ssrc: int
    codecs: list[RTCRtpCodecParameters]  # audio, the first is what we send (aiortc's rule)
    header_extensions: list[dict[str, Any]]
    tx: RtpStreamState | None
    rx: dict[int, RtpStreamState]
    tx_srtcp_index: dict[str, int]
    rx_rtcp: dict[str, int]
    frozen_at: float  # wall clock of the old owner's freeze
    session_state: dict[str, Any]
    agent_state: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)  # informational parts passed on at re-export

    @property
    def remote_addr(self) -> Addr:
        return (self.remote_candidate["host"], self.remote_candidate["port"])

    @classmethod
    def parse(cls, state: Any) -> ImportSpec:
        if not isinstance(state, dict):
            raise ValueError("state must be a JSON object")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state.version must be {STATE_VERSION}")
        conn_id = _get(state, "conn_id", int)
        ufrags = {}
        for name in ("local_ufrag", "local_pwd", "remote_ufrag", "remote_pwd"):
            ufrags[name] = _get(state, f"ice.{name}", str)
        for name in ("local_ufrag", "remote_ufrag"):
            try:
                validate_username(ufrags[name])
            except ValueError:
                raise ValueError(f"state.ice.{name} is not a valid ICE ufrag") from None
        tie_breaker = _get(state, "ice.tie_breaker", int)
        remote = dict(_get(state, "ice.selected_pair.remote", dict))
        host, port = remote.get("host"), remote.get("port")
        try:
            remote["host"] = str(ipaddress.ip_address(host))  # type: ignore[arg-type]
        except ValueError:
            raise ValueError("state.ice.selected_pair.remote.host must be an IP address") from None
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
            raise ValueError("state.ice.selected_pair.remote.port must be in 1..65535")

        profile_name = _get(state, "srtp.profile", str)
        profile = next(
            (p for p in SRTP_PROFILES if p.openssl_profile.decode() == profile_name), None
        )
        if profile is None:
            raise ValueError(f"state.srtp.profile {profile_name!r} is not supported")
        tx_key, rx_key = _hex(state, "srtp.tx_key"), _hex(state, "srtp.rx_key")
        for name, key in (("tx_key", tx_key), ("rx_key", rx_key)):
            if len(key) != profile.key_length + profile.salt_length:
                raise ValueError(f"state.srtp.{name} has the wrong length for {profile_name}")
        keying_material = _hex(state, "srtp.keying_material")

        media = _get(state, "media", list)
        audio = next((m for m in media if isinstance(m, dict) and m.get("kind") == "audio"), None)
        if audio is None:
            raise ValueError("state.media has no audio section")
        local_ssrc = audio.get("local_ssrc")
        if isinstance(local_ssrc, bool) or not isinstance(local_ssrc, int):
            raise ValueError("state.media[audio].local_ssrc must be an integer")
        codecs = []
        for c in audio.get("codecs") or []:
            try:
                codecs.append(
                    RTCRtpCodecParameters(
                        mimeType=str(c["mime_type"]),
                        clockRate=int(c["clock_rate"]),
                        channels=c.get("channels"),
                        payloadType=int(c["payload_type"]),
                        parameters=dict(c.get("parameters") or {}),
                    )
                )
            except (KeyError, TypeError, ValueError):
                raise ValueError(
                    "state.media[audio].codecs entries need mime_type, clock_rate, payload_type"
                ) from None
        if not codecs:
            raise ValueError("state.media[audio].codecs is empty")
        try:
            get_encoder(codecs[0])
        except ValueError:
            raise ValueError(f"no encoder for the call's codec {codecs[0].mimeType}") from None
        header_extensions = [
            {"id": int(x["id"]), "uri": str(x["uri"])}
            for x in audio.get("header_extensions") or []
            if isinstance(x, dict) and "id" in x and "uri" in x
        ]

        rtp_tx = _get(state, "rtp.tx", dict)
        rtp_rx = _get(state, "rtp.rx", dict)
        tx = rtp_tx.get(str(local_ssrc))
        tx_state = (
            None if tx is None else RtpStreamState.from_dict(tx, f"state.rtp.tx.{local_ssrc}")
        )
        rx_states = {
            st.ssrc: st
            for st in (RtpStreamState.from_dict(v, f"state.rtp.rx.{k}") for k, v in rtp_rx.items())
        }
        problem = migration_blocker(state)
        if problem is not None:
            raise ValueError(problem)
        rtcp = state.get("rtcp") or {}
        frozen = state.get("frozen")
        frozen_at = frozen.get("at") if isinstance(frozen, dict) else None
        if frozen_at is None:
            # Without the freeze the old owner may still be sending: our packets
            # would reuse its sequence numbers.
            raise ValueError('state was exported without freeze (export with {"freeze": true})')
        if isinstance(frozen_at, bool) or not isinstance(frozen_at, (int, float)):
            raise ValueError("state.frozen.at must be a number (wall-clock seconds)")
        agent = state.get("agent") or {}
        return cls(
            conn_id=conn_id,
            local_ufrag=ufrags["local_ufrag"],
            local_pwd=ufrags["local_pwd"],
            remote_ufrag=ufrags["remote_ufrag"],
            remote_pwd=ufrags["remote_pwd"],
            tie_breaker=tie_breaker,
            remote_candidate=remote,
            srtp_profile=profile_name,
            libsrtp_profile=profile.libsrtp_profile,
            keying_material=keying_material,
            tx_key=tx_key,
            rx_key=rx_key,
            mid=audio.get("mid"),
            local_ssrc=local_ssrc,
            codecs=codecs,
            header_extensions=header_extensions,
            tx=tx_state,
            rx=rx_states,
            tx_srtcp_index=dict(rtcp.get("tx_srtcp_index") or {}),
            rx_rtcp=dict(rtcp.get("rx_packets") or {}),
            frozen_at=float(frozen_at),
            session_state=dict(agent.get("session") or {}),
            agent_state=dict(agent.get("state") or {}),
            raw=state,
        )


# -- the imported call -----------------------------------------------------------------------


class _PortProtocol(asyncio.DatagramProtocol):
    """What the IceMux hands this call's datagrams to, one per shared socket."""

    def __init__(self, call: MigratedCall) -> None:
        self.call = call
        self.port: _CallPort | None = None

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
    rx_dtls_dropped: int = 0  # DTLS state is not migrated
    rx_other_dropped: int = 0
    stun_answered: int = 0
    stun_rejected: int = 0  # bad USERNAME / MESSAGE-INTEGRITY / method: not answered
    stun_ignored: int = 0  # responses and indications (e.g. to the old owner's checks)
    tx_packets: int = 0


class MigratedCall:
    """A call imported from another transceiver: ICE responder, SRTP, codecs, agent."""

    def __init__(
        self,
        spec: ImportSpec,
        session: AgentSession,
        agent: Agent,
        *,
        consent_timeout: float = DEFAULT_CONSENT_TIMEOUT,
        on_consent_expired: Callable[[MigratedCall], Awaitable[None]],
    ) -> None:
        self.spec = spec
        self.conn_id = spec.conn_id
        self.ufrag = spec.local_ufrag
        self.session = session
        self.agent = agent
        self.consent_timeout = consent_timeout
        self._on_consent_expired = on_consent_expired
        self.created_at: float = spec.raw.get("created_at") or time.time()
        self.connected_at: float | None = spec.raw.get("connected_at")
        self.ports: list[_CallPort] = []
        self.remote_candidate = dict(spec.remote_candidate)
        self.stats = MigrationStats()
        self.ending = False
        self.consent_expired = False
        self.frozen_at: float | None = None
        self.frozen_monotonic: float | None = None
        self._last_consent = time.monotonic()  # the import counts as the last check
        self._tasks: list[asyncio.Task[None]] = []
        self._send_task: asyncio.Task[None] | None = None

        try:
            self._rx = pylibsrtp.Session(
                pylibsrtp.Policy(
                    key=spec.rx_key,
                    ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
                    srtp_profile=spec.libsrtp_profile,
                )
            )
            self._tx = pylibsrtp.Session(
                pylibsrtp.Policy(
                    key=spec.tx_key,
                    ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
                    srtp_profile=spec.libsrtp_profile,
                )
            )
        except pylibsrtp.Error as exc:
            raise ValueError(f"SRTP session setup failed: {exc}") from None

        self.codec = spec.codecs[0]
        self.tx_stream = spec.tx or RtpStreamState(
            ssrc=spec.local_ssrc, payload_type=self.codec.payloadType
        )
        self.rx_streams = {ssrc: copy.copy(st) for ssrc, st in spec.rx.items()}
        self.rx_rtcp: Counter[str] = Counter(spec.rx_rtcp)
        self._encoder: Encoder = get_encoder(self.codec)
        self._decoders: dict[int, Decoder | None] = {}
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
        return (self.remote_candidate["host"], self.remote_candidate["port"])

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
        self._tasks = [
            asyncio.ensure_future(run_agent(self.agent, self.session, f"imported call {self.conn_id}")),
            asyncio.ensure_future(self._consent_watchdog()),
        ]

    def activate(self, by: str) -> None:
        """Start sending (the relay flipped ownership, or the client's packets arrive)."""
        if self.active or self.ending:
            return
        self.stats.activated_at = time.time()
        self.stats.activated_by = by
        self._activated_monotonic = time.monotonic()
        self._send_task = asyncio.ensure_future(self._send_loop())
        logger.info("imported call %d activated by %s", self.conn_id, by)

    def freeze(self) -> None:
        if self.frozen_at is None:
            self.frozen_at, self.frozen_monotonic = time.time(), time.monotonic()

    def unfreeze(self) -> None:
        self.frozen_at = self.frozen_monotonic = None

    async def close(self) -> None:
        """End quietly: nothing can be said to the client without DTLS."""
        self.ending = True
        self.session.close()
        current = asyncio.current_task()
        for task in [*self._tasks, self._send_task]:
            if task is not None and task is not current:
                task.cancel()
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

    def datagram_received(self, port: _CallPort, data: bytes, addr: Addr) -> None:
        kind = classify(data)
        if kind is PacketClass.STUN:
            self._stun_received(port, data, addr)
        elif kind is PacketClass.RTP:
            self._srtp_received(data)
        elif kind is PacketClass.DTLS:
            self.stats.rx_dtls_dropped += 1
        else:
            self.stats.rx_other_dropped += 1

    def _stun_received(self, port: _CallPort, data: bytes, addr: Addr) -> None:
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
            or msg.attributes.get("USERNAME") != f"{self.ufrag}:{self.spec.remote_ufrag}"
            or not msg.check_message_integrity(self.spec.local_pwd.encode())
        ):
            self.stats.stun_rejected += 1
            return
        response = stun.Message(
            message_method=stun.Method.BINDING,
            message_class=stun.Class.RESPONSE,
            transaction_id=msg.transaction_id,
        )
        response.attributes["XOR-MAPPED-ADDRESS"] = addr
        response.add_message_integrity(self.spec.local_pwd.encode())  # adds FINGERPRINT too
        port.sendto(bytes(response), addr)  # a success response claims addr in the mux
        self.stats.stun_answered += 1
        self._last_consent = time.monotonic()
        if addr != self.remote_addr:
            # The relay rebuilt its flow (new flow port): the latest authenticated
            # source wins, as for the shared socket's address claims.
            logger.info(
                "imported call %d: remote moved %s -> %s", self.conn_id, self.remote_addr, addr
            )
            self.remote_candidate.update(host=addr[0], port=addr[1])
        self.activate("stun")

    def _srtp_received(self, data: bytes) -> None:
        rtcp = is_rtcp(data)
        try:
            plain = self._rx.unprotect_rtcp(data) if rtcp else self._rx.unprotect(data)
        except pylibsrtp.Error:
            self.stats.rx_undecryptable += 1
            return
        self.stats.rx_decrypted += 1
        self.activate("srtp")
        if rtcp:
            if len(plain) >= 8:
                self.rx_rtcp[str(int.from_bytes(plain[4:8], "big"))] += 1
            return
        try:
            packet = RtpPacket.parse(plain)
        except ValueError:
            self.stats.rx_decode_errors += 1
            return
        stream = self.rx_streams.get(packet.ssrc)
        if stream is None:
            stream = self.rx_streams[packet.ssrc] = RtpStreamState(
                ssrc=packet.ssrc, payload_type=packet.payload_type
            )
        newer = stream.is_newer(packet.sequence_number)
        stream.update(packet.sequence_number, packet.timestamp, packet.payload_type)
        if not newer:
            self.stats.rx_late += 1  # no jitter buffer: a late packet is skipped
            return
        decoder = self._decoder(packet.payload_type)
        if decoder is None or not packet.payload:
            return
        try:
            frames = decoder.decode(JitterFrame(packet.payload, packet.timestamp))
        except (av.FFmpegError, ValueError):
            self.stats.rx_decode_errors += 1
            return
        for frame in frames:
            self.session.deliver_audio(frame)  # type: ignore[arg-type]

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
                if not payloads or self.frozen_at is not None:
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

    def _port_for(self, addr: Addr) -> _CallPort | None:
        family = ipaddress.ip_address(addr[0]).version
        return next((p for p in self.ports if p.mux.family == family), None)

    # -- state ---------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        stats = dict(vars(self.stats))
        del stats["imported_monotonic"]
        stats.update(
            active=self.active,
            frozen_at=self.frozen_at,
            remote=list(self.remote_addr),
            consent_age_s=round(time.monotonic() - self._last_consent, 3),
        )
        return stats

    def export(
        self, transceiver_id: int, owner: dict[str, Any], include_secrets: bool = True
    ) -> dict[str, Any]:
        """The same layout as ``Transceiver.export_call_state``, so the call can move again."""
        spec = self.spec
        port = self._port_for(self.remote_addr)
        host, lport = port.mux.sockname if port is not None else ("", 0)
        ice: dict[str, Any] = {
            "local_ufrag": spec.local_ufrag,
            "remote_ufrag": spec.remote_ufrag,
            "role": "controlled",
            "tie_breaker": spec.tie_breaker,
            "state": "completed",
            "selected_pair": {
                "local": {
                    "host": host,
                    "port": lport,
                    "type": "host",
                    "priority": candidate_priority(1, "host"),
                    "foundation": candidate_foundation("host", "udp", host),
                    "component": 1,
                    "transport": "udp",
                },
                "remote": dict(self.remote_candidate),
            },
        }
        srtp: dict[str, Any] = {"profile": spec.srtp_profile}
        if include_secrets:
            ice.update(local_pwd=spec.local_pwd, remote_pwd=spec.remote_pwd)
            srtp.update(
                keying_material=spec.keying_material.hex(),
                tx_key=spec.tx_key.hex(),
                rx_key=spec.rx_key.hex(),
            )
        dtls = dict(spec.raw.get("dtls") or {})
        dtls["state"] = "not migrated"
        tx = {str(self.tx_stream.ssrc): self.tx_stream.to_dict()} if self.tx_stream.packets else {}
        return {
            "version": STATE_VERSION,
            "transceiver_id": transceiver_id,
            "conn_id": self.conn_id,
            "created_at": self.created_at,
            "connected_at": self.connected_at,
            "connection_state": "connected",
            "owner": owner,
            "ice": ice,
            "dtls": dtls,
            "srtp": srtp,
            "media": copy.deepcopy(spec.raw.get("media")),
            "rtp": {
                "tx": tx,
                "rx": {str(s): st.to_dict() for s, st in self.rx_streams.items()},
            },
            "rtcp": {
                "tx_srtcp_index": dict(spec.tx_srtcp_index),  # we send no RTCP
                "rx_packets": dict(self.rx_rtcp),
            },
            "sctp": spec.raw.get("sctp"),
            "agent": {"session": self.session.export_state(), "state": self.agent.export_state()},
            "frozen": None
            if self.frozen_at is None
            else {"at": self.frozen_at, "monotonic": self.frozen_monotonic},
            "migrations": int(spec.raw.get("migrations") or 0) + 1,
        }
