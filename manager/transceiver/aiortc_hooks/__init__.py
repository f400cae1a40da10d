"""Every access to a private part of aiortc or aioice, one function per hook.

aiortc and aioice expose no API for what the transceiver needs: a given local
ufrag, one shared socket for all calls, the SRTP keys and RTP counters of a
call, a wrapped consent loop, the SCTP association of a migrated call. This
package is the one adapter: ``registry`` lists every private target (HOOKS,
checked against the installed packages by tests/unit/test_aiortc_hooks.py),
and ``ice``, ``dtls`` and ``sctp`` hold the hooks by the object they reach
into. Nothing outside this package touches a private attribute of an aiortc
or aioice object; callers import the package (``from . import aiortc_hooks
as hooks``).
"""

from aioice.candidate import Candidate
from aioice.ice import CandidatePair, Connection

from .dtls import (
    DtlsSecrets,
    DtlsStandIn,
    deliver_srtp,
    dtls_cipher_policy,
    dtls_role,
    dtls_session_secrets,
    dtls_srtp_ready,
    dtls_ssl,
    sender_ssrcs,
    set_stream_roc,
    srtp_session,
    stream_roc,
    tap_dtls,
    tap_dtls_datagrams,
    tap_rtcp,
    transceiver_codecs,
    transceiver_header_extensions,
)
from .ice import (
    ice_connection,
    nominated_pair,
    on_consent_expired,
    repoint_pair,
    set_local_ufrag,
    share_host_candidates,
    tie_breaker,
    transport_connection,
)
from .registry import HOOKS, SCTP_ATTRIBUTES, SRTP_ALLOW_REPEAT_TX, SRTP_WINDOW_SIZE, Hook, check_method
from .release import PER_CALL, per_call_objects, release_peer_connection
from .rtp import HeldAudio, play_audio_on_arrival, take_held_audio
from .sctp import sctp_abort, sctp_export, sctp_receive, sctp_restore, sctp_resume

__all__ = [
    "Candidate",
    "CandidatePair",
    "Connection",
    "DtlsSecrets",
    "DtlsStandIn",
    "HOOKS",
    "HeldAudio",
    "PER_CALL",
    "Hook",
    "SCTP_ATTRIBUTES",
    "SRTP_ALLOW_REPEAT_TX",
    "SRTP_WINDOW_SIZE",
    "check_method",
    "deliver_srtp",
    "dtls_cipher_policy",
    "dtls_role",
    "dtls_session_secrets",
    "dtls_srtp_ready",
    "dtls_ssl",
    "ice_connection",
    "nominated_pair",
    "on_consent_expired",
    "per_call_objects",
    "play_audio_on_arrival",
    "release_peer_connection",
    "repoint_pair",
    "sctp_abort",
    "sctp_export",
    "sctp_receive",
    "sctp_restore",
    "sctp_resume",
    "sender_ssrcs",
    "set_local_ufrag",
    "set_stream_roc",
    "share_host_candidates",
    "srtp_session",
    "stream_roc",
    "tap_dtls",
    "take_held_audio",
    "tap_dtls_datagrams",
    "tap_rtcp",
    "tie_breaker",
    "transceiver_codecs",
    "transceiver_header_extensions",
    "transport_connection",
]
