"""Configuration models (pydantic). Built explicitly by callers; no globals."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from manager.pki import read_secret_file
from manager.protocol.keyring import KeyRing, parse_ring
from manager.protocol.sources import SourceKey

from .config_fleet import MetricsConfig, RecordsConfig, RegistryConfig, TelemetryConfig


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
    public_interfaces: list[str] = Field(default_factory=list,
                                         description="of those, the public side (clients); the rest are internal")
    xdp_mode: Literal["auto", "native", "generic"] = "auto"
    xdp_replace: bool = Field(default=False, description="replace a foreign XDP program found on an interface "
                                                        "(else attaching there is refused)")
    vips: list[Endpoint] = Field(default_factory=list, description="public relay address:port pairs")
    internal_addr4: str | None = None
    internal_addr6: str | None = None
    # A flow's source towards its owner is (pool address, port): each address
    # of the pool adds a whole port range of concurrent flows.
    internal_addr_count: int = Field(default=1, ge=1, le=65535,
                                     description="consecutive internal addresses from internal_addr4/6, per family")
    # Below Kubernetes' NodePorts (30000-32767) and Linux's ephemeral ports
    # (32768-60999): relayd refuses a range the kernel may hand out (port_ranges).
    flow_port_min: int = Field(default=10000, ge=1024, le=65535)
    flow_port_max: int = Field(default=29999, ge=1024, le=65535)
    max_flows: int = Field(default=1 << 20, ge=16, le=1 << 26, description="IPv4 client tuples (the flows4 map)")
    max_flows6: int = Field(default=1 << 18, ge=16, le=1 << 26, description="IPv6 client tuples (the flows6 map)")
    max_reverse: int = Field(default=1 << 20, ge=16, le=1 << 26)
    max_owners: int = Field(default=1 << 18, ge=16, le=1 << 24)
    # Set-up traffic reaching the slow path, enforced in XDP (0: unlimited).
    admit_source_rate: float = Field(default=20.0, ge=0,
                                     description="STUN checks/s per source (limits.source_prefix_v4/_v6)")
    admit_source_burst: int = Field(default=20, ge=1, description="checks a source may send at once")
    admit_budget: float = Field(default=20000.0, ge=0, description="STUN checks/s to the slow path, all sources")
    admit_budget_burst: int = Field(default=2000, ge=1, description="checks at once, all sources")
    # Checks of one live call (its server ufrag), wherever they come from: a
    # call's own ufrag replayed from many tuples spends only its own bucket.
    admit_call_rate: float = Field(default=100.0, ge=0, description="STUN checks/s per live call")
    admit_call_burst: int = Field(default=50, ge=1, description="checks of one call at once")
    # Media from unknown tuples carrying a live SSRC (NAT rebinding candidates),
    # per SSRC: a spoofing flood from random sources passes only this.
    admit_rebind_rate: float = Field(default=20.0, ge=0, description="rebind candidates/s per SSRC")
    admit_rebind_burst: int = Field(default=10, ge=1, description="rebind candidates of one SSRC at once")

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

    @property
    def flow_ports(self) -> int:
        return self.flow_port_max - self.flow_port_min + 1

    def flow_plan(self) -> int:
        """Concurrent flows the address and port plan allows, all families."""
        families = sum(1 for a in (self.internal_addr4, self.internal_addr6) if a)
        return families * self.flow_plan_per_family()

    def flow_plan_per_family(self) -> int:
        """Concurrent flows the plan allows in one family (its pool x its ports)."""
        return self.internal_addr_count * self.flow_ports

    def pool(self, base: str) -> list[str]:
        """The pool of internal addresses that starts at base."""
        first = ipaddress.ip_address(base)
        return [str(first + i) for i in range(self.internal_addr_count)]

    @field_validator("pin_dir")
    @classmethod
    def _in_bpffs(cls, v: Path) -> Path:
        # Resolved first (symlinks, ..): "/sys/fs/bpf/../../tmp" is no bpffs path.
        real = Path(os.path.realpath(v))
        if not real.is_relative_to("/sys/fs/bpf") or real == Path("/sys/fs/bpf"):
            raise ValueError(f"must be a directory under /sys/fs/bpf (bpffs), got {v}"
                             + (f" (resolves to {real})" if real != v else ""))
        return real

    @model_validator(mode="after")
    def _ranges(self) -> DatapathConfig:
        if self.flow_port_min > self.flow_port_max:
            raise ValueError(f"flow_port_min {self.flow_port_min} is above flow_port_max {self.flow_port_max}")
        for vip in self.vips:
            if self.flow_port_min <= vip.port <= self.flow_port_max:
                raise ValueError(f"VIP port {vip.port} lies inside the flow-port range")
        for name in ("internal_addr4", "internal_addr6"):
            base = getattr(self, name)
            if base is None:
                continue
            word = int(ipaddress.ip_address(base)) & 0xFFFFFFFF  # the word XDP counts up
            if word + self.internal_addr_count - 1 > 0xFFFFFFFF:
                raise ValueError(f"{name}: {self.internal_addr_count} addresses from {base} run past the end "
                                 f"of its last 32 bits")
        unknown = [i for i in self.public_interfaces if i not in self.interfaces]
        if unknown:
            raise ValueError(f"public_interfaces: {unknown[0]!r} is not one of interfaces {self.interfaces}")
        return self


# The key of docs/relayd.example.toml: a copied example must not go live.
EXAMPLE_HINT_KEY = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
PRIVATE_PREFIXES = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]


def proxy_prefixes(v: list[str]) -> list[str]:
    """Trusted proxies' addresses or prefixes, normalised; a clear error for anything else."""
    out = []
    for p in v:
        try:
            out.append(str(ipaddress.ip_network(p, strict=False)))
        except ValueError:
            raise ValueError(f"not an address or prefix: {p!r}") from None
    return out


