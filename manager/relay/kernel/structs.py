"""ctypes mirrors of bpf/structs.h, and the counter names of bpf/consts.h.

tests/bpf/test_structs_layout.py holds every structure here against the type
information bcc derives from the C header for each map, field by field.
Addresses are 16 bytes in network order (IPv4 in the first 4); ports are
__be16, stored here as the raw 16-bit value (socket.htons).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import ipaddress
import re
import socket
from importlib import resources
from pathlib import Path

from manager.protocol.addresses import AF_INET, AF_INET6, family_of, parse_ip  # noqa: F401 - re-exported for the kernel views

# The C sources ship inside the package (pyproject maps manager.relay.kernel.bpf
# onto bpf/): a real directory, as bcc takes file paths and -I flags.
BPF_DIR = Path(str(resources.files("manager.relay.kernel.bpf")))
BPF_TESTING_DIR = BPF_DIR / "testing"


Addr4 = ctypes.c_uint32 * 4


class FlowKey(ctypes.Structure):
    """Client tuple as seen on the public side (flows map key)."""

    _fields_ = [
        ("family", ctypes.c_uint8),
        ("pad0", ctypes.c_uint8),
        ("client_port", ctypes.c_uint16),
        ("relay_port", ctypes.c_uint16),
        ("pad1", ctypes.c_uint16),
        ("client_addr", Addr4),
        ("relay_addr", Addr4),
    ]


class FlowKey4(ctypes.Structure):
    """An IPv4 client tuple (flows4 map key), in the packet's order."""

    _fields_ = [
        ("client_addr", ctypes.c_uint32),
        ("relay_addr", ctypes.c_uint32),
        ("client_port", ctypes.c_uint16),
        ("relay_port", ctypes.c_uint16),
    ]


class NextHop(ctypes.Structure):
    """A route XDP cached for one direction of a flow (struct nexthop)."""

    _fields_ = [
        ("until_ns", ctypes.c_uint64),
        ("ifindex", ctypes.c_uint32),
        ("epoch", ctypes.c_uint32),
        ("dmac", ctypes.c_uint8 * 6),
        ("smac", ctypes.c_uint8 * 6),
        ("csum_l3", ctypes.c_uint16),
        ("csum_l4", ctypes.c_uint16),
        ("dst4", ctypes.c_uint32),
        ("dport", ctypes.c_uint16),
        ("pad0", ctypes.c_uint16),
    ]


class RtpStats(ctypes.Structure):
    """Media accounting of one direction of a flow (struct rtp_stats)."""

    _fields_ = [
        ("ssrc", ctypes.c_uint32),
        ("base_seq", ctypes.c_uint32),
        ("max_seq", ctypes.c_uint32),
        ("received", ctypes.c_uint32),
        ("reordered", ctypes.c_uint32),
        ("jitter", ctypes.c_uint32),
        ("transit", ctypes.c_uint32),
        ("pad0", ctypes.c_uint32),
    ]


class FlowInfo(ctypes.Structure):
    """One established flow (flows map value)."""

    _fields_ = [
        ("conn_id", ctypes.c_uint32),
        ("flow_port", ctypes.c_uint16),
        ("flow_addr", ctypes.c_uint16),
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("last_seen_ns", ctypes.c_uint64),
        ("created_ns", ctypes.c_uint64),
        ("ssrc", ctypes.c_uint32),
        ("slot", ctypes.c_uint32),
        ("nh", NextHop),
        ("rtp", RtpStats),
    ]


class OwnerInfo(ctypes.Structure):
    """Current owner of a connection id (owners map value, in the call's slot)."""

    _fields_ = [
        ("addr4", ctypes.c_uint32),
        ("port4", ctypes.c_uint16),
        ("port6", ctypes.c_uint16),
        ("addr6", Addr4),
        ("generation", ctypes.c_uint32),
        ("conn_id", ctypes.c_uint32),
    ]


class ReverseKey(ctypes.Structure):
    """(owner addr:port, flow source): reverse map key."""

    _fields_ = [
        ("family", ctypes.c_uint8),
        ("pad0", ctypes.c_uint8),
        ("owner_port", ctypes.c_uint16),
        ("flow_port", ctypes.c_uint16),
        ("flow_addr", ctypes.c_uint16),
        ("owner_addr", Addr4),
    ]


