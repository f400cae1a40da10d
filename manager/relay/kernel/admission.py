"""What the relay's XDP admission enforces (the admit_cfg entry): the rates
of set-up traffic reaching the slow path, and what one source is; and the
SYN rate per source at the ICE-TCP listeners (tcp_listeners)."""

from __future__ import annotations

import ipaddress
import struct

from manager.relay.config import DatapathConfig, TcpConfig
from manager.relay.kernel.structs import AdmitConfig, ProxyPrefix, SynLimit, VipKey, vip_key

DEFAULT_SOURCE_PREFIX = (32, 64)  # limits.source_prefix_v4 / _v6 defaults


def _gcra(rate: float, burst: int) -> tuple[int, int]:
    """(interval, burst tolerance) in ns for `rate` packets/s with `burst` at once; (0, 0): unlimited."""
    if rate <= 0:
        return 0, 0
    interval = max(1, round(1e9 / rate))
    return interval, max(0, burst - 1) * interval


def _mask_words(prefix: int, bits: int) -> list[int]:
    """The prefix's mask as __be32 words (raw values as the kernel loads them)."""
    mask = int(ipaddress.ip_network(f"{'::' if bits == 128 else '0.0.0.0'}/{prefix}").netmask)
    raw = mask.to_bytes(bits // 8, "big")
    return [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]


def admit_config(cfg: DatapathConfig, cpus: int, source_prefix: tuple[int, int] = DEFAULT_SOURCE_PREFIX) -> AdmitConfig:
    """The admit_cfg entry: the per-source rate, the global budget split among
    the CPUs, the per-call and per-SSRC rates, and the source prefixes
    (IPv4, IPv6; XDP keys an IPv6 source by at most its /64)."""
    cpus = max(1, cpus)
    v4, v6 = source_prefix
    if not (0 <= v4 <= 32 and 0 <= v6 <= 128):
        raise ValueError(f"source prefixes /{v4} (IPv4) and /{v6} (IPv6) must be at most /32 and /128")
    # XDP's source key holds an IPv6 source's first 64 bits: longer prefixes
    # are its /64 there (the slow path's own buckets behind it take the rest).
    v6 = min(v6, 64)
    src_interval, src_burst = _gcra(cfg.admit_source_rate, cfg.admit_source_burst)
    cpu_interval, cpu_burst = _gcra(cfg.admit_budget / cpus, max(1, cfg.admit_budget_burst // cpus))
    call_interval, call_burst = _gcra(cfg.admit_call_rate, cfg.admit_call_burst)
    rebind_interval, rebind_burst = _gcra(cfg.admit_rebind_rate, cfg.admit_rebind_burst)
    ac = AdmitConfig(source_interval_ns=src_interval, source_burst_ns=src_burst,
                     cpu_interval_ns=cpu_interval, cpu_burst_ns=cpu_burst,
                     call_interval_ns=call_interval, call_burst_ns=call_burst,
                     rebind_interval_ns=rebind_interval, rebind_burst_ns=rebind_burst,
                     source_mask4=_mask_words(v4, 32)[0])
    ac.source_mask6[:] = _mask_words(v6, 128)[:2]
    return ac


def tcp_listeners(cfg: DatapathConfig, tcp: TcpConfig | None) -> dict[bytes, tuple[VipKey, SynLimit]]:
    """The tcp_listeners entries: each VIP address at tcp.port (relayd's
    ICE-TCP listeners) with the SYN rate of one source there, by key bytes.
    None (ICE-TCP off): no listener, no SYN limited."""
    if tcp is None:
        return {}
    interval, burst = _gcra(tcp.syn_rate_per_source, tcp.syn_burst_per_source)
    keys = (vip_key((addr, tcp.port)) for addr in dict.fromkeys(v.addr for v in cfg.vips))
    return {bytes(k): (k, SynLimit(interval_ns=interval, burst_ns=burst)) for k in keys}


def syn_trusted(tcp: TcpConfig | None) -> dict[bytes, ProxyPrefix]:
    """The syn_trusted entries: tcp.trusted_proxies as LPM keys (IPv4 as
    ::ffff:a.b.c.d/96+n), by key bytes."""
    out = {}
    for prefix in tcp.trusted_proxies if tcp is not None else ():
        net = ipaddress.ip_network(prefix, strict=False)
        if net.version == 4:
            net = ipaddress.ip_network(f"::ffff:{net.network_address}/{96 + net.prefixlen}")
        key = ProxyPrefix(prefixlen=net.prefixlen)
        key.addr[:] = list(struct.unpack("<4I", net.network_address.packed))
        out[bytes(key)] = key
    return out
