"""The kernel's neighbour entries in a namespace, as iproute2 reports them."""

from __future__ import annotations

import json
import subprocess


def neighbour(ns: str, addr: str) -> dict | None:
    """`addr`'s neighbour entry in namespace `ns`, or None."""
    out = subprocess.run(["ip", "-j", "-n", ns, "neigh", "show", addr], check=True, capture_output=True,
                         text=True).stdout
    rows = json.loads(out or "[]")
    return rows[0] if rows else None


def resolved(ns: str, addr: str) -> bool:
    """Whether `addr` has a link-layer address in a managed entry (what
    relayd's next-hop keeper makes: kernel/next_hops.py)."""
    n = neighbour(ns, addr)
    # iproute2's JSON marks a managed entry with a "managed" key.
    return n is not None and "lladdr" in n and "managed" in n
