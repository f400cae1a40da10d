"""The XDP fast path from userspace: load (build.py) or adopt the program,
check and open the pinned maps (pins.py), configure them, attach
(attach.py), and the typed operations on calls and flows (slots.py,
flows.py, walks.py), behind one Datapath object.

State lives in bpffs under the configured pin directory (pins.py), so a
restarted manager adopts what is running instead of replacing it.
"""

from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Callable
from pathlib import Path

from manager.protocol.addresses import OwnerAddr
from manager.relay.config import DatapathConfig, TcpConfig
from manager.relay.kernel import libbpf
from manager.relay.kernel.admission import DEFAULT_SOURCE_PREFIX, admit_config, syn_trusted, tcp_listeners
from manager.relay.kernel.attach import AttachResult, attach_one, detach_one, xdp_attachment
from manager.relay.kernel.build import (
    PROG_NAME,
    PROG_SOURCE,
    cflags,
    compile_and_load,
    ensure_kernel_headers,
    source_digest,
)
from manager.relay.kernel.errors import DatapathError
from manager.relay.kernel.flows import FlowCrud
from manager.relay.kernel.layouts import CURRENT
from manager.relay.kernel.media import MediaReader
from manager.relay.kernel.pins import (
    MAX_IFINDEX,
    PROG_PIN,
    Maps,
    check_pinned_maps,
    pinned_layout,
    pinned_prog_id,
    unpin_all,
)
from manager.relay.kernel.slots import OwnerSlots
from manager.relay.kernel.structs import LAYOUT_HASH, ROLE_INTERNAL, ROLE_PUBLIC, RelayConfig, pack_addr, vip_key
from manager.relay.kernel.takeover import Takeover, staging_dir, take_over
from manager.relay.kernel.walks import Flow, Walks, read_counters

# The names other modules import from here.
__all__ = ["PROG_NAME", "PROG_SOURCE", "AttachResult", "Datapath", "DatapathError", "Flow", "Maps", "OwnerAddr",
           "admit_config", "ensure_kernel_headers", "read_counters", "xdp_attachment"]