class ReverseInfo(ctypes.Structure):
    """Return-path value: client tuple to restore and the call."""

    _fields_ = [
        ("client", FlowKey),
        ("conn_id", ctypes.c_uint32),
        ("slot", ctypes.c_uint32),
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("last_seen_ns", ctypes.c_uint64),
        ("nh", NextHop),
        ("rtp", RtpStats),
    ]


class VipKey(ctypes.Structure):
    """A public relay address:port (vips map key)."""

    _fields_ = [
        ("family", ctypes.c_uint8),
        ("pad0", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("addr", Addr4),
    ]


class RelayConfig(ctypes.Structure):
    """Per-family pool of internal addresses and flow-port range (relay_cfg value)."""

    _fields_ = [
        ("internal_addr", Addr4),
        ("flow_port_min", ctypes.c_uint16),
        ("flow_port_max", ctypes.c_uint16),
        ("addr_count", ctypes.c_uint32),
    ]


class AdmitConfig(ctypes.Structure):
    """Slow-path admission rates (admit_cfg value; GCRA intervals and bursts in ns)."""

    _fields_ = [
        ("source_interval_ns", ctypes.c_uint64),
        ("source_burst_ns", ctypes.c_uint64),
        ("cpu_interval_ns", ctypes.c_uint64),
        ("cpu_burst_ns", ctypes.c_uint64),
        ("call_interval_ns", ctypes.c_uint64),
        ("call_burst_ns", ctypes.c_uint64),
        ("rebind_interval_ns", ctypes.c_uint64),
        ("rebind_burst_ns", ctypes.c_uint64),
        ("source_mask4", ctypes.c_uint32),
        ("source_mask6", ctypes.c_uint32 * 2),
        ("pad0", ctypes.c_uint32),
    ]


UFRAG_LEN = 24  # bpf/consts.h (held against manager.protocol.ufrag by a test)


class UfragKey(ctypes.Structure):
    """A live call's server ufrag (live_ufrags key)."""

    _fields_ = [("ufrag", ctypes.c_uint8 * UFRAG_LEN)]


class SourceKey(ctypes.Structure):
    """A source address under its prefix, IPv6 at most /64 (admit_sources and syn_sources key)."""

    _fields_ = [
        ("family", ctypes.c_uint32),
        ("addr", ctypes.c_uint32 * 2),
    ]


class AdmitBucket(ctypes.Structure):
    """One admission bucket (admit_sources / admit_budget value)."""

    _fields_ = [("tat_ns", ctypes.c_uint64)]


class SynLimit(ctypes.Structure):
    """The SYN rate of one source at an ICE-TCP listener (tcp_listeners value; GCRA in ns)."""

    _fields_ = [("interval_ns", ctypes.c_uint64), ("burst_ns", ctypes.c_uint64)]


class ProxyPrefix(ctypes.Structure):
    """A trusted proxy prefix (syn_trusted LPM key); IPv4 as ::ffff:a.b.c.d, prefixlen in bits of addr."""

    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", Addr4)]


class ClockCopy(ctypes.Structure):
    """One CPU's copy of the coarse clock (clock map value; not pinned)."""

    _fields_ = [("jiffies", ctypes.c_uint64), ("ns", ctypes.c_uint64)]


class StatValue(ctypes.Structure):
    """One per-CPU counter slot (stats map value)."""

    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


# Map name → (key type, value type); the layout test walks this table.
MAP_TYPES: dict[str, tuple[type, type]] = {
    "flows4": (FlowKey4, FlowInfo),
    "flows6": (FlowKey, FlowInfo),
    "owners": (ctypes.c_uint32, OwnerInfo),
    "epochs": (ctypes.c_uint32, ctypes.c_uint32),
    "reverse": (ReverseKey, ReverseInfo),
    "vips": (VipKey, ctypes.c_uint32),
    "relay_cfg": (ctypes.c_uint32, RelayConfig),
    "if_roles": (ctypes.c_uint32, ctypes.c_uint32),
    "admit_cfg": (ctypes.c_uint32, AdmitConfig),
    "admit_sources": (SourceKey, AdmitBucket),
    "admit_budget": (ctypes.c_uint32, AdmitBucket),
    "live_ufrags": (UfragKey, AdmitBucket),
    "rebind_ssrcs": (ctypes.c_uint32, AdmitBucket),
    "tcp_listeners": (VipKey, SynLimit),
    "syn_sources": (SourceKey, AdmitBucket),
    "syn_trusted": (ProxyPrefix, ctypes.c_uint32),
    "layout": (ctypes.c_uint32, ctypes.c_uint64),
    "ssrcs": (ctypes.c_uint32, FlowKey),
    "stats": (ctypes.c_uint32, StatValue),
}
# Maps of the program that are not pinned (caches each load rebuilds), held
# against bcc's types like the others.
UNPINNED_MAP_TYPES: dict[str, tuple[type, type]] = {"clock": (ctypes.c_uint32, ClockCopy)}
PERCPU_MAPS = frozenset({"admit_budget", "stats", "clock"})
ROLE_PUBLIC, ROLE_INTERNAL = 1, 2  # bpf/consts.h
# BPF map types (uapi/linux/bpf.h enum bpf_map_type) as bpf/maps.h declares them.
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_HASH = 1, 2, 6, 9
BPF_MAP_TYPE_LPM_TRIE = 11
MAP_KINDS: dict[str, int] = {
    "flows4": BPF_MAP_TYPE_LRU_HASH,
    "flows6": BPF_MAP_TYPE_LRU_HASH,
    "owners": BPF_MAP_TYPE_ARRAY,
    "epochs": BPF_MAP_TYPE_ARRAY,
    "reverse": BPF_MAP_TYPE_LRU_HASH,
    "vips": BPF_MAP_TYPE_HASH,
    "relay_cfg": BPF_MAP_TYPE_ARRAY,
    "if_roles": BPF_MAP_TYPE_ARRAY,
    "admit_cfg": BPF_MAP_TYPE_ARRAY,
    "admit_sources": BPF_MAP_TYPE_LRU_HASH,
    "admit_budget": BPF_MAP_TYPE_PERCPU_ARRAY,
    "live_ufrags": BPF_MAP_TYPE_LRU_HASH,
    "rebind_ssrcs": BPF_MAP_TYPE_LRU_HASH,
    "tcp_listeners": BPF_MAP_TYPE_HASH,
    "syn_sources": BPF_MAP_TYPE_LRU_HASH,
    "syn_trusted": BPF_MAP_TYPE_LPM_TRIE,
    "layout": BPF_MAP_TYPE_ARRAY,
    "ssrcs": BPF_MAP_TYPE_LRU_HASH,
    "stats": BPF_MAP_TYPE_PERCPU_ARRAY,
}


def _shape(t: type) -> list:
    """Field names, offsets and sizes of a ctypes type, nested; scalars by size."""
    if hasattr(t, "_fields_"):
        return [(name, getattr(t, name).offset, ctypes.sizeof(ft), _shape(ft)) for name, ft, *_ in t._fields_]
    if hasattr(t, "_length_"):
        return ["[]", t._length_, _shape(t._type_)]
    return [ctypes.sizeof(t)]


def type_shape(t: type) -> list:
    """A ctypes type's layout as layout_hash sees it (two types of one shape
    hold the same bytes with the same meaning)."""
    return _shape(t)


def layout_hash(map_types: dict[str, tuple[type, type]], map_kinds: dict[str, int]) -> int:
    """What the layout map holds: any change to a map's kind, key or value
    layout (a renamed field too: its meaning changed) gives another value."""
    shape = [(name, map_kinds[name], _shape(k), _shape(v)) for name, (k, v) in sorted(map_types.items())]
    return int.from_bytes(hashlib.sha256(repr(shape).encode()).digest()[:8], "little") or 1


LAYOUT_HASH: int = layout_hash(MAP_TYPES, MAP_KINDS)


def _read_stat_names() -> list[str]:
    """Counter names in enum stat_id order, read from the C header itself."""
    text = (BPF_DIR / "consts.h").read_text()
    body = re.search(r"enum stat_id\s*\{(.*?)\};", text, re.S)
    if body is None:
        raise RuntimeError("bpf/consts.h has no enum stat_id")
    names = re.findall(r"^\s*STAT_([A-Z0-9_]+)", re.sub(r"/\*.*?\*/", "", body.group(1)), re.M)
    if names[-1] != "MAX":
        raise RuntimeError("enum stat_id must end with STAT_MAX")
    return [n.lower() for n in names[:-1]]


STAT_NAMES: list[str] = _read_stat_names()
STAT_INDEX: dict[str, int] = {n: i for i, n in enumerate(STAT_NAMES)}


def stat_verdict(name: str) -> str:
    """'pass', 'drop' or 'forward', from the counter's name."""
    return {"pass": "pass", "drop": "drop", "fwd": "forward"}[name.split("_", 1)[0]]


def stat_labels(name: str) -> tuple[str, str, str]:
    """(verdict, reason, payload class) of a counter: 'fwd_in_rtp' is
    ('forward', 'in_rtp', 'rtp'); reasons that are not per class get 'none'."""
    reason = name.partition("_")[2]
    cls = next((c for c in ("stun", "dtls", "rtp") if reason.endswith("_" + c)), "none")
    return stat_verdict(name), reason, cls


# --- address helpers -----------------------------------------------------------

def pack_addr(addr: str) -> Addr4:
    """An address as the 16-byte network-order form used in every struct."""
    return Addr4.from_buffer_copy(parse_ip(addr).packed.ljust(16, b"\0"))


def unpack_addr(words: Addr4, family: int) -> str:
    raw = bytes(words)
    return str(ipaddress.ip_address(raw[:4] if family == AF_INET else raw))


@functools.lru_cache(maxsize=1 << 16)
def pack_addr4(addr: str) -> int:
    """An IPv4 address as the raw __be32 value."""
    return int.from_bytes(ipaddress.IPv4Address(addr).packed, "little")


@functools.lru_cache(maxsize=1 << 16)
def unpack_addr4(value: int) -> str:
    return str(ipaddress.IPv4Address(value.to_bytes(4, "little")))


def htons(port: int) -> int:
    return socket.htons(port)


ntohs = socket.ntohs


def flow_key(client: tuple[str, int], vip: tuple[str, int]) -> FlowKey:
    fam = family_of(client[0])
    if family_of(vip[0]) != fam:
        raise ValueError(f"client {client[0]} and relay address {vip[0]} are of different families")
    return FlowKey(family=fam, client_port=htons(client[1]), relay_port=htons(vip[1]),
                   client_addr=pack_addr(client[0]), relay_addr=pack_addr(vip[0]))


# struct flow_key4 → struct flow_key, as bytes (the walk of a million flows
# widens every key: slices, not ctypes objects).
_FLOW_KEY_HEAD4 = bytes([AF_INET, 0])
_PAD2, _PAD12 = bytes(2), bytes(12)
FLOW_KEY4_SIZE = ctypes.sizeof(FlowKey4)


def flow_key4(key: FlowKey) -> FlowKey4:
    """The flows4 key of an IPv4 flow key."""
    return FlowKey4(client_addr=key.client_addr[0], relay_addr=key.relay_addr[0],
                    client_port=key.client_port, relay_port=key.relay_port)


def widen_key4(raw: bytes) -> bytes:
    """bytes(FlowKey) of a flows4 key given as bytes."""
    return b"".join((_FLOW_KEY_HEAD4, raw[8:12], _PAD2, raw[0:4], _PAD12, raw[4:8], _PAD12))


def flow_key_tuple(key: FlowKey) -> tuple[tuple[str, int], tuple[str, int]]:
    """(client (addr, port), vip (addr, port)) of a flows key."""
    return ((unpack_addr(key.client_addr, key.family), ntohs(key.client_port)),
            (unpack_addr(key.relay_addr, key.family), ntohs(key.relay_port)))


def reverse_key(owner: tuple[str, int], flow_port: int, flow_addr: int = 0) -> ReverseKey:
    return ReverseKey(family=family_of(owner[0]), owner_port=htons(owner[1]), flow_port=htons(flow_port),
                      flow_addr=flow_addr, owner_addr=pack_addr(owner[0]))


def vip_key(vip: tuple[str, int]) -> VipKey:
    return VipKey(family=family_of(vip[0]), port=htons(vip[1]), addr=pack_addr(vip[0]))
