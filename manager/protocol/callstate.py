"""The exported state of a call: what a new owner needs to take a live call
over (docs/migration.md). One versioned schema, written by every export path
(a call placed on a transceiver, and a call that was itself imported) and
read by import. relayd passes it through untouched, only over mutual TLS.

Secrets (ICE passwords, the DTLS master secret, the DTLS exporter output,
SRTP master keys and salts) are present only in an export for migration;
`without_secrets()` drops them, and the SCTP association with the messages
it holds, for anything shown or logged.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from manager.protocol.api import OwnerBody

#: Fields added since carry defaults, so an older export still imports (a
#: missing field reads as its default, e.g. 0 octets sent) and the version
#: stays; an older owner refuses a newer export by its unknown fields.
STATE_VERSION = 1
U32_MAX = 0xFFFFFFFF
_ICE_CHARS = re.compile(r"^[A-Za-z0-9+/]{4,256}$")  # RFC 8445 ice-chars, aioice's length rule
_HEX = re.compile(r"^(?:[0-9a-f]{2})*$")


U16_MAX = 0xFFFF
_B64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")

# What without_secrets() removes, by section (a dotted path for a nested one).
SECRET_FIELDS = {"ice": ("local_pwd", "remote_pwd"), "srtp": ("keying_material", "tx_key", "rx_key"),
                 "dtls.record": ("master_secret",)}


class _Model(BaseModel):
    # Unknown fields are refused: a state from a newer schema fails loudly.
    model_config = ConfigDict(extra="forbid")


def _hex(value: str | None) -> str | None:
    if value is not None and not _HEX.match(value):
        raise ValueError("must be lowercase hex")
    return value


class Candidate(_Model):
    """One ICE candidate of the selected pair (aioice's Candidate fields)."""

    host: str
    port: int = Field(ge=0, le=65535)
    type: str
    priority: int = Field(ge=0, le=U32_MAX)
    foundation: str
    component: int = Field(ge=1, le=256)
    transport: str

    @field_validator("host")
    @classmethod
    def _ip(cls, v: str) -> str:
        return str(ipaddress.ip_address(v))


class SelectedPair(_Model):
    local: Candidate
    remote: Candidate


class IceState(_Model):
    local_ufrag: str
    remote_ufrag: str | None = None  # None until the remote parameters are known
    role: Literal["controlling", "controlled"]
    tie_breaker: int = Field(ge=0, le=2**64 - 1)
    state: str
    selected_pair: SelectedPair | None = None
    local_pwd: str | None = None  # secret
    remote_pwd: str | None = None  # secret

    @field_validator("local_ufrag", "remote_ufrag")
    @classmethod
    def _ufrag(cls, v: str | None) -> str | None:
        if v is not None and not _ICE_CHARS.match(v):
            raise ValueError("is not an ICE ufrag (4 to 256 of [A-Za-z0-9+/])")
        return v


class Fingerprint(_Model):
    algorithm: str
    value: str


class DtlsRecordState(_Model):
    """Where the DTLS 1.2 record layer stands (manager.protocol.dtls_record):
    with the master secret and the randoms, a new owner derives the record
    keys and continues the session's epoch and sequence numbers."""

    epoch: int = Field(ge=1, le=U16_MAX)
    tx_seq: int = Field(ge=0, le=(1 << 48) - 1)  # next sequence number to seal: above any the old owner sealed
    rx_highest: int = Field(ge=-1, le=(1 << 48) - 1)  # highest authenticated record received (-1: none)
    rx_window: int = Field(default=0, ge=0, le=2**64 - 1)  # replay bitmap below it (bit i: rx_highest - i seen)
    client_random: str
    server_random: str
    master_secret: str | None = None  # secret, hex

    @field_validator("client_random", "server_random", "master_secret")
    @classmethod
    def _check_hex(cls, v: str | None) -> str | None:
        return _hex(v)


class DtlsState(_Model):
    role: Literal["client", "server"] | None = None
    state: str
    version: str | None = None
    cipher: str | None = None
    local_fingerprints: list[Fingerprint] = Field(default_factory=list)
    remote_fingerprints: list[Fingerprint] = Field(default_factory=list)
    srtp_profile: str | None = None
    record: DtlsRecordState | None = None  # None: the record layer is not carried (see sctp.not_carried)


class SrtpState(_Model):
    profile: str  # OpenSSL's name, e.g. SRTP_AEAD_AES_128_GCM
    keying_material: str | None = None  # secret: RFC 5764 EXTRACTOR-dtls_srtp output, hex
    tx_key: str | None = None  # secret: master key || salt we protect with, hex
    rx_key: str | None = None  # secret: master key || salt we unprotect with, hex

    @field_validator("keying_material", "tx_key", "rx_key")
    @classmethod
    def _check_hex(cls, v: str | None) -> str | None:
        return _hex(v)


class Codec(_Model):
    mime_type: str
    clock_rate: int = Field(gt=0)
    channels: int | None = None
    payload_type: int = Field(ge=0, le=127)
    parameters: dict[str, Any] = Field(default_factory=dict)


class HeaderExtension(_Model):
    id: int = Field(ge=1, le=255)
    uri: str


class MediaSection(_Model):
    mid: str | None = None
    kind: str
    direction: str | None = None
    local_ssrc: int | None = Field(default=None, ge=0, le=U32_MAX)
    local_rtx_ssrc: int | None = Field(default=None, ge=0, le=U32_MAX)
    codecs: list[Codec] = Field(default_factory=list)
    remote_ssrcs: list[int] = Field(default_factory=list)
    header_extensions: list[HeaderExtension] = Field(default_factory=list)


class RtpStream(_Model):
    """One SSRC's RTP stream: where it stands, so a new owner continues (tx) or accepts (rx) it."""

    ssrc: int = Field(ge=0, le=U32_MAX)
    payload_type: int = Field(ge=0, le=127)
    seq: int = Field(default=0, ge=0, le=0xFFFF)  # highest sequence number seen
    timestamp: int = Field(default=0, ge=0, le=U32_MAX)  # RTP timestamp of that packet
    roc: int = Field(default=0, ge=0, le=U32_MAX)  # SRTP rollover counter (RFC 3711 3.3.1)
    packets: int = Field(default=0, ge=0)
    # Payload octets; a sent stream's go on at the new owner (RFC 3550 6.4.1: an
    # SR's counts run from the SSRC's start). Absent (an older export): 0.
    octets: int = Field(default=0, ge=0)


class RtpState(_Model):
    tx: dict[str, RtpStream] = Field(default_factory=dict)  # by SSRC, decimal
    rx: dict[str, RtpStream] = Field(default_factory=dict)


class LastSenderReport(_Model):
    """The client's last sender report, for the LSR and DLSR of the new owner's reports."""

    ntp_middle32: int = Field(ge=0, le=U32_MAX)  # what a report block cites as LSR
    # Seconds between its arrival and the export (an age, not a clock of the
    # old owner's process): the new owner adds the time since the freeze.
    age: float = Field(ge=0, allow_inf_nan=False)


class Reception(_Model):
    """RFC 3550 A.3's counts of a client's stream at the export, so the new
    owner's report blocks go on from them: the client sees one cumulative
    loss and one jitter estimate for the whole call, not one per owner."""

    base_seq: int = Field(ge=0)  # extended: the first sequence number counted
    received: int = Field(ge=0)
    jitter: float = Field(ge=0, allow_inf_nan=False)  # RTP timestamp units, as a report carries it
    # What the call counted before this stream's first owner (aiortc's figures at the hand-over).
    lost_before: int = Field(default=0, ge=0)
    expected_before: int = Field(default=0, ge=0)


class RtcpState(_Model):
    tx_srtcp_index: dict[str, int] = Field(default_factory=dict)  # per sender SSRC: next SRTCP index
    rx_packets: dict[str, int] = Field(default_factory=dict)
    rx_last_sr: dict[str, LastSenderReport] = Field(default_factory=dict)  # per client SSRC; absent: none
    rx_reception: dict[str, Reception] = Field(default_factory=dict)  # per client SSRC; absent: counted anew


def _b64(value: str) -> str:
    if not _B64.match(value) or len(value) % 4:
        raise ValueError("must be base64")
    return value


class SctpChunk(_Model):
    """One DATA chunk (RFC 9260 3.3.1) the association holds; the sender's
    bookkeeping for the chunks it sent or queued."""

    tsn: int = Field(ge=0, le=U32_MAX)
    stream_id: int = Field(ge=0, le=U16_MAX)
    stream_seq: int = Field(ge=0, le=U16_MAX)
    protocol: int = Field(ge=0, le=U32_MAX)  # payload protocol identifier (RFC 8831 8)
    flags: int = Field(ge=0, le=0xFF)
    user_data: str  # base64
    sent_count: int = Field(default=0, ge=0)
    acked: bool = False  # gap-acknowledged (not yet cumulatively)
    abandoned: bool = False  # PR-SCTP (RFC 3758)
    expiry: float | None = None  # wall clock, partially reliable channels
    max_retransmits: int | None = Field(default=None, ge=0)

    @field_validator("user_data")
    @classmethod
    def _check_b64(cls, v: str) -> str:
        return _b64(v)


class SctpInboundStream(_Model):
    stream_id: int = Field(ge=0, le=U16_MAX)
    sequence_number: int = Field(ge=0, le=U16_MAX)  # next ordered message expected
    reassembly: list[SctpChunk] = Field(default_factory=list)  # received, not yet delivered


class SctpChannel(_Model):
    """An open data channel (RFC 8832 parameters)."""

    id: int = Field(ge=0, le=65534)
    label: str = ""
    protocol: str = ""
    ordered: bool = True
    max_packet_life_time: int | None = Field(default=None, ge=0)
    max_retransmits: int | None = Field(default=None, ge=0)
    negotiated: bool = False


class SctpQueued(_Model):
    """A message a channel was given that the association has not cut into chunks yet."""

    channel: int = Field(ge=0, le=65534)
    protocol: int = Field(ge=0, le=U32_MAX)
    user_data: str  # base64

    @field_validator("user_data")
    @classmethod
    def _check_b64(cls, v: str) -> str:
        return _b64(v)


class SctpAssociation(_Model):
    """An established SCTP association (RFC 9260) over DTLS, as a new owner
    continues it: tags, TSNs, stream sequence numbers, the peer's window,
    chunks outstanding, queued and awaiting reassembly, and the data channels."""

    local_port: int = Field(ge=0, le=U16_MAX)
    remote_port: int = Field(ge=0, le=U16_MAX)
    local_verification_tag: int = Field(ge=0, le=U32_MAX)
    remote_verification_tag: int = Field(ge=0, le=U32_MAX)
    remote_max_message_size: int = Field(ge=0)
    remote_partial_reliability: bool = False
    remote_extensions: list[int] = Field(default_factory=list)
    next_channel_id: int = Field(ge=0, le=U16_MAX)  # RFC 8832 6: even for the DTLS client, odd for the server
    inbound_streams_count: int = Field(ge=0, le=U16_MAX)
    outbound_streams_count: int = Field(ge=0, le=U16_MAX)
    # inbound
    advertised_rwnd: int = Field(ge=0)
    last_received_tsn: int = Field(ge=0, le=U32_MAX)  # cumulative TSN we acknowledge
    sack_misordered: list[int] = Field(default_factory=list)  # received above it (gap blocks)
    sack_duplicates: list[int] = Field(default_factory=list)
    sack_needed: bool = False
    inbound: list[SctpInboundStream] = Field(default_factory=list)
    # outbound
    local_tsn: int = Field(ge=0, le=U32_MAX)  # next TSN to assign
    last_sacked_tsn: int = Field(ge=0, le=U32_MAX)
    advanced_peer_ack_tsn: int = Field(ge=0, le=U32_MAX)
    cwnd: int = Field(gt=0)
    ssthresh: int = Field(gt=0)
    partial_bytes_acked: int = Field(default=0, ge=0)
    outbound_stream_seq: dict[str, int] = Field(default_factory=dict)  # by stream id, decimal
    sent: list[SctpChunk] = Field(default_factory=list)  # sent, not cumulatively acknowledged
    outbound: list[SctpChunk] = Field(default_factory=list)  # cut into chunks, not sent yet
    reconfig_request_seq: int = Field(ge=0, le=U32_MAX)
    reconfig_response_seq: int = Field(ge=0, le=U32_MAX)
    # round trip (RFC 9260 6.3.1)
    srtt: float | None = None
    rttvar: float | None = None
    rto: float = Field(gt=0)
    channels: list[SctpChannel] = Field(default_factory=list)
    queued: list[SctpQueued] = Field(default_factory=list)


class SctpState(_Model):
    mid: str | None = None
    state: str
    port: int = Field(ge=0, le=65535)
    association: SctpAssociation | None = None  # what continues it; None with not_carried
    not_carried: str | None = None  # why the data channels stop at a migration, if they do


class AgentState(_Model):
    session: dict[str, Any] = Field(default_factory=dict)  # AgentSession counters
    state: dict[str, Any] = Field(default_factory=dict)  # the agent's own export_state()


class Frozen(_Model):
    at: float  # wall clock of the old owner's freeze
    monotonic: float | None = None


class CallState(_Model):
    """The whole exported call (version STATE_VERSION)."""

    version: Literal[1] = STATE_VERSION
    transceiver_id: int = Field(ge=0, le=0xFFFF)
    conn_id: int = Field(ge=1, le=U32_MAX)  # 0 is the registry's "none"
    created_at: float
    connected_at: float | None = None
    connection_state: str
    owner: OwnerBody
    ice: IceState
    dtls: DtlsState
    srtp: SrtpState | None = None
    media: list[MediaSection] = Field(default_factory=list)
    rtp: RtpState = Field(default_factory=RtpState)
    rtcp: RtcpState = Field(default_factory=RtcpState)
    sctp: SctpState | None = None
    agent: AgentState = Field(default_factory=AgentState)
    frozen: Frozen | None = None
    migrations: int = Field(default=0, ge=0)  # times this call was imported

    def audio(self) -> MediaSection | None:
        return next((m for m in self.media if m.kind == "audio"), None)

    def without_secrets(self) -> CallState:
        """A copy fit to show or log: passwords, the master secret, exporter
        output and keys removed, and the SCTP association (it holds messages)."""
        ice = self.ice.model_copy(update={"local_pwd": None, "remote_pwd": None})
        srtp = None if self.srtp is None else SrtpState(profile=self.srtp.profile)
        record = self.dtls.record
        dtls = self.dtls.model_copy(
            update={"record": None if record is None else record.model_copy(update={"master_secret": None})})
        sctp = None if self.sctp is None else self.sctp.model_copy(update={"association": None})
        return self.model_copy(update={"ice": ice, "srtp": srtp, "dtls": dtls, "sctp": sctp})

    def to_json(self) -> dict[str, Any]:
        """The JSON object relayd carries from export to import. A secret that
        is absent is left out altogether, not written as null."""
        data = self.model_dump(mode="json")
        for section, names in SECRET_FIELDS.items():
            part: Any = data
            for key in section.split("."):
                part = part.get(key) if isinstance(part, dict) else None
            if isinstance(part, dict):
                for name in names:
                    if part.get(name) is None:
                        part.pop(name, None)
        return data


def parse_call_state(data: Any) -> CallState:
    """A received state, validated; ValueError("<field.path>: <reason>") otherwise."""
    if not isinstance(data, dict):
        raise ValueError("state must be a JSON object")
    if data.get("version") != STATE_VERSION:
        raise ValueError(f"version: must be {STATE_VERSION}, got {data.get('version')!r}")
    try:
        return CallState.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "state"
        raise ValueError(" ".join(f"{where}: {err['msg']}".split())[:300]) from None
