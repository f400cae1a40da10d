"""Every access to a private part of aiortc or aioice, one function per hook.

aiortc and aioice expose no API for what the transceiver needs: a given local
ufrag, one shared socket for all calls, the SRTP keys and RTP counters of a
call, a wrapped consent loop. Each hook below says what it relies on; the
versions are pinned in pyproject.toml, and tests/test_aiortc_hooks.py checks
every target in HOOKS against the installed packages, naming the hook whose
target moved. Nothing outside this module touches a private attribute of an
aiortc or aioice object.
"""

from __future__ import annotations

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
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcicetransport import RTCIceGatherer, RTCIceTransport
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.rtcrtptransceiver import RTCRtpTransceiver
from aiortc.rtp import is_rtcp

# aiortc's SRTP policy (RTCDtlsTransport._setup_srtp): a 1024-packet replay
# window and repeated transmissions allowed. Sessions we build ourselves (an
# imported call's) must match, or the replay window shrinks after a migration.
SRTP_WINDOW_SIZE = 1024
SRTP_ALLOW_REPEAT_TX = True


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
