"""Every access to a private part of aiortc or aioice, one function per hook.

aiortc and aioice expose no API for what the transceiver needs: a given local
ufrag, one shared socket for all calls, the SRTP keys and RTP counters of a
call, a wrapped consent loop. Each hook below says what it relies on; the
versions are pinned in pyproject.toml, and tests/unit/test_aiortc_hooks.py checks
every target in HOOKS against the installed packages, naming the hook whose
target moved. Nothing outside this module touches a private attribute of an
aiortc or aioice object.
"""

from __future__ import annotations

import base64
import ctypes
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pylibsrtp
import pylibsrtp._binding as _srtp_binding
from aioice.candidate import Candidate
from aioice.ice import CandidatePair, Connection, StunProtocol
from aiortc import clock
from aiortc.rtcdatachannel import RTCDataChannel, RTCDataChannelParameters
from aiortc.rtcdtlstransport import RTCCertificate, RTCDtlsTransport
from aiortc.rtcicetransport import RTCIceGatherer, RTCIceTransport
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.rtcrtptransceiver import RTCRtpTransceiver
from aiortc.rtcsctptransport import DataChunk, InboundStream, RTCSctpTransport
from aiortc.rtp import is_rtcp

from manager.protocol.callstate import (
    SctpAssociation,
    SctpChannel,
    SctpChunk,
    SctpInboundStream,
    SctpQueued,
)

# aiortc's SRTP policy (RTCDtlsTransport._setup_srtp): a 1024-packet replay
# window and repeated transmissions allowed. Sessions we build ourselves (an
# imported call's) must match, or the replay window shrinks after a migration.
SRTP_WINDOW_SIZE = 1024
SRTP_ALLOW_REPEAT_TX = True


# RTCSctpTransport's association state, exported and restored as a whole
# (sctp_export / sctp_restore): every instance attribute either reads or writes.
SCTP_ATTRIBUTES = (
    "_association_state", "_local_port", "_remote_port", "_local_verification_tag", "_remote_verification_tag",
    "_remote_max_message_size", "_remote_partial_reliability", "_remote_extensions", "_data_channel_id",
    "_inbound_streams_count", "_outbound_streams_count", "_advertised_rwnd", "_last_received_tsn",
    "_sack_misordered", "_sack_duplicates", "_sack_needed", "_inbound_streams", "_local_tsn", "_last_sacked_tsn",
    "_advanced_peer_ack_tsn", "_cwnd", "_ssthresh", "_partial_bytes_acked", "_outbound_stream_seq", "_sent_queue",
    "_outbound_queue", "_flight_size", "_reconfig_request_seq", "_reconfig_response_seq", "_reconfig_request",
    "_reconfig_queue", "_reconfig_deferred", "_srtt", "_rttvar", "_rto", "_data_channels", "_data_channel_queue",
    "_fast_recovery_exit", "_forward_tsn_chunk",
)


@dataclass(frozen=True)
class Hook:
    """One private target: `owner.attribute`, what kind it must be, and (for
    methods) the parameters our wrapper passes through."""

    name: str
    owner: type
    attribute: str
    kind: str  # "method", "async method" or "instance attribute"
    parameters: tuple[str, ...] = ()


