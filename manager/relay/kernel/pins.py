"""The pinned maps: opening them, and refusing pinned maps this relayd
cannot use (another map type, size or layout) before anything is touched.

State lives in bpffs under the configured pin directory:
  <pin_dir>/{flows4,flows6,owners,reverse,vips,...}    maps (structs.MAP_TYPES)
  <pin_dir>/prog                                         the loaded program
  <pin_dir>/link_<interface>                             its XDP attachments (attach.py)
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from pathlib import Path

from manager.relay.config import DatapathConfig
from manager.relay.kernel import libbpf
from manager.relay.kernel.errors import DatapathError
from manager.relay.kernel.flow_table import FlowTable
from manager.relay.kernel.structs import LAYOUT_HASH, MAP_KINDS, MAP_TYPES, PERCPU_MAPS, STAT_NAMES

PROG_PIN = "prog"
MAX_VIPS = 64  # bpf/consts.h defaults (the loader does not override them)
MAX_IFINDEX = 4096  # if_roles is an array indexed by ifindex (bpf/consts.h)
MAX_SOURCES = 65536
MAX_REBIND_SSRCS = 65536
MAX_SYN_SOURCES = 65536
MAX_TRUSTED_PROXIES = 64


@dataclass
class Maps:
    """The pinned maps, opened through libbpf."""

    flows4: libbpf.PinnedMap
    flows6: libbpf.PinnedMap
    owners: libbpf.PinnedMap
    epochs: libbpf.PinnedMap
    reverse: libbpf.PinnedMap
    vips: libbpf.PinnedMap
    relay_cfg: libbpf.PinnedMap
    if_roles: libbpf.PinnedMap
    admit_cfg: libbpf.PinnedMap
    admit_sources: libbpf.PinnedMap
    admit_budget: libbpf.PinnedMap
    live_ufrags: libbpf.PinnedMap
    rebind_ssrcs: libbpf.PinnedMap
    tcp_listeners: libbpf.PinnedMap
    syn_sources: libbpf.PinnedMap
    syn_trusted: libbpf.PinnedMap
    layout: libbpf.PinnedMap
    ssrcs: libbpf.PinnedMap
    stats: libbpf.PinnedMap
    flows: FlowTable = field(init=False)  # flows4 and flows6 by struct flow_key

    def __post_init__(self) -> None:
        self.flows = FlowTable(self.flows4, self.flows6)

    @classmethod
    def open(cls, pin_dir: Path) -> Maps:
        opened: dict[str, libbpf.PinnedMap] = {}
        try:
            for name, (k, v) in MAP_TYPES.items():
                path = pin_dir / name
                if not path.exists():
                    raise DatapathError(f"no pinned map at {path}: is the relay datapath loaded?")
                opened[name] = libbpf.PinnedMap(str(path), k, v, percpu=name in PERCPU_MAPS)
        except Exception:
            for m in opened.values():
                m.close()
            raise
        return cls(**opened)

    def close(self) -> None:
        for name in MAP_TYPES:
            getattr(self, name).close()


def expected_max_entries(cfg: DatapathConfig) -> dict[str, int]:
    return {"flows4": cfg.max_flows, "flows6": cfg.max_flows6, "owners": cfg.max_owners,
            "epochs": cfg.max_owners, "reverse": cfg.max_reverse,
            "vips": MAX_VIPS, "relay_cfg": 2, "if_roles": MAX_IFINDEX,
            "admit_cfg": 1, "admit_sources": MAX_SOURCES, "admit_budget": 1, "layout": 2,
            "live_ufrags": cfg.max_owners, "rebind_ssrcs": MAX_REBIND_SSRCS,
            "tcp_listeners": MAX_VIPS, "syn_sources": MAX_SYN_SOURCES,
            "syn_trusted": MAX_TRUSTED_PROXIES,
            "ssrcs": cfg.max_flows,
            "stats": len(STAT_NAMES)}


def check_pinned_maps(cfg: DatapathConfig) -> None:
    """Refuse, before anything is touched, pinned maps this program and
    config cannot use: another map type, key or value size (a struct
    layout changed), or size (max_entries). bcc would otherwise reuse or
    fail on them in ways that lose state or make no sense."""
    pin_dir = Path(cfg.pin_dir)
    wanted = expected_max_entries(cfg)
    check_layout(pin_dir)
    for name, (key_type, value_type) in MAP_TYPES.items():
        path = pin_dir / name
        if not path.exists():
            continue
        fd = libbpf.obj_get(str(path))
        try:
            info = libbpf.map_info(fd)
        finally:
            os.close(fd)
        problems = []
        if info.type != MAP_KINDS[name]:
            problems.append(f"map type {info.type}, not {MAP_KINDS[name]}")
        if (info.key_size, info.value_size) != (ctypes.sizeof(key_type), ctypes.sizeof(value_type)):
            problems.append(f"key/value sizes {info.key_size}/{info.value_size}, not "
                            f"{ctypes.sizeof(key_type)}/{ctypes.sizeof(value_type)} (the struct layout changed)")
        if info.max_entries != wanted[name]:
            problems.append(f"max_entries {info.max_entries}, not {wanted[name]}")
        if problems:
            raise DatapathError(
                f"pinned map {path} does not fit this relayd: {'; '.join(problems)}. Restore the config it "
                f"was made with, or remove {pin_dir} (this drops the established flows)")


def check_layout(pin_dir: Path) -> None:
    """Pinned maps must carry a layout hash (structs.LAYOUT_HASH): same
    sizes can still mean other fields (a pad that became a field). Another
    relayd's layout is not for adoption: load() takes over from it
    (takeover.py) or refuses it."""
    pinned = [name for name in MAP_TYPES if (pin_dir / name).exists()]
    if pinned and "layout" not in pinned:
        raise DatapathError(f"pinned maps in {pin_dir} carry no layout hash (made by an older relayd). Restore "
                            f"the relayd that made them, or remove {pin_dir} (this drops the established flows)")
    found, _ = pinned_layout(pin_dir)
    if found not in (None, 0, LAYOUT_HASH):
        raise DatapathError(f"pinned maps in {pin_dir} have map layout {found:016x}, this relayd "
                            f"{LAYOUT_HASH:016x}")


def pinned_layout(pin_dir: Path) -> tuple[int | None, int]:
    """(layout hash, program source digest) the pinned maps carry; None: no
    layout map pinned. 0: not written (a load that stopped before configure(),
    or a layout map of one entry: no digest)."""
    path = pin_dir / "layout"
    if not path.exists():
        return None, 0
    with libbpf.PinnedMap(str(path), ctypes.c_uint32, ctypes.c_uint64) as m:
        values = [m.lookup(ctypes.c_uint32(i)) if i < m.max_entries else None for i in (0, 1)]
    return tuple(v.value if v is not None else 0 for v in values)  # type: ignore[return-value]


def pinned_prog_id(pin_dir: Path) -> int | None:
    """The id of the program pinned in pin_dir, if any."""
    try:
        fd = libbpf.obj_get(str(pin_dir / PROG_PIN))
    except OSError:
        return None
    try:
        return libbpf.prog_info(fd).id
    finally:
        os.close(fd)


def unpin_all(pin_dir: Path) -> None:
    """Remove the program, maps and links pinned in pin_dir, and the directory."""
    names = ([PROG_PIN, f"{PROG_PIN}_new", *MAP_TYPES, *(p.name for p in pin_dir.glob("link_*"))]
             if pin_dir.is_dir() else [])
    for name in names:
        try:
            (pin_dir / name).unlink()
        except FileNotFoundError:
            pass
    try:
        pin_dir.rmdir()
    except OSError:
        pass