# Trusted proxies' prefixes, as a config field (signaling.trusted_proxies, tcp.trusted_proxies).
ProxyPrefixes = Annotated[list[str], AfterValidator(proxy_prefixes)]


class SignalingConfig(BaseModel):
    """The public listener: clients' SDP offers (create, end, update their own call)."""

    model_config = ConfigDict(extra="forbid")
    host: str = "0.0.0.0"
    # More addresses to listen on (e.g. the IPv6 VIP beside the IPv4 one).
    extra_hosts: list[str] = Field(default_factory=list, description="more addresses to listen on")
    port: int = Field(default=8080, ge=1, le=65535)
    allowed_origins: list[str] = Field(default_factory=list,
                                       description="CORS: origins whose pages may post offers (default none)")
    page: bool = Field(default=False, description="serve the 'talk to the agent' page at / (demos, not production)")
    transceiver_timeout: float = Field(default=10.0, gt=0, description="seconds to wait for a transceiver's answer")
    heartbeat_timeout: float = Field(default=3.0, gt=0, description="a silent transceiver is unhealthy after this")
    stop_deadline: float = Field(default=10.0, ge=0, description="on SIGTERM, seconds to finish the placements "
                                 "in flight (their calls' first kernel flows) before exiting")
    # A reverse proxy in front (TLS): its X-Forwarded-For names the client.
    # From any other peer the header is ignored (a client could name anyone).
    trusted_proxies: ProxyPrefixes = Field(default_factory=list,
                                           description="prefixes of proxies whose X-Forwarded-For is believed")