HOOKS: tuple[Hook, ...] = (
    Hook("ice_connection", RTCIceGatherer, "_connection", "instance attribute"),
    Hook("transport_connection", RTCIceTransport, "_connection", "instance attribute"),
    Hook("set_local_ufrag", Connection, "_local_username", "instance attribute"),
    Hook("share_host_candidates", Connection, "get_component_candidates", "async method",
         ("component", "addresses", "timeout")),
    Hook("share_host_candidates", Connection, "_protocols", "instance attribute"),
    Hook("on_consent_expired", Connection, "query_consent", "async method"),
    Hook("nominated_pair", Connection, "_nominated", "instance attribute"),
    Hook("repoint_pair", Connection, "_nominated", "instance attribute"),
    Hook("repoint_pair", CandidatePair, "remote_candidate", "instance attribute"),
    Hook("tie_breaker", Connection, "_tie_breaker", "instance attribute"),
    Hook("tap_dtls", RTCDtlsTransport, "_setup_srtp", "method"),
    Hook("tap_dtls", RTCDtlsTransport, "_send_rtp", "async method", ("data",)),
    Hook("tap_dtls", RTCDtlsTransport, "_handle_rtp_data", "async method", ("data", "arrival_time_ms")),
    Hook("tap_dtls", RTCDtlsTransport, "_handle_rtcp_data", "async method", ("data",)),
    Hook("dtls_ssl", RTCDtlsTransport, "_ssl", "instance attribute"),
    Hook("dtls_cipher_policy", RTCDtlsTransport, "_RTCDtlsTransport__local_certificate", "instance attribute"),
    Hook("dtls_cipher_policy", RTCCertificate, "_create_ssl_context", "method", ("srtp_profiles",)),
    Hook("dtls_srtp_ready", RTCDtlsTransport, "_rx_srtp", "instance attribute"),
    Hook("deliver_srtp", RTCDtlsTransport, "_rx_srtp", "instance attribute"),
    Hook("deliver_srtp", RTCDtlsTransport, "_handle_rtp_data", "async method", ("data", "arrival_time_ms")),
    Hook("deliver_srtp", RTCDtlsTransport, "_handle_rtcp_data", "async method", ("data",)),
    Hook("dtls_role", RTCDtlsTransport, "_role", "instance attribute"),
    Hook("stream_roc", pylibsrtp.Session, "_srtp", "instance attribute"),
    Hook("set_stream_roc", pylibsrtp.Session, "_srtp", "instance attribute"),
    Hook("sender_ssrcs", RTCRtpSender, "_ssrc", "instance attribute"),
    Hook("sender_ssrcs", RTCRtpSender, "_rtx_ssrc", "instance attribute"),
    Hook("transceiver_codecs", RTCRtpTransceiver, "_codecs", "instance attribute"),
    Hook("transceiver_header_extensions", RTCRtpTransceiver, "_headerExtensions", "instance attribute"),
    Hook("tap_dtls_datagrams", RTCIceTransport, "_send", "instance attribute"),
    Hook("tap_dtls_datagrams", RTCIceTransport, "_recv", "instance attribute"),
    Hook("dtls_session_secrets", RTCDtlsTransport, "_ssl", "instance attribute"),
    # What DtlsStandIn stands in for: aiortc's SCTP calls these on its DTLS transport.
    Hook("DtlsStandIn", RTCDtlsTransport, "_send_data", "async method", ("data",)),
    Hook("DtlsStandIn", RTCDtlsTransport, "_register_data_receiver", "method", ("receiver",)),
    Hook("DtlsStandIn", RTCDtlsTransport, "_unregister_data_receiver", "method", ("receiver",)),
    Hook("DtlsStandIn", RTCDtlsTransport, "_role", "instance attribute"),
    *(Hook(name, RTCSctpTransport, attribute, "instance attribute")
      for name in ("sctp_export", "sctp_restore") for attribute in SCTP_ATTRIBUTES),
    Hook("sctp_restore", RTCSctpTransport, "_RTCSctpTransport__state", "instance attribute"),
    Hook("sctp_restore", RTCSctpTransport, "_RTCSctpTransport__started", "instance attribute"),
    Hook("sctp_restore", RTCDataChannel, "_setReadyState", "method", ("state",)),
    Hook("sctp_resume", RTCSctpTransport, "_send_sack", "async method"),
    Hook("sctp_resume", RTCSctpTransport, "_flight_size_decrease", "method", ("chunk",)),
    Hook("sctp_resume", RTCSctpTransport, "_transmit", "async method"),
    Hook("sctp_resume", RTCSctpTransport, "_data_channel_flush", "async method"),
    Hook("sctp_receive", RTCSctpTransport, "_handle_data", "async method", ("data",)),
    Hook("sctp_abort", RTCSctpTransport, "_abort", "async method"),
)


