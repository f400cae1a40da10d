"""The XDP fast path from userspace: compile and load (bcc), attach or adopt,
typed access to the pinned maps (libbpf), detach.

State lives in bpffs under the configured pin directory:
  <pin_dir>/{flows4,flows6,owners,reverse,vips,...}    maps (structs.MAP_TYPES)
  <pin_dir>/prog                                         the attached program
so a restarted manager adopts what is running instead of replacing it.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from manager.protocol.addresses import OwnerAddr, fmt_ep
from manager.relay.config import DatapathConfig
from manager.relay.kernel import libbpf
from manager.relay.kernel.flow_table import FlowTable
from manager.relay.kernel.structs import (
    AF_INET6,
    BPF_DIR,
    LAYOUT_HASH,
    MAP_KINDS,
    MAP_TYPES,
    PERCPU_MAPS,
    ROLE_INTERNAL,
    ROLE_PUBLIC,
    STAT_NAMES,
    UFRAG_LEN,
    AdmitBucket,
    AdmitConfig,
    FlowInfo,
    FlowKey,
    NextHop,
    OwnerInfo,
    RelayConfig,
    ReverseInfo,
    ReverseKey,
    UfragKey,
    flow_key,
    flow_key_tuple,
    htons,
    ntohs,
    pack_addr,
    pack_addr4,
    reverse_key,
    unpack_addr,
    unpack_addr4,
    vip_key,
)

log = logging.getLogger(__name__)

PROG_SOURCE = BPF_DIR / "relay.bpf.c"
PROG_NAME = "xdp_relay"
PROG_PIN = "prog"
MAX_VIPS = 64  # bpf/consts.h defaults (the loader does not override them)
MAX_IFINDEX = 4096  # if_roles is an array indexed by ifindex (bpf/consts.h)
MAX_SOURCES = 65536

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
# IFLA_XDP_ATTACHED, as a number or as pyroute2's decoded name.
XDP_ATTACHED_MODES = {1: "native", 2: "generic", 3: "offload", 4: "multi",
                      "xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload", "xdpmulti": "multi"}

DEFAULT_HEADERS_ROOT = "/var/lib/splitrelay/kernel-headers"


class DatapathError(RuntimeError):
    """A datapath operation failed for a reason the operator can act on."""


def ensure_kernel_headers() -> str | None:
    """Point bcc at usable kernel headers when the running kernel has none.

    scripts/setup.sh merges Debian's split header packages into one tree;
    bcc takes a single directory through BCC_KERNEL_SOURCE.
    """
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return os.environ["BCC_KERNEL_SOURCE"]
    release = os.uname().release
    # The running kernel's own headers: one tree, or Debian's split (build holds
    # the -amd64 part, source the -common part), which bcc follows by itself.
    if any(os.path.exists(f"/lib/modules/{release}/{part}/include/linux/kconfig.h") for part in ("build", "source")):
        return None
    root = os.environ.get("SPLITRELAY_HEADERS_DIR", DEFAULT_HEADERS_ROOT)
    merged = sorted(p for p in glob.glob(os.path.join(root, "*")) if os.path.exists(os.path.join(p, ".complete")))
    if not merged:
        raise DatapathError(f"no kernel headers for {release} and none prepared under {root}: run `make setup`")
    os.environ["BCC_KERNEL_SOURCE"] = merged[-1]
    return merged[-1]


@dataclass
class Flow:
    """One kernel flow as listed from the maps."""

    client: tuple[str, int]
    vip: tuple[str, int]
    conn_id: int
    flow_port: int
    packets_in: int
    bytes_in: int
    packets_out: int = 0
    bytes_out: int = 0
    last_seen_ns: int = 0
    created_ns: int = 0
    flow_addr: int = 0  # index into the family's pool of internal addresses
    ssrc: int = 0       # first RTP SSRC from the client (host order); 0: none yet

    def to_dict(self) -> dict:
        return {
            "client": f"{fmt_ep(*self.client)}", "vip": fmt_ep(*self.vip), "conn_id": self.conn_id,
            "flow_port": self.flow_port, "flow_addr": self.flow_addr, "ssrc": self.ssrc,
            "packets_in": self.packets_in, "bytes_in": self.bytes_in,
            "packets_out": self.packets_out, "bytes_out": self.bytes_out,
            "idle_s": round(max(0, time.monotonic_ns() - self.last_seen_ns) / 1e9, 3) if self.last_seen_ns else None,
        }


@dataclass
class AttachResult:
    interface: str
    mode: str          # native / generic
    adopted: bool      # the same program was already attached


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


def _gcra(rate: float, burst: int) -> tuple[int, int]:
    """(interval, burst tolerance) in ns for `rate` packets/s with `burst` at once; (0, 0): unlimited."""
    if rate <= 0:
        return 0, 0
    interval = max(1, round(1e9 / rate))
    return interval, max(0, burst - 1) * interval


def admit_config(cfg: DatapathConfig, cpus: int) -> AdmitConfig:
    """The admit_cfg entry: the per-source rate, and the global budget split among the CPUs."""
    cpus = max(1, cpus)
    src_interval, src_burst = _gcra(cfg.admit_source_rate, cfg.admit_source_burst)
    cpu_interval, cpu_burst = _gcra(cfg.admit_budget / cpus, max(1, cfg.admit_budget_burst // cpus))
    call_interval, call_burst = _gcra(cfg.admit_call_rate, cfg.admit_call_burst)
    return AdmitConfig(source_interval_ns=src_interval, source_burst_ns=src_burst,
                       cpu_interval_ns=cpu_interval, cpu_burst_ns=cpu_burst,
                       call_interval_ns=call_interval, call_burst_ns=call_burst)


class Datapath:
    """Owns the relay's XDP program and maps for one pin directory."""

    def __init__(self, cfg: DatapathConfig):
        self.cfg = cfg
        self.pin_dir = Path(cfg.pin_dir)
        self.maps: Maps | None = None
        self.prog_fd: int = -1
        # Reverse entries by the client tuple they restore (bytes of FlowKey →
        # bytes of ReverseKey), so removing a flow needs no walk of the map.
        # Built by one walk when the maps open; the expiry thread shares it.
        self._rev_index: dict[bytes, set[bytes]] = {}
        self._rev_lock = threading.Lock()
        # Each call's slot in the owners array (connection id → index) and the
        # free slots, rebuilt from the array when the maps open.
        self._slots: dict[int, int] = {}
        self._free_slots: list[int] = []
        self._slot_lock = threading.Lock()
        # load() makes this the maps' writer (relayd): its index is the truth.
        # A reader (open_maps: relayctl, tests) may see calls the writer made
        # since, and reads the array again for a call it does not know.
        self._writer = False

    # --- lifecycle ------------------------------------------------------------------

    def cflags(self) -> list[str]:
        return [
            f"-I{BPF_DIR}",
            f'-DPIN_DIR="{self.pin_dir}"',
            f"-DMAX_FLOWS={self.cfg.max_flows}",
            f"-DMAX_FLOWS6={self.cfg.max_flows6}",
            f"-DMAX_REVERSE={self.cfg.max_reverse}",
            f"-DMAX_OWNERS={self.cfg.max_owners}",
        ]

    def compile_and_load(self) -> int:
        """Compile the program with bcc and load it; maps are created or reused
        from the pin directory. Returns a program fd owned by this object."""
        ensure_kernel_headers()
        try:
            from bcc import BPF  # noqa: PLC0415 - slow to import; only loading needs it
        except ImportError as exc:
            raise DatapathError("bcc is not importable: install python3-bpfcc (run `make setup`)") from exc
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        try:
            bpf = BPF(src_file=str(PROG_SOURCE).encode(), cflags=self.cflags())
            fn = bpf.load_func(PROG_NAME.encode(), BPF.XDP)
        except Exception as exc:
            raise DatapathError(f"cannot load {PROG_SOURCE.name}: {exc}") from exc
        # Keep our own reference; bcc's object (and its fds) can then go.
        fd = os.dup(fn.fd)
        bpf.cleanup()
        return fd

    def expected_max_entries(self) -> dict[str, int]:
        return {"flows4": self.cfg.max_flows, "flows6": self.cfg.max_flows6, "owners": self.cfg.max_owners,
                "epochs": self.cfg.max_owners, "reverse": self.cfg.max_reverse,
                "vips": MAX_VIPS, "relay_cfg": 2, "if_roles": MAX_IFINDEX,
                "admit_cfg": 1, "admit_sources": MAX_SOURCES, "admit_budget": 1, "layout": 1,
                "live_ufrags": self.cfg.max_owners,
                "ssrcs": self.cfg.max_flows,
                "stats": len(STAT_NAMES)}

    def check_pinned_maps(self) -> None:
        """Refuse, before anything is touched, pinned maps this program and
        config cannot use: another map type, key or value size (a struct
        layout changed), or size (max_entries). bcc would otherwise reuse or
        fail on them in ways that lose state or make no sense."""
        wanted = self.expected_max_entries()
        self._check_layout()
        for name, (key_type, value_type) in MAP_TYPES.items():
            path = self.pin_dir / name
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
                    f"was made with, or remove {self.pin_dir} (this drops the established flows)")

    def _check_layout(self) -> None:
        """Pinned maps must carry this relayd's layout hash (structs.LAYOUT_HASH):
        same sizes can still mean other fields (a pad that became a field)."""
        pinned = [name for name in MAP_TYPES if (self.pin_dir / name).exists()]
        if not pinned:
            return
        fix = (f"Restore the relayd that made them, or remove {self.pin_dir} (this drops the established flows)")
        if "layout" not in pinned:
            raise DatapathError(f"pinned maps in {self.pin_dir} carry no layout hash (made by an older relayd). {fix}")
        with libbpf.PinnedMap(str(self.pin_dir / "layout"), ctypes.c_uint32, ctypes.c_uint64) as m:
            found = m.lookup(ctypes.c_uint32(0))
        value = found.value if found is not None else 0
        # 0: created by a load that stopped before configure() wrote the hash.
        if value not in (0, LAYOUT_HASH):
            raise DatapathError(f"pinned maps in {self.pin_dir} have map layout {value:016x}, this relayd "
                                f"{LAYOUT_HASH:016x}. {fix}")

    def load(self, *, upgrade: bool = False) -> bool:
        """Make the program and maps available. Adopts a pinned program unless
        `upgrade` asks to load the current source. Returns True if adopted.
        Pinned maps that do not fit are refused first (check_pinned_maps)."""
        self.check_pinned_maps()
        pinned = self.pin_dir / PROG_PIN
        adopted = False
        if pinned.exists() and not upgrade:
            self.prog_fd = libbpf.obj_get(str(pinned))
            adopted = True
        else:
            new_fd = self.compile_and_load()
            if pinned.exists():
                old = libbpf.obj_get(str(pinned))
                same = bytes(libbpf.prog_info(old).tag) == bytes(libbpf.prog_info(new_fd).tag)
                if same:
                    os.close(new_fd)
                    new_fd, adopted = old, True
                else:
                    os.close(old)
                    pinned.unlink()
            if not adopted:
                libbpf.obj_pin(new_fd, str(pinned))
            self.prog_fd = new_fd
        self.maps = Maps.open(self.pin_dir)
        self.configure()
        self.rebuild_reverse_index()
        self.rebuild_slots()
        self._writer = True
        return adopted

    def configure(self) -> None:
        """Write VIPs and per-family internal addressing into the maps."""
        assert self.maps is not None
        wanted = {bytes(vip_key(v.as_tuple())) for v in self.cfg.vips}
        for k in list(self.maps.vips.keys()):
            if bytes(k) not in wanted:
                self.maps.vips.delete(k)
        for v in self.cfg.vips:
            self.maps.vips.update(vip_key(v.as_tuple()), ctypes.c_uint32(1))
        for idx, addr in ((0, self.cfg.internal_addr4), (1, self.cfg.internal_addr6)):
            rc = RelayConfig(flow_port_min=self.cfg.flow_port_min, flow_port_max=self.cfg.flow_port_max,
                             addr_count=self.cfg.internal_addr_count if addr else 0)
            if addr:
                rc.internal_addr = pack_addr(addr)
            self.maps.relay_cfg.update(ctypes.c_uint32(idx), rc)
        self.maps.layout.update(ctypes.c_uint32(0), ctypes.c_uint64(LAYOUT_HASH))
        self.maps.admit_cfg.update(ctypes.c_uint32(0), admit_config(self.cfg, libbpf.possible_cpus()))
        if self.cfg.public_interfaces:
            # Resolved here, in relayd's network namespace.
            self.set_roles({socket.if_nametoindex(name): ROLE_PUBLIC if name in self.cfg.public_interfaces
                            else ROLE_INTERNAL for name in self.cfg.interfaces})

    def set_roles(self, roles: dict[int, int]) -> None:
        """Ingress ifindex → ROLE_PUBLIC / ROLE_INTERNAL; interfaces not listed lose theirs."""
        too_big = [i for i in roles if not 0 < i < MAX_IFINDEX]
        if too_big:
            raise DatapathError(f"interface index {too_big[0]} is beyond the {MAX_IFINDEX} the role map holds")
        m = self._m().if_roles
        for ifindex in range(MAX_IFINDEX):
            want = roles.get(ifindex, 0)
            cur = m.lookup(ctypes.c_uint32(ifindex))
            if cur is None or cur.value != want:
                m.update(ctypes.c_uint32(ifindex), ctypes.c_uint32(want))

    def attach(self, interfaces: list[str] | None = None) -> list[AttachResult]:
        """Attach the program to each interface (native where the driver can,
        else generic), adopting an existing attachment of the same program."""
        if self.prog_fd < 0:
            raise DatapathError("load() the program before attaching it")
        prog_id = libbpf.prog_info(self.prog_fd).id
        results = []
        for ifname in interfaces if interfaces is not None else self.cfg.interfaces:
            cur_id, cur_mode = xdp_attachment(ifname)
            if cur_id == prog_id:
                results.append(AttachResult(ifname, cur_mode or "?", True))
                continue
            results.append(AttachResult(ifname, self._attach_one(ifname, cur_mode), False))
        return results

    def _attach_one(self, ifname: str, cur_mode: str | None) -> str:
        from bcc.libbcc import lib as bcclib  # noqa: PLC0415 - bcc only where needed

        modes = {"native": [XDP_FLAGS_DRV_MODE], "generic": [XDP_FLAGS_SKB_MODE],
                 "auto": [XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE]}[self.cfg.xdp_mode]
        # Replacing an attachment must use the mode it was attached in.
        if cur_mode == "native":
            modes = [XDP_FLAGS_DRV_MODE]
        elif cur_mode == "generic":
            modes = [XDP_FLAGS_SKB_MODE]
        last = 0
        for flags in modes:
            last = bcclib.bpf_attach_xdp(ifname.encode(), self.prog_fd, flags)
            if last >= 0:
                return "native" if flags == XDP_FLAGS_DRV_MODE else "generic"
        raise DatapathError(f"cannot attach XDP to {ifname} (mode {self.cfg.xdp_mode}): error {last}")

    def detach(self, *, purge: bool = False) -> list[str]:
        """Remove the program from the configured interfaces; with purge, also
        unpin the program and maps (all kernel state is gone)."""
        from bcc.libbcc import lib as bcclib  # noqa: PLC0415

        prog_id = libbpf.prog_info(self.prog_fd).id if self.prog_fd >= 0 else None
        removed = []
        for ifname in self.cfg.interfaces:
            try:
                cur_id, cur_mode = xdp_attachment(ifname)
            except DatapathError:
                continue
            if cur_id is None or (prog_id is not None and cur_id != prog_id):
                continue
            flags = XDP_FLAGS_SKB_MODE if cur_mode == "generic" else XDP_FLAGS_DRV_MODE
            if bcclib.bpf_attach_xdp(ifname.encode(), -1, flags) >= 0:
                removed.append(ifname)
        if purge:
            for name in [PROG_PIN, *MAP_TYPES]:
                try:
                    (self.pin_dir / name).unlink()
                except FileNotFoundError:
                    pass
            try:
                self.pin_dir.rmdir()
            except OSError:
                pass
        return removed

    def open_maps(self) -> Maps:
        """Open the pinned maps only (no compile, no attach): for inspection."""
        if self.maps is None:
            self.maps = Maps.open(self.pin_dir)
            self.rebuild_reverse_index()
            self.rebuild_slots()
        return self.maps

    def close(self) -> None:
        if self.maps:
            self.maps.close()
            self.maps = None
        if self.prog_fd >= 0:
            os.close(self.prog_fd)
            self.prog_fd = -1

    # --- flows and ownership ------------------------------------------------------------

    def _m(self) -> Maps:
        if self.maps is None:
            raise DatapathError("datapath maps are not open")
        return self.maps

    def rebuild_slots(self) -> int:
        """Which slot of the owners array each call holds: one batched read of
        the array (at open, so a restarted relayd finds its calls' slots).
        Returns the slots in use."""
        m = self._m()
        osz, at = ctypes.sizeof(OwnerInfo), OwnerInfo.conn_id.offset
        u32 = struct.Struct("<I").unpack_from
        slots: dict[int, int] = {}
        free: list[int] = []
        index = 0
        for _, vals, n in m.owners.raw_batches():
            for i in range(n):
                conn_id = u32(vals, i * osz + at)[0]
                if conn_id and conn_id not in slots:
                    slots[conn_id] = index
                else:
                    free.append(index)
                index += 1
        free.reverse()  # pop() hands out the lowest first
        with self._slot_lock:
            self._slots, self._free_slots = slots, free
        return len(slots)

    def slot_of(self, conn_id: int) -> int | None:
        """The owners-array slot of a call, if it has an owner entry."""
        with self._slot_lock:
            return self._slots.get(conn_id)

    def _find_slot(self, conn_id: int) -> int | None:
        """slot_of, and for a reader that does not know the call, slot_of
        after reading the array again (the writer may have made it since)."""
        slot = self.slot_of(conn_id)
        if slot is None and not self._writer:
            self.rebuild_slots()
            slot = self.slot_of(conn_id)
        return slot

    def _slot_for(self, conn_id: int) -> tuple[int, bool]:
        """(slot, taken now) of a call: the one it holds, else a free one. A
        slot another process filled since the index was built is taken as
        that call's and skipped."""
        if not 0 < conn_id < 1 << 32:
            raise DatapathError(f"connection id {conn_id} is out of range (1..2^32-1)")
        m = self._m()
        with self._slot_lock:
            if conn_id in self._slots:
                return self._slots[conn_id], False
            while self._free_slots:
                slot = self._free_slots.pop()
                cur = m.owners.lookup(ctypes.c_uint32(slot))
                if cur is None or not cur.conn_id:
                    self._slots[conn_id] = slot
                    return slot, True
                self._slots.setdefault(cur.conn_id, slot)
        raise DatapathError(f"no free owner slot for connection id {conn_id}: all {self.cfg.max_owners} slots "
                            f"hold calls (datapath.max_owners)")

    def _reserve_slot(self, conn_id: int) -> int:
        """The call's slot, taken now (with no owner yet: its flows stay
        inert, as with no owner entry) if it has none."""
        slot, new = self._slot_for(conn_id)
        if new:
            self._write_owner(slot, OwnerInfo(conn_id=conn_id))
        return slot

    def _write_owner(self, slot: int, info: OwnerInfo) -> None:
        """Write a slot's owners entry, then bump the slot's epoch: XDP's
        route caches made under the old epoch (and the owner they hold) are
        then not used again. Per slot, epochs only grow (until 2^32 changes
        of one slot wrap them), so a flow left from a call that held the slot
        before can never find its cache's epoch again."""
        m = self._m()
        key = ctypes.c_uint32(slot)
        m.owners.update(key, info)
        cur = m.epochs.lookup(key)
        m.epochs.update(key, ctypes.c_uint32(((cur.value if cur is not None else 0) + 1) & 0xFFFFFFFF))

    def epoch_of(self, conn_id: int) -> int | None:
        """The epoch of a call's slot (what XDP's route caches are checked against)."""
        slot = self._find_slot(conn_id)
        if slot is None:
            return None
        cur = self._m().epochs.lookup(ctypes.c_uint32(slot))
        return None if cur is None else cur.value

    def set_owner(self, conn_id: int, owner: OwnerAddr) -> int:
        """Point a connection id at its owner: one update of the call's owners
        entry (then its slot's epoch), which both directions of every flow of
        the call follow. Returns the generation.
        A new call takes a free slot of the owners array."""
        m = self._m()
        slot, new = self._slot_for(conn_id)
        cur = None if new else m.owners.lookup(ctypes.c_uint32(slot))  # a slot just taken was free
        gen = (cur.generation + 1) if cur is not None and cur.conn_id == conn_id else 1
        info = OwnerInfo(generation=gen, conn_id=conn_id)
        if owner.addr4:
            info.addr4 = pack_addr4(owner.addr4)
            info.port4 = htons(owner.port4)
        if owner.addr6:
            info.addr6 = pack_addr(owner.addr6)
            info.port6 = htons(owner.port6)
        self._write_owner(slot, info)
        return gen

    def get_owner(self, conn_id: int) -> tuple[OwnerAddr, int] | None:
        slot = self._find_slot(conn_id)
        if slot is None:
            return None
        cur = self._m().owners.lookup(ctypes.c_uint32(slot))
        if cur is None or cur.conn_id != conn_id or not cur.generation:  # generation 0: reserved, never owned
            return None
        return OwnerAddr(
            addr4=unpack_addr4(cur.addr4) if cur.port4 else None, port4=ntohs(cur.port4),
            addr6=unpack_addr(cur.addr6, AF_INET6) if cur.port6 else None, port6=ntohs(cur.port6),
        ), cur.generation

    def remove_owner(self, conn_id: int) -> bool:
        """Free the call's slot: its flows no longer forward (their connection
        id no longer matches the slot's), also once the slot is reused."""
        m = self._m()
        self._find_slot(conn_id)
        with self._slot_lock:
            slot = self._slots.pop(conn_id, None)
            if slot is None:
                return False
            cur = m.owners.lookup(ctypes.c_uint32(slot))
            held = cur is not None and cur.conn_id == conn_id
            if held:
                self._write_owner(slot, OwnerInfo())
            self._free_slots.append(slot)
        return held

    def add_reverse(self, owner: tuple[str, int], flow_port: int, client: tuple[str, int],
                    vip: tuple[str, int], conn_id: int, flow_addr: int = 0) -> None:
        """Let `owner` send to `client` through the flow source (pool address
        flow_addr, flow_port); inert until owner is the current owner of conn_id."""
        slot = self._reserve_slot(conn_id)
        rk, fk = reverse_key(owner, flow_port, flow_addr), flow_key(client, vip)
        self._m().reverse.update(rk, ReverseInfo(client=fk, conn_id=conn_id, slot=slot))
        with self._rev_lock:
            self._rev_index.setdefault(bytes(fk), set()).add(bytes(rk))

    def reverse_packets(self, owner: tuple[str, int], flow_port: int, flow_addr: int = 0) -> int | None:
        """Packets the kernel forwarded from `owner` through the flow source."""
        info = self._m().reverse.lookup(reverse_key(owner, flow_port, flow_addr))
        return None if info is None else info.packets

    def remove_reverse(self, owner: tuple[str, int], flow_port: int, flow_addr: int = 0) -> bool:
        rk = reverse_key(owner, flow_port, flow_addr)
        info = self._m().reverse.lookup(rk)
        if info is not None:
            self._unindex(bytes(info.client), bytes(rk))
        return self._m().reverse.delete(rk)

    def _unindex(self, fk: bytes, rk: bytes) -> None:
        with self._rev_lock:
            keys = self._rev_index.get(fk)
            if keys is not None:
                keys.discard(rk)
                if not keys:
                    del self._rev_index[fk]

    def rebuild_reverse_index(self) -> int:
        """One walk of the reverse map (at load, and for tests)."""
        index: dict[bytes, set[bytes]] = {}
        for rk, rv in self._m().reverse.items():
            index.setdefault(bytes(rv.client), set()).add(bytes(rk))
        with self._rev_lock:
            self._rev_index = index
        return sum(len(v) for v in index.values())

    def reverse_index_size(self) -> int:
        with self._rev_lock:
            return sum(len(v) for v in self._rev_index.values())

    def add_flow(self, client: tuple[str, int], vip: tuple[str, int], conn_id: int, flow_port: int,
                 owner: OwnerAddr | None = None, flow_addr: int = 0) -> None:
        """Install both directions of one flow. The return direction is keyed
        by the current owner (given, or read from the owners map)."""
        if owner is None:
            found = self.get_owner(conn_id)
            if found is None:
                raise DatapathError(f"connection id {conn_id} has no owner entry")
            owner = found[0]
        ep = owner.for_family(flow_key(client, vip).family)
        if ep is None:
            raise DatapathError(f"owner of connection id {conn_id} has no address in the client's family")
        self.add_reverse(ep, flow_port, client, vip, conn_id, flow_addr)
        now = time.monotonic_ns()
        self._m().flows.update(flow_key(client, vip), FlowInfo(conn_id=conn_id, flow_port=htons(flow_port),
                                                               flow_addr=flow_addr, last_seen_ns=now,
                                                               created_ns=now, slot=self.slot_of(conn_id)))

    def remove_flow(self, client: tuple[str, int], vip: tuple[str, int]) -> bool:
        """Remove a flow and every reverse entry that points at it (found in
        the in-memory index: no walk). False if the kernel held no such flow."""
        key = flow_key(client, vip)
        found = self._m().flows.lookup(key) is not None
        self._remove(key)
        return found

    def _remove(self, key: FlowKey) -> None:
        m = self._m()
        info = m.flows.lookup(key)
        m.flows.delete(key)
        if info is not None and info.ssrc:
            cur = m.ssrcs.lookup(ctypes.c_uint32(info.ssrc))
            if cur is not None and bytes(cur) == bytes(key):
                m.ssrcs.delete(ctypes.c_uint32(info.ssrc))
        with self._rev_lock:
            rkeys = self._rev_index.pop(bytes(key), set())
        for rk in rkeys:
            m.reverse.delete(ReverseKey.from_buffer_copy(rk))

    def admit_ufrag(self, ufrag: str) -> None:
        """Let checks for this live call's server ufrag reach the slow path."""
        self._m().live_ufrags.update(_ufrag_key(ufrag), AdmitBucket())

    def forget_ufrag(self, ufrag: str) -> bool:
        if len(ufrag) != UFRAG_LEN:
            return False  # never admitted
        return self._m().live_ufrags.delete(_ufrag_key(ufrag))

    def ssrc_flow(self, packet: bytes) -> tuple[tuple[str, int], tuple[str, int]] | None:
        """(client, vip) of the flow that first sent this RTP packet's SSRC, if
        the kernel indexed one (bytes 8..11 of the packet, as XDP reads them)."""
        if len(packet) < 12:
            return None
        key = self._m().ssrcs.lookup(ctypes.c_uint32(int.from_bytes(packet[8:12], sys.byteorder)))
        return None if key is None else flow_key_tuple(key)

    def flow_ssrc(self, client: tuple[str, int], vip: tuple[str, int]) -> int:
        """The first RTP SSRC XDP saw on a flow (0: none yet, or no such flow)."""
        info = self._m().flows.lookup(flow_key(client, vip))
        return 0 if info is None else int.from_bytes(info.ssrc.to_bytes(4, sys.byteorder), "big")

    def index_ssrc(self, ssrc: int, client: tuple[str, int], vip: tuple[str, int]) -> None:
        """Index an SSRC this relay has no flow for (another relay's call): its
        media from an unknown tuple then reaches the slow path (pass_rebind)."""
        key = ctypes.c_uint32(int.from_bytes(ssrc.to_bytes(4, "big"), sys.byteorder))
        self._m().ssrcs.update(key, flow_key(client, vip))

    def rebind_flow(self, old_client: tuple[str, int], new_client: tuple[str, int], vip: tuple[str, int]) -> bool:
        """Move a flow to the client's new tuple (a NAT rebinding the owner
        authenticated): the new tuple forwards at once, then one update of
        each return entry sends the owner's packets to it, then the old tuple
        goes. Same connection id and flow source: the owner sees no change.
        False if the kernel no longer holds the old tuple."""
        m = self._m()
        old_key, new_key = flow_key(old_client, vip), flow_key(new_client, vip)
        info = m.flows.lookup(old_key)
        if info is None:
            return False
        info.last_seen_ns = time.monotonic_ns()
        info.nh = NextHop()  # its checksum changes were the old tuple's
        m.flows.update(new_key, info)
        with self._rev_lock:
            rkeys = self._rev_index.pop(bytes(old_key), set())
            self._rev_index.setdefault(bytes(new_key), set()).update(rkeys)
        for rk in rkeys:
            key = ReverseKey.from_buffer_copy(rk)
            rv = m.reverse.lookup(key)
            if rv is not None:
                rv.client = new_key
                rv.nh = NextHop()  # the cached route was the old address's
                m.reverse.update(key, rv)
        m.flows.delete(old_key)
        if info.ssrc:
            m.ssrcs.update(ctypes.c_uint32(info.ssrc), new_key)
        return True

    def has_flow(self, client: tuple[str, int], vip: tuple[str, int]) -> bool:
        """Whether the kernel holds this client tuple (one lookup, no walk)."""
        return self._m().flows.lookup(flow_key(client, vip)) is not None

    def get_flow(self, client: tuple[str, int], vip: tuple[str, int]) -> Flow | None:
        """One flow; its return-direction counters are those of the reverse
        entries still installed (a retired owner's entry takes its own along)."""
        key = flow_key(client, vip)
        info = self._m().flows.lookup(key)
        if info is None:
            return None
        return self._flow(key, info, self._reverse_index())

    def _flow(self, key: FlowKey, info: FlowInfo, index: dict) -> Flow:
        client, vip = flow_key_tuple(key)
        entries = [rv for _, rv in index.get(bytes(key), ())]
        return Flow(client=client, vip=vip, conn_id=info.conn_id, flow_port=ntohs(info.flow_port),
                    flow_addr=info.flow_addr, ssrc=int.from_bytes(info.ssrc.to_bytes(4, sys.byteorder), "big"),
                    packets_in=info.packets, bytes_in=info.bytes,
                    packets_out=sum(rv.packets for rv in entries), bytes_out=sum(rv.bytes for rv in entries),
                    last_seen_ns=max([info.last_seen_ns, *(rv.last_seen_ns for rv in entries)]),
                    created_ns=info.created_ns)

    def _reverse_index(self) -> dict[bytes, list[tuple[ReverseKey, ReverseInfo]]]:
        """Every reverse entry, grouped by the client tuple it restores: one
        walk of the map serves listing and removal alike."""
        index: dict[bytes, list[tuple[ReverseKey, ReverseInfo]]] = {}
        for rk, rv in self._m().reverse.items():
            index.setdefault(bytes(rv.client), []).append((rk, rv))
        return index

    def flows(self) -> list[Flow]:
        index = self._reverse_index()
        return [self._flow(k, v, index) for k, v in self._m().flows.items()]

    def expire_idle(self, idle_s: float, *, now_ns: int | None = None, kept: set | None = None) -> list[Flow]:
        """Remove flows with no packet either way for idle_s seconds. `kept`,
        if given, receives the flows-map key (bytes(FlowKey)) of every flow
        left in place: the same walk tells the caller which tuples the kernel
        still holds. The maps are read in raw batches and only the last-seen
        fields are decoded, save for the flows that expire."""
        now = now_ns if now_ns is not None else time.monotonic_ns()
        limit = int(idle_s * 1e9)
        m = self._m()
        ksz, fsz, rsz = ctypes.sizeof(FlowKey), ctypes.sizeof(FlowInfo), ctypes.sizeof(ReverseInfo)
        r_client, r_seen = ReverseInfo.client.offset, ReverseInfo.last_seen_ns.offset
        f_seen = FlowInfo.last_seen_ns.offset
        u64 = struct.Struct("<Q").unpack_from
        # The return direction's last packet, by the client tuple it restores.
        out_seen: dict[bytes, int] = {}
        for _, vals, n in m.reverse.raw_batches():
            for i in range(n):
                base = i * rsz
                client = vals[base + r_client:base + r_client + ksz]
                seen = u64(vals, base + r_seen)[0]
                if seen > out_seen.get(client, 0):
                    out_seen[client] = seen
        idle = []
        for keys, vals, n in m.flows.raw_batches():
            for i in range(n):
                kb = keys[i * ksz:(i + 1) * ksz]
                if now - max(u64(vals, i * fsz + f_seen)[0], out_seen.get(kb, 0)) > limit:
                    idle.append((FlowKey.from_buffer_copy(kb), FlowInfo.from_buffer_copy(vals, i * fsz)))
                elif kept is not None:
                    kept.add(kb)
        expired = []
        if idle:
            index = self._reverse_index()
            for key, info in idle:
                expired.append(self._flow(key, info, index))
                self._remove(key)
        return expired

    # --- counters -----------------------------------------------------------------------

    def counters(self) -> dict[str, tuple[int, int]]:
        """Per-reason (packets, bytes), summed over CPUs."""
        return read_counters(self._m())


