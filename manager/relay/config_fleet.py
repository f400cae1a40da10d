"""The sections of relayd's configuration about the fleet and what it reports:
the registry (one relay's memory, or Redis shared by a fleet), Prometheus
metrics, traces and call records. Part of :mod:`manager.relay.config`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from manager.observability.tracing import check_endpoint
from manager.pki import read_secret_file


class MetricsConfig(BaseModel):
    """Prometheus endpoint; port 0 disables it. Host None: the internal address."""

    model_config = ConfigDict(extra="forbid")
    host: str | None = None
    port: int = Field(default=9100, ge=0, le=65535)


class RegistryConfig(BaseModel):
    """Where relayd keeps transceivers, calls and ownership: in its own memory
    (one relay), or in Redis shared by a fleet of relays."""

    model_config = ConfigDict(extra="forbid")
    backend: Literal["memory", "redis"] = "memory"
    url: str | None = Field(default=None, description="redis://host:port/db, rediss:// (TLS) or unix:///path.sock")
    password_file: Path | None = Field(default=None, description="file (mode 0600) holding the Redis password")
    username: str | None = Field(default=None, description="Redis ACL user (default: the default user)")
    tls_ca_file: Path | None = Field(default=None, description="rediss://: CA that signed the server's certificate")
    tls_cert_file: Path | None = Field(default=None, description="rediss://: client certificate (mutual TLS)")
    tls_key_file: Path | None = Field(default=None, description="rediss://: client key (mode 0600)")
    key_prefix: str = Field(default="splitrelay", pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                            description="prefix of every key and channel (several fleets on one Redis)")
    relay_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                                 description="this relay's name in the fleet (default: the host name)")
    ttl: float = Field(default=30.0, ge=3, le=86400,
                       description="seconds an entry outlives the last refresh by its relay or transceiver")
    timeout: float = Field(default=1.0, gt=0, le=30, description="seconds to wait for one Redis operation")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        scheme = v.partition("://")[0]
        if scheme not in ("redis", "rediss", "unix") or "://" not in v:
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return v

    @model_validator(mode="after")
    def _complete(self) -> RegistryConfig:
        if self.backend == "redis" and not self.url:
            raise ValueError("url: needed with backend = 'redis'")
        tls = [n for n in ("tls_ca_file", "tls_cert_file", "tls_key_file") if getattr(self, n) is not None]
        if tls and not (self.url or "").startswith("rediss://"):
            raise ValueError(f"{tls[0]}: only used with a rediss:// URL")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file: give tls_cert_file and tls_key_file together")
        return self

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        return read_secret_file(self.password_file).decode("utf-8", "replace").strip()


class TelemetryConfig(BaseModel):
    """Traces (manager.observability.tracing): off unless an endpoint is given."""

    model_config = ConfigDict(extra="forbid")
    otlp_endpoint: str | None = Field(default=None, description="OTLP/HTTP collector, e.g. http://collector:4318 "
                                      "(spans go to its /v1/traces); unset: no traces")

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        return None if v is None else check_endpoint(v)


class RecordsConfig(BaseModel):
    """Call records (docs/call-records.md): one JSON line per ended call in a
    rotated file, and in a fleet also a capped Redis stream."""

    model_config = ConfigDict(extra="forbid")
    path: Path | None = Field(default=None, description="JSON-lines file of call records (None: no file)")
    max_bytes: int = Field(default=64 << 20, ge=4096, description="size at which the file is rotated")
    backups: int = Field(default=5, ge=0, le=1000, description="rotated files kept (path.1 ... path.N)")
    state_path: Path | None = Field(default=None, description="open calls' accounts kept over a restart "
                                    "(default: path + '.open.json'; a fleet keeps them in Redis)")
    anonymise: Literal["full", "prefix", "none"] = Field(
        default="full", description="client address in records: whole, its /24 or /48, or left out")
    stream: bool = Field(default=True, description="in a fleet, also XADD each record to {key_prefix}:records")
    stream_cap: int = Field(default=100_000, ge=100, description="records the stream keeps (MAXLEN ~)")

    def open_state(self) -> Path | None:
        if self.state_path is not None:
            return self.state_path
        return None if self.path is None else self.path.with_name(self.path.name + ".open.json")