def check_method(hook: Hook) -> str | None:
    """Why a method hook's target no longer fits, or None (used by the test)."""
    target = getattr(hook.owner, hook.attribute, None)
    if target is None:
        return f"{hook.owner.__name__}.{hook.attribute} is gone"
    if hook.kind == "async method" and not inspect.iscoroutinefunction(target):
        return f"{hook.owner.__name__}.{hook.attribute} is no longer a coroutine function"
    params = tuple(p for p in inspect.signature(target).parameters if p != "self")
    if params != hook.parameters:
        return f"{hook.owner.__name__}.{hook.attribute} now takes {params}, not {hook.parameters}"
    return None


# -- ICE (aioice Connection, reached through aiortc) ---------------------------------------


def ice_connection(gatherer: RTCIceGatherer) -> Connection:
    """The aioice Connection behind a gatherer: aiortc keeps it in `_connection`."""
    return gatherer._connection


def transport_connection(ice: RTCIceTransport) -> Connection:
    """The aioice Connection behind an ICE transport (`RTCIceTransport._connection`)."""
    return ice._connection


def set_local_ufrag(connection: Connection, ufrag: str) -> None:
    """Use `ufrag` as the local ICE ufrag. aioice sets it at construction and
    exposes it read-only (`local_username` reads `_local_username`). aiortc
    creates the Connection in setRemoteDescription and reads the ufrag back
    only in setLocalDescription, so replacing it in between makes aiortc and
    aioice use it for the answer, for checking USERNAMEs and for our checks."""
    connection._local_username = ufrag


def share_host_candidates(
    connection: Connection,
    provider: Callable[[Connection, int], list[tuple[StunProtocol, Candidate]]],
) -> None:
    """Give the Connection host candidates on sockets we own instead of binding
    its own. aioice's gather_candidates() awaits the per-instance
    get_component_candidates(component, addresses, timeout) for host
    candidates and pairs checks over the protocols in `_protocols`; the
    replacement asks `provider(connection, component)` for (protocol,
    candidate) pairs on our sockets and registers each protocol there."""

    async def shared(component: int, addresses: list[str], timeout: int = 5) -> list[Candidate]:
        out = []
        for protocol, candidate in provider(connection, component):
            protocol.local_candidate = candidate
            connection._protocols.append(protocol)
            out.append(candidate)
        return out

    connection.get_component_candidates = shared  # type: ignore[method-assign]


def on_consent_expired(connection: Connection, callback: Callable[[], None]) -> None:
    """Call `callback` when RFC 7675 consent expires. aioice's connect() starts
    `self.query_consent()` as a task; it returns only when consent expired
    (it is cancelled on close), so a per-instance wrapper tells a vanished
    client from a hang-up."""
    original = connection.query_consent

    async def query_consent() -> None:
        await original()
        callback()

    connection.query_consent = query_consent  # type: ignore[method-assign]


def nominated_pair(connection: Connection) -> CandidatePair | None:
    """The nominated pair of component 1 (aiortc uses rtcp-mux: one component).
    aioice keeps it in `_nominated`, with no public accessor."""
    return connection._nominated.get(1)


def repoint_pair(connection: Connection, old: tuple[str, int], new: tuple[str, int]) -> bool:
    """Send the call's media, consent checks and DTLS to `new` instead of
    `old` (the client's path now runs through another relay's flow source).
    aioice sends to its nominated pair's remote candidate and has no way to
    change it: swap the candidate for a copy at the new address. False if the
    nominated pair is not at `old`."""
    pair = connection._nominated.get(1)
    if pair is None or pair.remote_addr != old:
        return False
    c = pair.remote_candidate
    pair.remote_candidate = Candidate(
        foundation=c.foundation, component=c.component, transport=c.transport, priority=c.priority,
        host=new[0], port=new[1], type=c.type, related_address=c.related_address,
        related_port=c.related_port, tcptype=c.tcptype, generation=c.generation)
    return True