def _ufrag_key(ufrag: str) -> UfragKey:
    raw = ufrag.encode("ascii")
    if len(raw) != UFRAG_LEN:
        raise DatapathError(f"server ufrag {ufrag!r} is not {UFRAG_LEN} characters")
    key = UfragKey()
    ctypes.memmove(key.ufrag, raw, UFRAG_LEN)
    return key


def read_counters(maps: Maps) -> dict[str, tuple[int, int]]:
    res = {}
    for i, name in enumerate(STAT_NAMES):
        vals = maps.stats.lookup(ctypes.c_uint32(i)) or []
        res[name] = (sum(v.packets for v in vals), sum(v.bytes for v in vals))
    return res


def xdp_attachment(ifname: str) -> tuple[int | None, str | None]:
    """(program id, mode) of the XDP program attached to ifname, in this
    thread's network namespace."""
    from pyroute2 import IPRoute  # noqa: PLC0415

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise DatapathError(f"no interface named {ifname}")
        link = ipr.get_links(idx[0])[0]
    xdp = link.get_attr("IFLA_XDP")
    if not xdp:
        return None, None
    attached = xdp.get_attr("IFLA_XDP_ATTACHED")
    if not attached:
        return None, None
    return xdp.get_attr("IFLA_XDP_PROG_ID"), XDP_ATTACHED_MODES.get(attached, str(attached))
