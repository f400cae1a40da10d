"""Installing, moving and removing flows: both directions of a client
tuple, the SSRC index for rebinding, and the live calls' ufrags."""

from __future__ import annotations

import ctypes
import sys
import threading
import time

from manager.protocol.addresses import OwnerAddr, family_of
from manager.relay.kernel.errors import DatapathError
from manager.relay.kernel.structs import (
    UFRAG_LEN,
    AdmitBucket,
    FlowInfo,
    FlowKey,
    NextHop,
    ReverseInfo,
    ReverseKey,
    UfragKey,
    flow_key,
    flow_key_tuple,
    htons,
    reverse_key,
)


class FlowCrud:
    """Flow installation of a Datapath (a mixin: the Datapath holds the maps
    and the slots)."""

    def _init_flows(self) -> None:
        # Reverse entries by the client tuple they restore (bytes of FlowKey →
        # bytes of ReverseKey), so removing a flow needs no walk of the map.
        # Built by one walk when the maps open; the expiry thread shares it.
        self._rev_index: dict[bytes, set[bytes]] = {}
        self._rev_lock = threading.Lock()

    def add_reverse(self, owner: tuple[str, int], flow_port: int, client: tuple[str, int],
                    vip: tuple[str, int], conn_id: int, flow_addr: int = 0) -> None:
        """Let `owner` send to `client` through the flow source (pool address
        flow_addr, flow_port); inert until owner is the current owner of conn_id."""
        slot = self._reserve_slot(conn_id)
        rk, fk = reverse_key(owner, flow_port, flow_addr), flow_key(client, vip)
        self._m().reverse.update(rk, ReverseInfo(client=fk, conn_id=conn_id, slot=slot))
        with self._rev_lock:
            self._rev_index.setdefault(bytes(fk), set()).add(bytes(rk))

    def repair_reverse(self, owner: tuple[str, int], flow_port: int, client: tuple[str, int],
                       vip: tuple[str, int], conn_id: int, flow_addr: int = 0) -> bool:
        """Re-add an installed flow's return entry for its current owner, whose
        packets reached the slow path (pass_return_unknown: the entry was
        evicted by the LRU, or keyed by the owner before a migration). Only
        while the call's owners entry names `owner`: a packet from anyone
        else repairs nothing. True if the entry was added."""
        if self._m().reverse.lookup(reverse_key(owner, flow_port, flow_addr)) is not None:
            return False
        found = self.get_owner(conn_id)
        if found is None or found[0].for_family(family_of(owner[0])) != owner:
            return False
        self.add_reverse(owner, flow_port, client, vip, conn_id, flow_addr)
        return True

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
        if self.on_next_hop is not None:
            self.on_next_hop(client[0])

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
        if self.on_next_hop is not None:
            self.on_next_hop(new_client[0])
        return True

    def has_flow(self, client: tuple[str, int], vip: tuple[str, int]) -> bool:
        """Whether the kernel holds this client tuple (one lookup, no walk)."""
        return self._m().flows.lookup(flow_key(client, vip)) is not None


def _ufrag_key(ufrag: str) -> UfragKey:
    raw = ufrag.encode("ascii")
    if len(raw) != UFRAG_LEN:
        raise DatapathError(f"server ufrag {ufrag!r} is not {UFRAG_LEN} characters")
    key = UfragKey()
    ctypes.memmove(key.ufrag, raw, UFRAG_LEN)
    return key
