"""The flows of both families behind one view keyed by struct flow_key.

The kernel keeps IPv4 flows in flows4, keyed by a 12-byte tuple (the hit
path hashes three words instead of ten), and IPv6 flows in flows6 by the full
struct flow_key. Everything else (return entries, the SSRC index, relayd's
own indexes) names a flow by its struct flow_key; this view converts at the
map's edge, so callers never pick a map themselves.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

from manager.relay.kernel import libbpf
from manager.relay.kernel.structs import (
    AF_INET,
    FLOW_KEY4_SIZE,
    FlowKey,
    flow_key4,
    widen_key4,
)


class FlowTable:
    """flows4 and flows6 as one map of FlowKey → FlowInfo."""

    def __init__(self, flows4: libbpf.PinnedMap, flows6: libbpf.PinnedMap):
        self.flows4 = flows4
        self.flows6 = flows6

    def _where(self, key: FlowKey) -> tuple[libbpf.PinnedMap, ctypes.Structure]:
        if key.family == AF_INET:
            return self.flows4, flow_key4(key)
        return self.flows6, key

    def lookup(self, key: FlowKey):
        m, k = self._where(key)
        return m.lookup(k)

    def update(self, key: FlowKey, value, flags: int = libbpf.BPF_ANY) -> None:
        m, k = self._where(key)
        m.update(k, value, flags)

    def delete(self, key: FlowKey) -> bool:
        m, k = self._where(key)
        return m.delete(k)

    def raw_batches(self) -> Iterator[tuple[bytes, bytes, int]]:
        """(keys as bytes of FlowKey, values, count), both maps, in batches."""
        for keys, vals, n in self.flows4.raw_batches():
            wide = b"".join(widen_key4(keys[i * FLOW_KEY4_SIZE:(i + 1) * FLOW_KEY4_SIZE]) for i in range(n))
            yield wide, vals, n
        yield from self.flows6.raw_batches()

    def items(self) -> Iterator[tuple[FlowKey, object]]:
        ksize, vsize = ctypes.sizeof(FlowKey), ctypes.sizeof(self.flows4.value_type)
        vtype = self.flows4.value_type
        for keys, vals, n in self.raw_batches():
            for i in range(n):
                yield FlowKey.from_buffer_copy(keys, i * ksize), vtype.from_buffer_copy(vals, i * vsize)

    def keys(self) -> Iterator[FlowKey]:
        for k, _ in self.items():
            yield k

    def __len__(self) -> int:
        """Entries in both maps, counted from the batches (nothing decoded)."""
        return sum(n for m in (self.flows4, self.flows6) for _, _, n in m.raw_batches())