class InternalConfig(BaseModel):
    """The transceivers' listener (registration, heartbeat): mutual TLS only,
    on an internal address. relayd reaches transceivers' control APIs with the
    same certificate."""

    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=1, le=65535)
    pki_dir: Path = Field(default=Path("/etc/splitrelay/pki"),
                          description="ca.pem, relayd.pem and relayd.key (0600), from `relayctl pki`")
    prefixes: list[str] = Field(default_factory=lambda: list(PRIVATE_PREFIXES),
                                description="owner and control addresses of transceivers must lie in these")

    @field_validator("host")
    @classmethod
    def _ip(cls, v: str) -> str:
        return str(ipaddress.ip_address(v))

    @field_validator("prefixes")
    @classmethod
    def _nets(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one prefix is needed")
        return [str(ipaddress.ip_network(p, strict=False)) for p in v]

    def allows(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(p) for p in self.prefixes)


class ClientAuthConfig(BaseModel):
    """Who may create calls on the public listener (WHIP-style bearer credentials)."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["off", "api_keys", "tokens"] = "off"
    api_keys_file: Path | None = Field(default=None, description="mode api_keys: one key per line, file mode 0600")
    token_key_file: Path | None = Field(default=None, description="mode tokens: hex HMAC key (>= 32 bytes) or its "
                                        "key ring (relayctl keys), 0600")
    max_calls_per_subject: int = Field(default=4, ge=1,
                                       description="mode tokens: live calls at once per token subject")

    @model_validator(mode="after")
    def _files(self) -> ClientAuthConfig:
        if self.mode == "api_keys" and self.api_keys_file is None:
            raise ValueError("api_keys_file: needed with mode = 'api_keys'")
        if self.mode == "tokens" and self.token_key_file is None:
            raise ValueError("token_key_file: needed with mode = 'tokens'")
        return self


class LimitsConfig(BaseModel):
    """Bounds on call creation (each refusal is a clear 4xx)."""

    model_config = ConfigDict(extra="forbid")
    create_rate: float = Field(default=2.0, gt=0, description="calls per second per source address")
    create_burst: int = Field(default=10, ge=1, description="calls a source may create at once")
    max_pending: int = Field(default=64, ge=1, description="calls being placed at once (all sources)")
    max_pending_per_source: int = Field(default=4, ge=1, description="calls being placed at once per source")
    max_body: int = Field(default=64 * 1024, ge=1024, le=1 << 20, description="bytes of an SDP offer")
    max_media_sections: int = Field(default=8, ge=1, le=64)
    max_sdp_lines: int = Field(default=400, ge=20, le=10000)
    max_ice_restarts_per_minute: int = Field(default=10, ge=1, le=600,
                                             description="ICE restarts by PATCH per call in any 60 s (a storm: 429)")
    # What one source is, for every per-source limit (create, pending, slow
    # path, ICE-TCP; XDP's per-source buckets read the same two fields).
    source_prefix_v4: int = Field(default=32, ge=8, le=32, description="IPv4 clients in one such prefix are one source")
    source_prefix_v6: int = Field(default=64, ge=16, le=128,
                                  description="IPv6 clients in one such prefix are one source (a site gets a /64)")

    def source_key(self) -> SourceKey:
        return SourceKey(self.source_prefix_v4, self.source_prefix_v6)


class SlowPathConfig(BaseModel):
    """Userspace handling of call set-up on the public port."""

    model_config = ConfigDict(extra="forbid")
    idle_timeout: float = Field(default=30.0, gt=0, description="a flow idle both ways this long is removed")
    pending_timeout: float = Field(default=5.0, gt=0, description="a client tuple never authenticated is dropped")
    max_legs_per_call: int = Field(default=4, ge=1, description="client tuples (flow ports) one call may hold")
    max_pending_per_source: int = Field(default=8, ge=1,
                                        description="unauthenticated client tuples per source address")
    # A backstop behind XDP's admission: whatever still reaches the public
    # socket (a packet XDP passes up) costs a token of its source's bucket.
    source_rate: float = Field(default=50.0, ge=0, description="packets/s per source the public socket handles "
                                                              "(0: unlimited)")
    source_burst: int = Field(default=100, ge=1, description="packets a source may send at once")
    # NAT-rebinding checks (media from a new tuple, asked of the owner) per call.
    rebind_call_rate: float = Field(default=5.0, gt=0, description="owner media checks/s per call")
    rebind_call_burst: int = Field(default=8, ge=1, description="owner media checks of one call at once")


class TcpConfig(BaseModel):
    """ICE-TCP for clients that cannot use UDP: RFC 6544 passive candidates on
    the VIPs' addresses, RFC 4571 framing, bridged to the owner over UDP."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    port: int = Field(default=443, ge=1, le=65535, description="TCP port on every VIP address")
    max_connections: int = Field(default=10000, ge=1, description="bridged connections at once, all sources")
    max_per_source: int = Field(default=8, ge=1, description="connections at once per source (limits.source_prefix_*)")
    accept_rate_per_source: float = Field(default=4.0, gt=0, description="new connections/s per source; beyond, reset")
    accept_burst_per_source: int = Field(default=16, ge=1, description="new connections a source may open at once")
    # In XDP, before the kernel answers: SYNs beyond are dropped unanswered.
    # Above the accept rate, so a client's retransmitted SYN rarely meets it
    # and the accept rate (a reset) stays the refusal a client sees.
    syn_rate_per_source: float = Field(default=8.0, ge=0, description="TCP SYNs/s per source to the ICE-TCP port, "
                                                                      "enforced in XDP (0: unlimited)")
    syn_burst_per_source: int = Field(default=32, ge=1, description="SYNs a source may send at once")
    # A TCP proxy in front: its connections start with a PROXY protocol header
    # (v1 or v2) naming the client, whom the per-source limits then count. Only
    # from these; from them the header is required.
    trusted_proxies: ProxyPrefixes = Field(default_factory=list,
                                           description="prefixes of proxies whose PROXY protocol header is believed")
    handshake_timeout: float = Field(default=5.0, gt=0,
                                     description="seconds until the owner's STUN success (first frame included)")
    idle_timeout: float = Field(default=30.0, gt=0, description="seconds with no frame either way")
    max_frame: int = Field(default=4096, ge=576, le=65535, description="largest RFC 4571 frame accepted, bytes")
    write_buffer: int = Field(default=256 * 1024, ge=4096,
                              description="bytes queued to a slow client before frames to it are dropped")


class RelaydConfig(BaseModel):
    """Everything relayd needs; built from a file, the environment, or code."""

    model_config = ConfigDict(extra="forbid")
    hint_key: str | None = Field(default=None, description="hex key shared with transceivers for routing hints "
                                 "(>= 16 bytes); prefer hint_key_file or SPLITRELAY__HINT_KEY")
    hint_key_file: Path | None = Field(default=None, description="file (mode 0600) holding the hex hint key, or "
                                       "its key ring ('<id> <hex key> [sign]' a line; relayctl keys)")
    datapath: DatapathConfig
    signaling: SignalingConfig = Field(default_factory=SignalingConfig)
    internal: InternalConfig = Field(default_factory=InternalConfig)
    client_auth: ClientAuthConfig = Field(default_factory=ClientAuthConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    slowpath: SlowPathConfig = Field(default_factory=SlowPathConfig)
    tcp: TcpConfig = Field(default_factory=TcpConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    records: RecordsConfig = Field(default_factory=RecordsConfig)
    control_socket: Path = Path("/run/splitrelay/relayd.sock")
    detach_on_exit: bool = Field(default=False, description="remove the fast path on stop (default: leave it running)")
    _hint_ring: KeyRing | None = PrivateAttr(default=None)

    @field_validator("hint_key")
    @classmethod
    def _hex_key(cls, v: str | None) -> str | None:
        return None if v is None else check_hint_key(v)

    @model_validator(mode="after")
    def _key_source(self) -> RelaydConfig:
        if (self.hint_key is None) == (self.hint_key_file is None):
            raise ValueError("hint_key_file: give the routing-hint key as hint_key_file (or hint_key / "
                             "SPLITRELAY__HINT_KEY), exactly one of them")
        if self.hint_key_file is not None:
            text = read_secret_file(self.hint_key_file).decode("ascii", "replace")
            ring = parse_ring(text, min_length=16, what=str(self.hint_key_file))
            for kid in ring.ids:
                check_hint_key(ring.get(kid).hex())  # type: ignore[union-attr]
            self._hint_ring = ring
            self.hint_key = ring.signing_key.hex()  # the key that signs, as a plain key shows it
        else:
            assert self.hint_key is not None
            self._hint_ring = KeyRing.single(bytes.fromhex(self.hint_key))
        return self

    def start_warnings(self) -> list[str]:
        """What relayd warns about as it starts (allowed, but unsafe in production)."""
        out = []
        public = [v.addr for v in self.datapath.vips if ipaddress.ip_address(v.addr).is_global]
        if self.client_auth.mode == "off" and public:
            out.append(f"client_auth.mode = 'off' on public VIP {public[0]}: anyone who reaches the signaling "
                       "listener can create calls; set mode 'tokens' or 'api_keys' outside a lab")
        return out

    @property
    def hint_key_bytes(self) -> bytes:
        """The signing key of the hint key ring."""
        return self.hint_ring.signing_key

    @property
    def hint_ring(self) -> KeyRing:
        """The routing-hint keys: the signing one and every one that verifies."""
        assert self._hint_ring is not None
        return self._hint_ring

    @property
    def metrics_host(self) -> str:
        return self.metrics.host if self.metrics.host is not None else self.internal.host

    @model_validator(mode="after")
    def _served(self) -> RelaydConfig:
        if not self.datapath.vips:
            raise ValueError("datapath.vips: at least one public address:port is needed")
        fams = {v.family for v in self.datapath.vips}
        if 2 in fams and not self.datapath.internal_addr4:
            raise ValueError("datapath.internal_addr4: needed for the IPv4 VIPs")
        if 10 in fams and not self.datapath.internal_addr6:
            raise ValueError("datapath.internal_addr6: needed for the IPv6 VIPs")
        dp = self.datapath
        plan = dp.flow_plan()
        # More flow sources than entries and the LRU maps would evict live
        # flows to make room for new ones.
        # Each family's flows have a map of their own; return entries share one.
        one = dp.flow_plan_per_family()
        needs = [("max_flows", one, "IPv4 ") if dp.internal_addr4 else None,
                 ("max_flows6", one, "IPv6 ") if dp.internal_addr6 else None,
                 ("max_reverse", plan, "")]
        for name, wanted, fam in filter(None, needs):
            if getattr(dp, name) < wanted:
                raise ValueError(
                    f"datapath.{name}: {getattr(dp, name)} entries cannot hold the {wanted} {fam}flows the address "
                    f"and port plan allows ({dp.internal_addr_count} internal address(es) x {dp.flow_ports} ports x "
                    f"{wanted // one} family(ies)); raise it or narrow the plan")
        return self


def check_hint_key(v: str) -> str:
    try:
        raw = bytes.fromhex(v)
    except ValueError:
        raise ValueError("must be hexadecimal") from None
    if len(raw) < 16:
        raise ValueError(f"must be at least 16 bytes (32 hex digits), got {len(raw)} bytes")
    if v.lower() == EXAMPLE_HINT_KEY:
        raise ValueError("is the example key from docs/relayd.example.toml; generate your own "
                         "(python3 -c 'import secrets; print(secrets.token_hex(32))')")
    return v


class ConfigError(ValueError):
    """A configuration problem, worded for the operator (field, value, reason)."""


ENV_PREFIX = "SPLITRELAY__"


def _env_overrides(environ: dict[str, str]) -> dict:
    """SPLITRELAY__SECTION__FIELD=value → nested dict; JSON values are decoded
    (lists, numbers, booleans), anything else is taken as a string."""
    out: dict = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        if not path:
            continue
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: conflicts with another override")
        node[path[-1]] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def format_validation_error(exc) -> str:
    """One line per problem: `field.path: value: reason`."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            lines.append(f"{loc}: required field is missing")
        else:
            lines.append(f"{loc}: {err.get('input')!r}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path | None, environ: dict[str, str] | None = None) -> RelaydConfig:
    """Read a TOML or YAML file, apply SPLITRELAY__* environment overrides,
    validate. Raises ConfigError with every problem named."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
        try:
            if p.suffix in (".yaml", ".yml"):
                import yaml  # noqa: PLC0415 - only for YAML files

                data = yaml.safe_load(text) or {}
            else:
                import tomllib  # noqa: PLC0415

                data = tomllib.loads(text)
        except ImportError:
            raise ConfigError(f"{p}: YAML needs PyYAML (python3-yaml); use TOML instead") from None
        except Exception as exc:  # parser errors carry line numbers
            raise ConfigError(f"{p}: not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'TOML'}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a table/mapping")
        if "hint_key" in data and p.stat().st_mode & 0o077:
            raise ConfigError(f"{p}: holds hint_key but its mode {p.stat().st_mode & 0o777:04o} lets others read "
                              "it; chmod 600 it, or move the key to hint_key_file")
    _merge(data, _env_overrides(dict(os.environ if environ is None else environ)))
    try:
        return RelaydConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