def tie_breaker(connection: Connection) -> int:
    """The ICE tie-breaker (RFC 8445 7.3.1.1), aioice's `_tie_breaker`."""
    return connection._tie_breaker


# -- DTLS / SRTP (aiortc RTCDtlsTransport) -----------------------------------------------------


def tap_dtls(
    dtls: RTCDtlsTransport,
    *,
    after_srtp_setup: Callable[[], None],
    send_rtp: Callable[[bytes, Callable[[bytes], Awaitable[None]]], Awaitable[None]],
    received: Callable[[bytes], None],
) -> None:
    """Observe one DTLS transport by per-instance wrappers (only this call is
    affected): `_setup_srtp()` derives the SRTP keys after the handshake;
    `_send_rtp(data)` protects and sends plaintext RTP/RTCP (our wrapper gets
    the original to call, or not: the freeze); `_handle_rtp_data(data,
    arrival_time_ms)` and `_handle_rtcp_data(data)` get plaintext after
    unprotection."""
    orig_setup = dtls._setup_srtp
    orig_send = dtls._send_rtp
    orig_rtp = dtls._handle_rtp_data
    orig_rtcp = dtls._handle_rtcp_data

    def setup_srtp() -> None:
        orig_setup()
        after_srtp_setup()

    async def wrapped_send(data: bytes) -> None:
        await send_rtp(data, orig_send)

    async def handle_rtp_data(data: bytes, arrival_time_ms: int) -> None:
        received(data)
        await orig_rtp(data, arrival_time_ms)

    async def handle_rtcp_data(data: bytes) -> None:
        received(data)
        await orig_rtcp(data)

    dtls._setup_srtp = setup_srtp  # type: ignore[method-assign]
    dtls._send_rtp = wrapped_send  # type: ignore[method-assign]
    dtls._handle_rtp_data = handle_rtp_data  # type: ignore[method-assign]
    dtls._handle_rtcp_data = handle_rtcp_data  # type: ignore[method-assign]


def dtls_cipher_policy(dtls: RTCDtlsTransport, configure: Callable[[Any], None]) -> None:
    """Have `configure(ctx)` adjust the SSL context of this transport's
    handshake. aiortc builds it in start() with its certificate's
    `_create_ssl_context(srtp_profiles)` (`__local_certificate`, shared by a
    peer connection's transports); a per-instance wrapper runs after it."""
    certificate = dtls._RTCDtlsTransport__local_certificate  # type: ignore[attr-defined]
    original = certificate._create_ssl_context

    def create_ssl_context(srtp_profiles: list) -> Any:
        ctx = original(srtp_profiles)
        configure(ctx)
        return ctx

    certificate._create_ssl_context = create_ssl_context


def dtls_ssl(dtls: RTCDtlsTransport) -> Any:
    """The pyOpenSSL connection of the handshake (`_ssl`), None before it."""
    return dtls._ssl


def dtls_srtp_ready(dtls: RTCDtlsTransport) -> bool:
    """Whether _setup_srtp built the sessions (`_rx_srtp` is set only on success)."""
    return dtls._rx_srtp is not None


async def deliver_srtp(dtls: RTCDtlsTransport, data: bytes) -> bool:
    """Take one SRTP/SRTCP packet that did not come in through ICE (a relay's
    check of a client's new address) as RTCDtlsTransport._recv_next takes one:
    unprotect with `_rx_srtp`, then `_handle_rtp_data` / `_handle_rtcp_data`.
    True only if it authenticated (and was delivered)."""
    rx = dtls._rx_srtp
    if rx is None:
        return False
    rtcp = is_rtcp(data)
    try:
        plain = rx.unprotect_rtcp(data) if rtcp else rx.unprotect(data)
    except pylibsrtp.Error:
        return False
    if rtcp:
        await dtls._handle_rtcp_data(plain)
    else:
        await dtls._handle_rtp_data(plain, arrival_time_ms=clock.current_ms())
    return True


def dtls_role(dtls: RTCDtlsTransport) -> str:
    """"client" or "server" (`_role`): RFC 5764 4.2 orders the keys by it."""
    return dtls._role


