"""Every map layout a relayd has shipped, by the hash its maps carry
(layout[0]), so a newer relayd can read pinned maps of an older one.

A layout is the table of map types (name → key and value ctypes) and map
kinds; its hash is structs.layout_hash of them. A past layout's types are
frozen here: tests/unit/test_upgrade_conversions.py holds each hash to the
value its relayd wrote, so a change to a shared struct cannot silently
change what an old layout means. The conversions between layouts are in
conversions.py.

Changing a map's layout (a field, a struct, a map added or dropped):
  1. freeze the shipped layout's changed types here as the next past
     version, and its hash (what `LAYOUT_HASH` printed before the change)
     into SHIPPED;
  2. add its Conversion to conversions.CONVERSIONS (a map added needs none:
     it starts empty), and a test of it;
  3. name a commit that shipped it in tests/support/previous_release.py,
     so tests/netns/test_upgrade.py takes over from that release.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from manager.relay.kernel.structs import (
    MAP_KINDS,
    MAP_TYPES,
    PERCPU_MAPS,
    STAT_NAMES,
    FlowKey,
    NextHop,
    layout_hash,
)


@dataclass(frozen=True)
class Layout:
    """One shipped set of map layouts."""

    name: str
    map_types: dict[str, tuple[type, type]]
    map_kinds: dict[str, int]
    # The stats map's counters in enum stat_id order: its index is a name
    # the hash does not see, so a layout names them (conversions remap).
    stat_names: tuple[str, ...] = ()

    @property
    def hash(self) -> int:
        return layout_hash(self.map_types, self.map_kinds)

    def percpu(self, name: str) -> bool:
        return name in PERCPU_MAPS


# --- v1: before per-flow media accounting -------------------------------------------

class FlowInfoV1(ctypes.Structure):
    """struct flow_info without its rtp_stats."""

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
    ]


class ReverseInfoV1(ctypes.Structure):
    """struct reverse_info without its rtp_stats."""

    _fields_ = [
        ("client", FlowKey),
        ("conn_id", ctypes.c_uint32),
        ("slot", ctypes.c_uint32),
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("last_seen_ns", ctypes.c_uint64),
        ("nh", NextHop),
    ]


# Maps v2 added (the ICE-TCP SYN limit): v1 had none of them.
_ADDED_IN_V2 = ("tcp_listeners", "syn_sources", "syn_trusted")

V1_STAT_NAMES = (
    "pass_not_relay", "pass_fragment", "pass_ipv6_ext", "pass_vlan", "pass_no_neigh", "pass_fib_fail",
    "pass_stun_unknown", "pass_return_unknown", "pass_rebind", "pass_owner_race", "drop_malformed",
    "drop_ip_options", "drop_fragment", "drop_ipv6_ext", "drop_ttl_zero", "drop_unknown_not_stun", "drop_not_owner",
    "drop_no_owner", "drop_bad_class", "drop_no_internal_addr", "drop_stun_malformed", "drop_stun_not_binding",
    "drop_stun_no_username", "drop_stun_bad_ufrag", "drop_wrong_side", "drop_stun_unknown_ufrag",
    "drop_stun_call_rate", "drop_stun_rate", "drop_stun_budget", "drop_rebind_call_rate", "drop_rebind_rate",
    "drop_rebind_budget", "fwd_in_stun", "fwd_in_dtls", "fwd_in_rtp", "fwd_out_stun", "fwd_out_dtls", "fwd_out_rtp",
)

V1 = Layout("v1", {**{n: t for n, t in MAP_TYPES.items() if n not in _ADDED_IN_V2},
                   "flows4": (MAP_TYPES["flows4"][0], FlowInfoV1),
                   "flows6": (MAP_TYPES["flows6"][0], FlowInfoV1),
                   "reverse": (MAP_TYPES["reverse"][0], ReverseInfoV1)},
            {n: k for n, k in MAP_KINDS.items() if n not in _ADDED_IN_V2}, V1_STAT_NAMES)

# --- v2: per-flow media accounting (struct rtp_stats in flow_info and reverse_info),
# the ICE-TCP SYN limit's maps, and its two counters (pass_tcp_syn, drop_tcp_syn_rate) --

V2 = Layout("v2", MAP_TYPES, MAP_KINDS, tuple(STAT_NAMES))

CURRENT = V2
# The layout hash each shipped relayd wrote (tests hold the frozen types to them).
SHIPPED: dict[str, int] = {"v1": 0xF5FBEEA00128C7CE}
LAYOUTS: dict[int, Layout] = {layout.hash: layout for layout in (V1, V2)}
