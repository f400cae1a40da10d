"""The XDP fixture harness with live flows: owners moved, removed, and without a neighbour."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from manager.lab import xdp_harness as hx
from manager.lab.xdp_harness import (
    CLIENT4,
    NO_NEIGH4,
    TX1_4,
    TX1_6,
    TX2_4,
    VIP4,
    VIP6,
    VIP_PORT,
)
from manager.relay.kernel.datapath import OwnerAddr
from tests.support.xdp_frames import (
    C4,
    C4_MIGRATED,
    C4_POOL,
    C6,
    C6_POOL,
    FLOW4,
    FLOW6,
    FLOW_MIGRATED,
    FLOW_POOL,
    OWNER_PORT,
    POOL_IDX,
)

C4_ORPHAN = (CLIENT4, 40002)   # conn 9: no owner entry


C4_NONEIGH = (CLIENT4, 40003)  # conn 10: owner has no neighbour entry


@contextmanager
def live_harness() -> Iterator[hx.Harness]:
    """The harness with the fixture flows installed (one per test module)."""
    h = hx.build()
    try:
        dp = h.dp
        tx1 = OwnerAddr(addr4=TX1_4, port4=OWNER_PORT, addr6=TX1_6, port6=OWNER_PORT)
        dp.set_owner(7, tx1)
        dp.add_flow(C4, (VIP4, VIP_PORT), 7, FLOW4)
        dp.add_flow(C6, (VIP6, VIP_PORT), 7, FLOW6)
        dp.add_flow(C4_POOL, (VIP4, VIP_PORT), 7, FLOW_POOL, flow_addr=POOL_IDX)
        dp.add_flow(C6_POOL, (VIP6, VIP_PORT), 7, FLOW_POOL, flow_addr=POOL_IDX)
        dp.set_owner(8, tx1)
        dp.add_flow(C4_MIGRATED, (VIP4, VIP_PORT), 8, FLOW_MIGRATED)
        dp.set_owner(8, OwnerAddr(addr4=TX2_4, port4=OWNER_PORT))  # migrated away from tx1
        dp.set_owner(9, tx1)
        dp.add_flow(C4_ORPHAN, (VIP4, VIP_PORT), 9, 20004)
        dp.remove_owner(9)
        dp.set_owner(10, OwnerAddr(addr4=NO_NEIGH4, port4=OWNER_PORT))
        dp.add_flow(C4_NONEIGH, (VIP4, VIP_PORT), 10, 20005)
        yield h
    finally:
        hx.teardown(h)