def _policy(key: bytes, ssrc_type: int, libsrtp_profile: int, ssrc: int = 0) -> pylibsrtp.Policy:
    policy = pylibsrtp.Policy(key=key, ssrc_type=ssrc_type, ssrc_value=ssrc, srtp_profile=libsrtp_profile)
    policy.allow_repeat_tx = SRTP_ALLOW_REPEAT_TX
    policy.window_size = SRTP_WINDOW_SIZE
    return policy


def srtp_session(key: bytes, *, inbound: bool, libsrtp_profile: int,
                 rollover: Mapping[int, int] | None = None) -> pylibsrtp.Session:
    """A libsrtp session with aiortc's policy (see SRTP_WINDOW_SIZE).

    `rollover`: {SSRC: rollover counter} of streams continued from another
    owner. Each gets its own stream whose counter starts there (RFC 3711
    3.3.1), instead of libsrtp's 0 for a stream it first sees."""
    any_type = pylibsrtp.Policy.SSRC_ANY_INBOUND if inbound else pylibsrtp.Policy.SSRC_ANY_OUTBOUND
    session = pylibsrtp.Session(_policy(key, any_type, libsrtp_profile))
    for ssrc, roc in (rollover or {}).items():
        session.add_stream(_policy(key, pylibsrtp.Policy.SSRC_SPECIFIC, libsrtp_profile, ssrc))
        set_stream_roc(session, ssrc, roc)
    return session


# pylibsrtp links libsrtp in statically and exports all of it, but its cffi
# binding declares neither srtp_set_stream_roc nor srtp_get_stream_roc
# (libsrtp >= 2.3): reach them by ctypes in the same shared object.
_libsrtp = ctypes.CDLL(_srtp_binding.__file__)
_libsrtp.srtp_set_stream_roc.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32]
_libsrtp.srtp_set_stream_roc.restype = ctypes.c_int
_libsrtp.srtp_get_stream_roc.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]
_libsrtp.srtp_get_stream_roc.restype = ctypes.c_int


def _srtp_t(session: pylibsrtp.Session) -> int:
    return int(_srtp_binding.ffi.cast("uintptr_t", session._srtp[0]))


def set_stream_roc(session: pylibsrtp.Session, ssrc: int, roc: int) -> None:
    """Start an SSRC's stream of `session` at rollover counter `roc` (the
    stream must exist: a specific-SSRC policy, or a packet seen)."""
    err = _libsrtp.srtp_set_stream_roc(_srtp_t(session), ssrc, roc)
    if err:
        raise pylibsrtp.Error(f"srtp_set_stream_roc(SSRC {ssrc}, {roc}) failed: libsrtp error {err}")


def stream_roc(session: pylibsrtp.Session, ssrc: int) -> int | None:
    """An SSRC's rollover counter in `session` (None: no such stream)."""
    roc = ctypes.c_uint32()
    if _libsrtp.srtp_get_stream_roc(_srtp_t(session), ssrc, ctypes.byref(roc)):
        return None
    return roc.value


# -- RTP (aiortc sender and transceiver) ------------------------------------------------------


def sender_ssrcs(sender: RTCRtpSender) -> tuple[int, int]:
    """(SSRC, RTX SSRC) aiortc picked at random for a sender (`_ssrc`, `_rtx_ssrc`)."""
    return sender._ssrc, sender._rtx_ssrc


def transceiver_codecs(transceiver: RTCRtpTransceiver) -> list:
    """The negotiated codecs (`_codecs`); the first is what aiortc sends."""
    return list(transceiver._codecs)


def transceiver_header_extensions(transceiver: RTCRtpTransceiver) -> list:
    """The negotiated RTP header extensions (`_headerExtensions`)."""
    return list(transceiver._headerExtensions)


# -- DTLS record layer (what a migration continues) -------------------------------------------


def _is_dtls(data: bytes) -> bool:
    return bool(data) and 19 < data[0] < 64  # RFC 7983


