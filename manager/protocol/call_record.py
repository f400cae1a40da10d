"""The record a call leaves when it ends: one JSON object, versioned.

It joins what each side saw: the relay's kernel counts per flow (client ⇄
relay), the transceivers' RTCP figures of the whole path (``path``: what the
transceiver measured of the client's RTP, and what the client's receiver
reports say of ours, with the round trip), the moves between transceivers and
the call's timeline. A hop's loss is the part of the path's loss the relay
locates there (manager.relay.record_build). ``schema`` is bumped on an incompatible change;
readers skip records of a schema they do not know.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA = 1
AnonymiseMode = Literal["full", "prefix", "none"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamFigures(_Model):
    """One direction of one hop."""

    packets: int = 0
    bytes: int = 0
    expected: int | None = None  # RTP packets the sequence numbers say were sent
    lost: int | None = None
    loss_fraction: float | None = None
    reordered: int | None = None
    jitter_ms: float | None = None


class HopFigures(_Model):
    """Both directions of one hop and its round-trip time where measured."""

    uplink: StreamFigures = Field(default_factory=StreamFigures)  # towards the agent
    downlink: StreamFigures = Field(default_factory=StreamFigures)  # towards the client
    rtt_ms: float | None = None


class Move(_Model):
    """A migration or a failover, with the gap the media had."""

    kind: Literal["migration", "failover"]
    at: float
    from_transceiver: int | None = None
    to_transceiver: int | None = None
    from_relay: str | None = None
    to_relay: str | None = None
    gap_ms: float | None = None


class MosFigures(_Model):
    min: float | None = None
    min_at: float | None = None
    avg: float | None = None


class ClientInfo(_Model):
    family: Literal["ipv4", "ipv6"] | None = None
    transport: Literal["udp", "tcp"] | None = None
    address: str | None = None


class CallRecord(_Model):
    schema_: int = Field(default=SCHEMA, alias="schema")
    call_id: str
    conn_id: int | None = None
    created_at: float
    connected_at: float | None = None
    ended_at: float
    end_reason: str
    client: ClientInfo = Field(default_factory=ClientInfo)
    transceivers: list[int] = Field(default_factory=list)
    relays: list[str] = Field(default_factory=list)
    moves: list[Move] = Field(default_factory=list)
    client_relay: HopFigures = Field(default_factory=HopFigures)
    relay_transceiver: HopFigures = Field(default_factory=HopFigures)
    path: HopFigures = Field(default_factory=HopFigures)  # client ⇄ transceiver, as the transceivers' RTCP says
    mos: MosFigures = Field(default_factory=MosFigures)
    connect_ms: float | None = None
    first_audio_ms: float | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)

    @classmethod
    def from_json(cls, text: str) -> CallRecord:
        return cls.model_validate_json(text)


def anonymise(address: str | None, mode: AnonymiseMode) -> str | None:
    """The client address as the config allows: whole, its network (/24, /48) or nothing."""
    if address is None or mode == "none":
        return None
    if mode == "full":
        return address
    ip = ipaddress.ip_address(address)
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
