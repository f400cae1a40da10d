"""The hooks' registry: every private target of aiortc or aioice, checked by a test.

aiortc and aioice expose no API for what the transceiver needs: a given local
ufrag, one shared socket for all calls, the SRTP keys and RTP counters of a
call, a wrapped consent loop. Each hook below says what it relies on; the
versions are pinned in pyproject.toml, and tests/unit/test_aiortc_hooks.py checks
every target in HOOKS against the installed packages, naming the hook whose
target moved. Nothing outside this package touches a private attribute of an
aiortc or aioice object.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import pylibsrtp
from aioice.ice import CandidatePair, Connection
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtcdatachannel import RTCDataChannel
from aiortc.rtcdtlstransport import RTCCertificate, RTCDtlsTransport
from aiortc.rtcicetransport import RTCIceGatherer, RTCIceTransport
from aiortc.rtcrtpreceiver import RemoteStreamTrack, RTCRtpReceiver
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.rtcrtptransceiver import RTCRtpTransceiver
from aiortc.rtcsctptransport import RTCSctpTransport
from OpenSSL import SSL

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
    Hook("tap_rtcp", RTCDtlsTransport, "_send_rtp", "async method", ("data",)),
    Hook("tap_rtcp", RTCDtlsTransport, "_handle_rtcp_data", "async method", ("data",)),
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
    Hook("play_audio_on_arrival", RTCRtpReceiver, "_RTCRtpReceiver__jitter_buffer", "instance attribute"),
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
    Hook("take_held_audio", RTCRtpReceiver, "_track", "instance attribute"),
    Hook("take_held_audio", RemoteStreamTrack, "_queue", "instance attribute"),
    Hook("take_held_audio", RTCRtpReceiver, "_RTCRtpReceiver__decoder_queue", "instance attribute"),
    Hook("take_held_audio", RTCRtpReceiver, "_RTCRtpReceiver__jitter_buffer", "instance attribute"),
    Hook("take_held_audio", JitterBuffer, "_origin", "instance attribute"),
    Hook("take_held_audio", JitterBuffer, "_packets", "instance attribute"),
    Hook("release_peer_connection", RTCDtlsTransport, "_ssl", "instance attribute"),
    Hook("release_peer_connection", SSL.Connection, "_verify_helper", "instance attribute"),
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