def tap_dtls_datagrams(dtls: RTCDtlsTransport, *, sending: Callable[[bytes], bool],
                       receiving: Callable[[bytes], bool]) -> None:
    """See every DTLS datagram of one call going out and coming in, and drop
    it where the callback returns False (a migration freeze). aiortc's DTLS
    transport sends with `transport._send(data)` and reads with
    `transport._recv()`, instance attributes of its RTCIceTransport bound to
    aioice's Connection; per-instance wrappers pass SRTP through untouched."""
    ice = dtls.transport
    orig_send, orig_recv = ice._send, ice._recv

    async def send(data: bytes) -> None:
        if _is_dtls(data) and not sending(data):
            return
        await orig_send(data)

    async def recv() -> bytes:
        while True:
            data = await orig_recv()
            if not _is_dtls(data) or receiving(data):
                return data

    ice._send = send
    ice._recv = recv


@dataclass(frozen=True)
class DtlsSecrets:
    version: str  # OpenSSL's name, "DTLSv1.2"
    cipher: str  # OpenSSL's name, "ECDHE-ECDSA-AES128-GCM-SHA256"
    master_secret: bytes
    client_random: bytes
    server_random: bytes


def dtls_session_secrets(dtls: RTCDtlsTransport) -> DtlsSecrets | None:
    """The negotiated session of the handshake's pyOpenSSL connection (`_ssl`),
    from which the record keys follow (RFC 5246 6.3); None before it."""
    ssl = dtls._ssl
    if ssl is None:
        return None
    master, client, server = ssl.master_key(), ssl.client_random(), ssl.server_random()
    if not master or not client or not server:
        return None
    return DtlsSecrets(version=ssl.get_protocol_version_name(), cipher=ssl.get_cipher_name() or "",
                       master_secret=bytes(master), client_random=bytes(client), server_random=bytes(server))


class DtlsStandIn:
    """What aiortc's RTCSctpTransport needs of an RTCDtlsTransport, for an
    association carried over a record layer of our own (an imported call):
    its role (RFC 8832 stream parity), a state, a data receiver, and
    `_send_data(data)` for each SCTP packet."""

    def __init__(self, role: str, send: Callable[[bytes], Awaitable[None]]) -> None:
        self._role = role
        self.state = "connected"
        self._send = send
        self.receiver: Any = None

    def _register_data_receiver(self, receiver: Any) -> None:
        self.receiver = receiver

    def _unregister_data_receiver(self, receiver: Any) -> None:
        if self.receiver is receiver:
            self.receiver = None

    async def _send_data(self, data: bytes) -> None:
        await self._send(data)


# -- SCTP association (aiortc RTCSctpTransport) ---------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _chunk_state(chunk: DataChunk) -> SctpChunk:
    return SctpChunk(
        tsn=chunk.tsn, stream_id=chunk.stream_id, stream_seq=chunk.stream_seq, protocol=chunk.protocol,
        flags=chunk.flags, user_data=_b64(chunk.user_data),
        sent_count=getattr(chunk, "_sent_count", 0), acked=getattr(chunk, "_acked", False),
        abandoned=getattr(chunk, "_abandoned", False), expiry=getattr(chunk, "_expiry", None),
        max_retransmits=getattr(chunk, "_max_retransmits", None))


def _chunk(state: SctpChunk, *, retransmit: bool) -> DataChunk:
    chunk = DataChunk(flags=state.flags)
    chunk.tsn, chunk.stream_id, chunk.stream_seq = state.tsn, state.stream_id, state.stream_seq
    chunk.protocol, chunk.user_data = state.protocol, base64.b64decode(state.user_data)
    # The sender's bookkeeping, as RTCSctpTransport._send sets it up.
    chunk._abandoned, chunk._acked = state.abandoned, state.acked
    chunk._book_size = len(chunk.user_data)
    chunk._expiry, chunk._max_retransmits = state.expiry, state.max_retransmits
    chunk._in_flight, chunk._misses, chunk._sent_time = False, 0, None  # no RTT sample from a moved chunk
    chunk._retransmit = retransmit
    chunk._sent_count = state.sent_count
    return chunk