class Datapath(OwnerSlots, FlowCrud, Walks, MediaReader):
    """Owns the relay's XDP program and maps for one pin directory."""

    def __init__(self, cfg: DatapathConfig, *, source_prefix: tuple[int, int] = DEFAULT_SOURCE_PREFIX,
                 tcp: TcpConfig | None = None):
        self.cfg = cfg
        self.pin_dir = Path(cfg.pin_dir)
        self.source_prefix = source_prefix  # limits.source_prefix_v4 / _v6
        self.tcp = tcp  # ICE-TCP's listeners get a SYN limit per source in XDP; None: ICE-TCP off
        self.maps: Maps | None = None
        self.prog_fd: int = -1
        self._previous_prog_id: int | None = None  # the pinned program an upgrade replaced
        # Told every address a flow forwards to (client, owner): relayd keeps
        # their next hops resolved (next_hops.py). None: nobody listens.
        self.on_next_hop: Callable[[str], None] | None = None
        self.takeover: Takeover | None = None  # what load() took over from another layout
        self._init_flows()
        self._init_slots()

    # --- lifecycle ------------------------------------------------------------------

    def cflags(self) -> list[str]:
        return cflags(self.cfg)

    def compile_and_load(self) -> int:
        """Compile and load the program (maps created or reused from the pin
        directory); returns a program fd owned by this object."""
        return compile_and_load(self.cfg)

    def check_pinned_maps(self) -> None:
        check_pinned_maps(self.cfg)

    def load(self, *, upgrade: bool = False) -> bool:
        """Make the program and maps available. Adopts the pinned program when
        it was built from this source (layout[1]), unless `upgrade` asks to
        load the current source; a program built from other source replaces
        it in place, keeping the maps. Pinned maps of another known layout are
        taken over (takeover.py), of an unknown one refused, the running
        relay left as it is. Returns True if adopted. Pinned maps that do
        not fit are refused first (check_pinned_maps)."""
        found, digest = pinned_layout(self.pin_dir)
        if found not in (None, 0, LAYOUT_HASH):
            done = take_over(self.cfg, found, CURRENT, source_digest(self.cfg))
            self.prog_fd, self.takeover = done.prog_fd, done
            return self._open_and_configure(False)
        self.check_pinned_maps()
        pinned = self.pin_dir / PROG_PIN
        adopted = False
        if pinned.exists() and not upgrade and digest in (0, source_digest(self.cfg)):
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
                    self._previous_prog_id = libbpf.prog_info(old).id
                    os.close(old)
                    pinned.unlink()
            if not adopted:
                libbpf.obj_pin(new_fd, str(pinned))
            self.prog_fd = new_fd
        return self._open_and_configure(adopted)

    def _open_and_configure(self, adopted: bool) -> bool:
        self.maps = Maps.open(self.pin_dir)
        self.configure()
        self.rebuild_reverse_index()
        self.rebuild_slots()
        self._writer = True
        return adopted

    def configure(self) -> None:
        """Write VIPs, per-family internal addressing, admission and the
        ICE-TCP listeners' SYN limit into the maps."""
        assert self.maps is not None
        wanted = {bytes(vip_key(v.as_tuple())) for v in self.cfg.vips}
        for k in list(self.maps.vips.keys()):
            if bytes(k) not in wanted:
                self.maps.vips.delete(k)
        listeners = tcp_listeners(self.cfg, self.tcp)
        for k in list(self.maps.tcp_listeners.keys()):
            if bytes(k) not in listeners:
                self.maps.tcp_listeners.delete(k)
        for key, limit in listeners.values():
            self.maps.tcp_listeners.update(key, limit)
        trusted = syn_trusted(self.tcp)
        for k in list(self.maps.syn_trusted.keys()):
            if bytes(k) not in trusted:
                self.maps.syn_trusted.delete(k)
        for key in trusted.values():
            self.maps.syn_trusted.update(key, ctypes.c_uint32(1))
        for v in self.cfg.vips:
            self.maps.vips.update(vip_key(v.as_tuple()), ctypes.c_uint32(1))
        for idx, addr in ((0, self.cfg.internal_addr4), (1, self.cfg.internal_addr6)):
            rc = RelayConfig(flow_port_min=self.cfg.flow_port_min, flow_port_max=self.cfg.flow_port_max,
                             addr_count=self.cfg.internal_addr_count if addr else 0)
            if addr:
                rc.internal_addr = pack_addr(addr)
            self.maps.relay_cfg.update(ctypes.c_uint32(idx), rc)
        self.maps.layout.update(ctypes.c_uint32(0), ctypes.c_uint64(LAYOUT_HASH))
        self.maps.layout.update(ctypes.c_uint32(1), ctypes.c_uint64(source_digest(self.cfg)))
        self.maps.admit_cfg.update(ctypes.c_uint32(0),
                                   admit_config(self.cfg, libbpf.possible_cpus(), self.source_prefix))
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
        """Attach the program to each interface through a pinned link (native
        where the driver can, else generic), adopting our own attachment and
        refusing a foreign program unless datapath.xdp_replace says so."""
        if self.prog_fd < 0:
            raise DatapathError("load() the program before attaching it")
        return [attach_one(self.prog_fd, ifname, self.pin_dir, self.cfg.xdp_mode, replace=self.cfg.xdp_replace,
                           previous=self._previous_prog_id)
                for ifname in (interfaces if interfaces is not None else self.cfg.interfaces)]

    def program_id(self) -> int | None:
        """Our program's id (the loaded one, else the pinned one), for the readiness probe."""
        return self._prog_id()

    def _prog_id(self) -> int | None:
        """Our program's id: the loaded one, else the pinned one."""
        if self.prog_fd >= 0:
            return libbpf.prog_info(self.prog_fd).id
        return pinned_prog_id(self.pin_dir)

    def detach(self, *, purge: bool = False) -> list[str]:
        """Remove the program from the configured interfaces; with purge, also
        unpin the program and maps (all kernel state is gone)."""
        prog_id = self._prog_id()
        removed = [ifname for ifname in self.cfg.interfaces if detach_one(ifname, self.pin_dir, prog_id)]
        if purge:
            unpin_all(self.pin_dir)
            unpin_all(staging_dir(self.pin_dir))
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

    def _m(self) -> Maps:
        if self.maps is None:
            raise DatapathError("datapath maps are not open")
        return self.maps
