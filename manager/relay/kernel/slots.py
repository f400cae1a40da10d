"""Each call's slot in the owners array, and the slot's epoch.

A call holds one slot (connection id → index) while it has an owner; its
flows and return entries carry the slot, and XDP follows the slot only while
it names their call. Every change of a slot's owners entry bumps its epoch,
which XDP's route caches are checked against (bpf/relay.bpf.c).
"""

from __future__ import annotations

import ctypes
import struct
import threading

from manager.protocol.addresses import OwnerAddr
from manager.relay.kernel.errors import DatapathError
from manager.relay.kernel.structs import (
    AF_INET6,
    OwnerInfo,
    htons,
    ntohs,
    pack_addr,
    pack_addr4,
    unpack_addr,
    unpack_addr4,
)


class OwnerSlots:
    """The slot index of a Datapath (a mixin: the Datapath holds the maps)."""

    def _init_slots(self) -> None:
        # Each call's slot in the owners array (connection id → index) and the
        # free slots, rebuilt from the array when the maps open.
        self._slots: dict[int, int] = {}
        self._free_slots: list[int] = []
        self._slot_lock = threading.Lock()
        # load() makes this the maps' writer (relayd): its index is the truth.
        # A reader (open_maps: relayctl, tests) may see calls the writer made
        # since, and reads the array again for a call it does not know.
        self._writer = False

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
        if self.on_next_hop is not None:
            for addr, _ in owner.endpoints():
                self.on_next_hop(addr)
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