def sctp_export(sctp: RTCSctpTransport) -> SctpAssociation:
    """An established association's whole state (ValueError naming what
    cannot be carried: not established, or a channel closing)."""
    if sctp._association_state != RTCSctpTransport.State.ESTABLISHED:
        raise ValueError(f"the SCTP association is {sctp._association_state.name}, not ESTABLISHED")
    if sctp._reconfig_request is not None or sctp._reconfig_queue or sctp._reconfig_deferred is not None:
        raise ValueError("a data channel is closing (SCTP stream reset in progress)")
    channels = []
    for stream_id, channel in sorted(sctp._data_channels.items()):
        if channel.readyState != "open":
            raise ValueError(f"data channel {stream_id} is {channel.readyState}, not open")
        channels.append(SctpChannel(id=stream_id, label=channel.label, protocol=channel.protocol,
                                    ordered=channel.ordered, max_packet_life_time=channel.maxPacketLifeTime,
                                    max_retransmits=channel.maxRetransmits, negotiated=channel.negotiated))
    queued = []
    for channel, protocol, user_data in sctp._data_channel_queue:
        if channel.id is None:
            raise ValueError("a data channel has no stream id yet")
        queued.append(SctpQueued(channel=channel.id, protocol=protocol, user_data=_b64(user_data)))
    return SctpAssociation(
        local_port=sctp._local_port, remote_port=sctp._remote_port,
        local_verification_tag=sctp._local_verification_tag,
        remote_verification_tag=sctp._remote_verification_tag,
        remote_max_message_size=sctp._remote_max_message_size,
        remote_partial_reliability=sctp._remote_partial_reliability,
        remote_extensions=list(sctp._remote_extensions), next_channel_id=sctp._data_channel_id,
        inbound_streams_count=sctp._inbound_streams_count, outbound_streams_count=sctp._outbound_streams_count,
        advertised_rwnd=max(0, sctp._advertised_rwnd), last_received_tsn=sctp._last_received_tsn,
        sack_misordered=sorted(sctp._sack_misordered), sack_duplicates=list(sctp._sack_duplicates),
        sack_needed=sctp._sack_needed,
        inbound=[SctpInboundStream(stream_id=sid, sequence_number=stream.sequence_number,
                                   reassembly=[_chunk_state(c) for c in stream.reassembly])
                 for sid, stream in sorted(sctp._inbound_streams.items())],
        local_tsn=sctp._local_tsn, last_sacked_tsn=sctp._last_sacked_tsn,
        advanced_peer_ack_tsn=sctp._advanced_peer_ack_tsn, cwnd=sctp._cwnd, ssthresh=sctp._ssthresh,
        partial_bytes_acked=sctp._partial_bytes_acked,
        outbound_stream_seq={str(k): v for k, v in sctp._outbound_stream_seq.items()},
        sent=[_chunk_state(c) for c in sctp._sent_queue], outbound=[_chunk_state(c) for c in sctp._outbound_queue],
        reconfig_request_seq=sctp._reconfig_request_seq, reconfig_response_seq=sctp._reconfig_response_seq,
        srtt=sctp._srtt, rttvar=sctp._rttvar, rto=sctp._rto,
        channels=channels, queued=queued,
    )


