"""Walks of the flow maps: listing flows, expiring idle ones, the reverse
index, and the counters."""

from __future__ import annotations

import ctypes
import struct
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from manager.protocol.addresses import fmt_ep
from manager.relay.kernel.structs import (
    STAT_NAMES,
    FlowInfo,
    FlowKey,
    ReverseInfo,
    ReverseKey,
    flow_key,
    flow_key_tuple,
    ntohs,
)

if TYPE_CHECKING:
    from manager.relay.kernel.pins import Maps


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


class Walks:
    """Walks of a Datapath's maps (a mixin: the Datapath holds them)."""

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

    def get_flow(self, client: tuple[str, int], vip: tuple[str, int]) -> Flow | None:
        """One flow; its return-direction counters are those of the reverse
        entries still installed (a retired owner's entry takes its own along)."""
        key = flow_key(client, vip)
        info = self._m().flows.lookup(key)
        if info is None:
            return None
        return self._flow(key, info, self._entries_of({bytes(key)}))

    def _flow(self, key: FlowKey, info: FlowInfo, index: dict) -> Flow:
        client, vip = flow_key_tuple(key)
        entries = [rv for _, rv in index.get(bytes(key), ())]
        return Flow(client=client, vip=vip, conn_id=info.conn_id, flow_port=ntohs(info.flow_port),
                    flow_addr=info.flow_addr, ssrc=int.from_bytes(info.ssrc.to_bytes(4, sys.byteorder), "big"),
                    packets_in=info.packets, bytes_in=info.bytes,
                    packets_out=sum(rv.packets for rv in entries), bytes_out=sum(rv.bytes for rv in entries),
                    last_seen_ns=max([info.last_seen_ns, *(rv.last_seen_ns for rv in entries)]),
                    created_ns=info.created_ns)

    def _entries_of(self, clients: set[bytes]) -> dict[bytes, list[tuple[ReverseKey, ReverseInfo]]]:
        """The reverse entries of these client tuples (bytes of FlowKey), and
        no others decoded. The writer looks them up through its index; a
        reader (whose index may be older than the writer's changes) reads the
        map in raw batches and decodes only the matching entries."""
        m = self._m()
        found: dict[bytes, list[tuple[ReverseKey, ReverseInfo]]] = {}
        if self._writer:
            with self._rev_lock:
                wanted = [(c, list(self._rev_index.get(c, ()))) for c in clients]
            for client, rkeys in wanted:
                for rk in rkeys:
                    key = ReverseKey.from_buffer_copy(rk)
                    rv = m.reverse.lookup(key)
                    if rv is not None:
                        found.setdefault(client, []).append((key, rv))
            return found
        ksz, rksz, rsz = ctypes.sizeof(FlowKey), ctypes.sizeof(ReverseKey), ctypes.sizeof(ReverseInfo)
        at = ReverseInfo.client.offset
        for keys, vals, n in m.reverse.raw_batches():
            for i in range(n):
                client = vals[i * rsz + at:i * rsz + at + ksz]
                if client in clients:
                    found.setdefault(client, []).append((ReverseKey.from_buffer_copy(keys, i * rksz),
                                                         ReverseInfo.from_buffer_copy(vals, i * rsz)))
        return found

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
        fields are decoded, save for the flows that look idle: each is read
        again right before its delete, and kept if it has been refreshed or
        re-installed since the walk."""
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
            index = self._entries_of({bytes(key) for key, _ in idle})
            for key, info in idle:
                kb = bytes(key)
                # Read again right before the delete: since the walk read it,
                # XDP may have seen a packet, or the event loop re-installed
                # the flow (a new created_ns), or removed it.
                fresh = m.flows.lookup(key)
                if fresh is None:
                    continue
                entries = self._entries_of({kb}) if self._writer else index
                seen = max([fresh.last_seen_ns, *(rv.last_seen_ns for _, rv in entries.get(kb, ()))])
                if fresh.created_ns != info.created_ns or now - seen <= limit:
                    if kept is not None:
                        kept.add(kb)
                    continue
                expired.append(self._flow(key, fresh, entries))
                self._remove(key)
        return expired

    def counters(self) -> dict[str, tuple[int, int]]:
        """Per-reason (packets, bytes), summed over CPUs."""
        return read_counters(self._m())


def read_counters(maps: Maps) -> dict[str, tuple[int, int]]:
    res = {}
    for i, name in enumerate(STAT_NAMES):
        vals = maps.stats.lookup(ctypes.c_uint32(i)) or []
        res[name] = (sum(v.packets for v in vals), sum(v.bytes for v in vals))
    return res
