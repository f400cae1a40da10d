"""Configuration models (pydantic). Built explicitly by callers; no globals."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Endpoint(BaseModel):
    """An IP address and UDP port."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    addr: str
    port: int = Field(ge=1, le=65535)

    @field_validator("addr")
    @classmethod
    def _valid_ip(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            raise ValueError(f"not an IP address: {v!r}") from None

    @property
    def family(self) -> int:
        return 10 if ipaddress.ip_address(self.addr).version == 6 else 2

    def as_tuple(self) -> tuple[str, int]:
        return (self.addr, self.port)


class DatapathConfig(BaseModel):
    """What the XDP fast path serves and where its state lives."""

    model_config = ConfigDict(extra="forbid")
    pin_dir: Path = Path("/sys/fs/bpf/splitrelay")
    interfaces: list[str] = Field(default_factory=list, description="interfaces the XDP program attaches to")
    xdp_mode: Literal["auto", "native", "generic"] = "auto"
    vips: list[Endpoint] = Field(default_factory=list, description="public relay address:port pairs")
    internal_addr4: str | None = None
    internal_addr6: str | None = None
    flow_port_min: int = Field(default=20000, ge=1024, le=65535)
    flow_port_max: int = Field(default=59999, ge=1024, le=65535)
    max_flows: int = Field(default=1 << 20, ge=16, le=1 << 26)
    max_reverse: int = Field(default=1 << 20, ge=16, le=1 << 26)
    max_owners: int = Field(default=1 << 18, ge=16, le=1 << 24)

    @field_validator("internal_addr4")
    @classmethod
    def _v4(cls, v: str | None) -> str | None:
        if v is not None and not isinstance(ipaddress.ip_address(v), ipaddress.IPv4Address):
            raise ValueError(f"not an IPv4 address: {v!r}")
        return v

    @field_validator("internal_addr6")
    @classmethod
    def _v6(cls, v: str | None) -> str | None:
        if v is not None and not isinstance(ipaddress.ip_address(v), ipaddress.IPv6Address):
            raise ValueError(f"not an IPv6 address: {v!r}")
        return v

    @field_validator("pin_dir")
    @classmethod
    def _in_bpffs(cls, v: Path) -> Path:
        if not str(v).startswith("/sys/fs/bpf/"):
            raise ValueError(f"must be a directory under /sys/fs/bpf (bpffs), got {v}")
        return v

    @model_validator(mode="after")
    def _ranges(self) -> "DatapathConfig":
        if self.flow_port_min > self.flow_port_max:
            raise ValueError(f"flow_port_min {self.flow_port_min} is above flow_port_max {self.flow_port_max}")
        for vip in self.vips:
            if self.flow_port_min <= vip.port <= self.flow_port_max:
                raise ValueError(f"VIP port {vip.port} lies inside the flow-port range")
        return self