def sctp_restore(sctp: RTCSctpTransport, state: SctpAssociation) -> list[RTCDataChannel]:
    """Make a fresh RTCSctpTransport (on a DtlsStandIn, never started) the
    association `state` describes, ESTABLISHED, with its data channels open
    (returned). Chunks sent but not acknowledged are marked for retransmission:
    the old owner's last transmissions may never have left it (the freeze)."""
    sctp._RTCSctpTransport__started = True
    sctp._local_port, sctp._remote_port = state.local_port, state.remote_port
    sctp._local_verification_tag = state.local_verification_tag
    sctp._remote_verification_tag = state.remote_verification_tag
    sctp._remote_max_message_size = state.remote_max_message_size
    sctp._remote_partial_reliability = state.remote_partial_reliability
    sctp._remote_extensions = list(state.remote_extensions)
    sctp._data_channel_id = state.next_channel_id
    sctp._inbound_streams_count, sctp._outbound_streams_count = (state.inbound_streams_count,
                                                                 state.outbound_streams_count)
    sctp._advertised_rwnd = state.advertised_rwnd
    sctp._last_received_tsn = state.last_received_tsn
    sctp._sack_misordered, sctp._sack_duplicates = set(state.sack_misordered), list(state.sack_duplicates)
    sctp._sack_needed = state.sack_needed
    for stream in state.inbound:
        inbound = InboundStream()
        inbound.sequence_number = stream.sequence_number
        inbound.reassembly = [_chunk(c, retransmit=False) for c in stream.reassembly]
        sctp._inbound_streams[stream.stream_id] = inbound
    sctp._local_tsn, sctp._last_sacked_tsn = state.local_tsn, state.last_sacked_tsn
    sctp._advanced_peer_ack_tsn = state.advanced_peer_ack_tsn
    sctp._reconfig_request_seq, sctp._reconfig_response_seq = state.reconfig_request_seq, state.reconfig_response_seq
    sctp._cwnd, sctp._ssthresh, sctp._partial_bytes_acked = state.cwnd, state.ssthresh, state.partial_bytes_acked
    sctp._fast_recovery_exit = None
    sctp._outbound_stream_seq = {int(k): v for k, v in state.outbound_stream_seq.items()}
    sctp._sent_queue.extend(_chunk(c, retransmit=not (c.acked or c.abandoned)) for c in state.sent)
    sctp._outbound_queue.extend(_chunk(c, retransmit=False) for c in state.outbound)
    sctp._flight_size = 0  # nothing counts in flight until resent
    sctp._srtt, sctp._rttvar, sctp._rto = state.srtt, state.rttvar, state.rto
    sctp._association_state = RTCSctpTransport.State.ESTABLISHED
    sctp._RTCSctpTransport__state = "connected"
    sctp.transport._register_data_receiver(sctp)
    channels = {}
    for c in state.channels:
        params = RTCDataChannelParameters(label=c.label, maxPacketLifeTime=c.max_packet_life_time,
                                          maxRetransmits=c.max_retransmits, ordered=c.ordered,
                                          protocol=c.protocol, negotiated=c.negotiated, id=c.id)
        channel = RTCDataChannel(sctp, params, send_open=False)  # a negotiated one registers itself
        sctp._data_channels[c.id] = channel
        channel._setReadyState("open")
        channels[c.id] = channel
    for q in state.queued:
        channel = channels.get(q.channel)
        if channel is None:
            raise ValueError(f"sctp.association.queued: a message for data channel {q.channel}, which is not open")
        sctp._data_channel_queue.append((channel, q.protocol, base64.b64decode(q.user_data)))
    return list(channels.values())


async def sctp_resume(sctp: RTCSctpTransport) -> None:
    """Start a restored association at its new owner, or again after a
    freeze: acknowledge what it owes the peer (with gap blocks, the peer
    fast-retransmits what the freeze dropped), resend every chunk not
    acknowledged (what went out while held never left), send what is queued."""
    for chunk in sctp._sent_queue:
        if not (chunk._acked or chunk._abandoned):
            chunk._retransmit = True
            sctp._flight_size_decrease(chunk)
    if sctp._sack_needed or sctp._sack_misordered:
        await sctp._send_sack()
    await sctp._transmit()
    await sctp._data_channel_flush()


async def sctp_receive(sctp: RTCSctpTransport, data: bytes) -> None:
    """One SCTP packet from the record layer, as RTCDtlsTransport hands it over."""
    await sctp._handle_data(data)


async def sctp_abort(sctp: RTCSctpTransport) -> None:
    """Send an ABORT (the peer's data channels close at once), as stop() does."""
    await sctp._abort()
