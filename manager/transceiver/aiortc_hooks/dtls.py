"""Hooks into aiortc's DTLS transport: SRTP keys and sessions, the cipher policy, RTP
senders, and the record layer a migration continues."""

from __future__ import annotations

import ctypes
import logging
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pylibsrtp
import pylibsrtp._binding as _srtp_binding
from aiortc import clock
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.rtcrtptransceiver import RTCRtpTransceiver
from aiortc.rtp import is_rtcp

from .registry import SRTP_ALLOW_REPEAT_TX, SRTP_WINDOW_SIZE

logger = logging.getLogger(__name__)

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


def tap_rtcp(dtls: RTCDtlsTransport, *, sent: Callable[[bytes], None], received: Callable[[bytes], None]) -> None:
    """Read a call's RTCP both ways (rtcp_stats): ``sent(plain)`` for each
    packet aiortc protects and sends (`_send_rtp`: its RTP, and the RTCP of
    its sender and receiver),
    ``received(plain)`` for each one unprotected (`_handle_rtcp_data`). Per
    instance, like tap_dtls; installed before it, so that what the migration
    freeze holds back is not counted as sent. An observer's failure never
    reaches aiortc."""
    orig_send = dtls._send_rtp
    orig_rtcp = dtls._handle_rtcp_data

    def observe(callback: Callable[[bytes], None], data: bytes) -> None:
        try:
            callback(data)
        except Exception:  # figures are not worth a call
            logger.exception("RTCP observer failed")

    async def send_rtp(data: bytes) -> None:
        await orig_send(data)
        observe(sent, data)

    async def handle_rtcp_data(data: bytes) -> None:
        observe(received, data)
        await orig_rtcp(data)

    dtls._send_rtp = send_rtp  # type: ignore[method-assign]
    dtls._handle_rtcp_data = handle_rtcp_data  # type: ignore[method-assign]


def dtls_cipher_policy(dtls: RTCDtlsTransport, configure: Callable[[Any], None]) -> None:
    """Have `configure(ctx)` adjust the SSL context of this transport's
    handshake. aiortc builds it in start() with its certificate's
    `_create_ssl_context(srtp_profiles)` (`__local_certificate`, shared by a
    peer connection's transports); a per-instance wrapper runs after it."""
    certificate = dtls._RTCDtlsTransport__local_certificate  # type: ignore[attr-defined]
    original = type(certificate)._create_ssl_context
    # The certificate weakly: the wrapper is its own attribute, and a strong
    # reference would make it a cycle only the collector frees.
    owner = weakref.ref(certificate)

    def create_ssl_context(srtp_profiles: list) -> Any:
        ctx = original(owner(), srtp_profiles)
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
