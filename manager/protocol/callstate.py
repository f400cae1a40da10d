"""The exported state of a call: what a new owner needs to take a live call
over (docs/migration.md). One versioned schema, written by every export path
(a call placed on a transceiver, and a call that was itself imported) and
read by import. relayd passes it through untouched, only over mutual TLS.

Secrets (ICE passwords, the DTLS exporter output, SRTP master keys and
salts) are present only in an export for migration; `without_secrets()`
drops them for anything shown or logged.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from manager.protocol.api import OwnerBody

STATE_VERSION = 1
U32_MAX = 0xFFFFFFFF
_ICE_CHARS = re.compile(r"^[A-Za-z0-9+/]{4,256}$")  # RFC 8445 ice-chars, aioice's length rule
_HEX = re.compile(r"^(?:[0-9a-f]{2})*$")


# What without_secrets() removes, by section.
SECRET_FIELDS = {"ice": ("local_pwd", "remote_pwd"), "srtp": ("keying_material", "tx_key", "rx_key")}


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


class DtlsState(_Model):
    role: Literal["client", "server"] | None = None
    state: str
    version: str | None = None
    cipher: str | None = None
    local_fingerprints: list[Fingerprint] = Field(default_factory=list)
    remote_fingerprints: list[Fingerprint] = Field(default_factory=list)
    srtp_profile: str | None = None


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


class RtpState(_Model):
    tx: dict[str, RtpStream] = Field(default_factory=dict)  # by SSRC, decimal
    rx: dict[str, RtpStream] = Field(default_factory=dict)


class RtcpState(_Model):
    tx_srtcp_index: dict[str, int] = Field(default_factory=dict)  # per sender SSRC: next SRTCP index
    rx_packets: dict[str, int] = Field(default_factory=dict)


class SctpState(_Model):
    mid: str | None = None
    state: str
    port: int = Field(ge=0, le=65535)


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
        """A copy fit to show or log: passwords, exporter output and keys removed."""
        ice = self.ice.model_copy(update={"local_pwd": None, "remote_pwd": None})
        srtp = None if self.srtp is None else SrtpState(profile=self.srtp.profile)
        return self.model_copy(update={"ice": ice, "srtp": srtp})

    def to_json(self) -> dict[str, Any]:
        """The JSON object relayd carries from export to import. A secret that
        is absent is left out altogether, not written as null."""
        data = self.model_dump(mode="json")
        for section, names in SECRET_FIELDS.items():
            part = data.get(section)
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
