"""Kernel-applied uplink loss for the density benchmark's loss run.

With root, the transceiver runs in its own network namespace, joined to the
load generator's by a veth pair; random loss is an nftables rule on the
transceiver side's netdev ingress hook (``numgen random``), so the packet
leaves the sender, crosses the link and is dropped by the kernel before any
socket sees it: the sender never learns of it, as on a real network. (A drop
in the sender's own output hook fails its ``sendto`` with EPERM instead.)
Only SRTP/SRTCP is dropped (UDP payload starting 0x80-0xBF, RFC 7983) and
only during the media window; the handshakes are not disturbed. Without
root the sender drops packets itself (``mode`` says which).
"""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager

NETNS = "sr-density-tx"
GEN_IF, TX_IF = "srd-gen", "srd-tx"
GEN_ADDR, TX_ADDR = "10.213.0.1", "10.213.0.2"
TABLE = "srd_loss"


def kernel_loss_available() -> bool:
    return os.geteuid() == 0


def _run(*args: str, ns: bool = False) -> str:
    cmd = (["ip", "netns", "exec", NETNS] if ns else []) + list(args)
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def _teardown() -> None:
    subprocess.run(["ip", "link", "del", GEN_IF], capture_output=True)
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)


@contextmanager
def link():
    """The transceiver's namespace and the veth pair: (generator address, transceiver address)."""
    _teardown()  # a run killed half-way left them
    try:
        _run("ip", "netns", "add", NETNS)
        _run("ip", "link", "add", GEN_IF, "type", "veth", "peer", "name", TX_IF, "netns", NETNS)
        _run("ip", "addr", "add", f"{GEN_ADDR}/30", "dev", GEN_IF)
        _run("ip", "link", "set", GEN_IF, "up")
        _run("ip", "addr", "add", f"{TX_ADDR}/30", "dev", TX_IF, ns=True)
        _run("ip", "link", "set", TX_IF, "up", ns=True)
        _run("ip", "link", "set", "lo", "up", ns=True)
        yield GEN_ADDR, TX_ADDR
    finally:
        _teardown()


def drop(loss: float) -> None:
    """Drop `loss` of the SRTP arriving at the transceiver, at random (replaces any earlier rule)."""
    per_mille = round(loss * 1000)
    ruleset = f"""
table netdev {TABLE} {{
    chain uplink {{
        type filter hook ingress device {TX_IF} priority 0;
        meta l4proto udp @th,64,2 2 numgen random mod 1000 < {per_mille} counter drop
    }}
}}
"""
    subprocess.run(["ip", "netns", "exec", NETNS, "nft", "-f", "-"], input=f"table netdev {TABLE}\n"
                   f"delete table netdev {TABLE}\n" + ruleset, check=True, capture_output=True, text=True)


def dropped() -> int:
    """Packets the loss rule dropped so far."""
    out = json.loads(_run("nft", "-j", "list", "table", "netdev", TABLE, ns=True))
    return sum(item["rule"]["expr"][-2]["counter"]["packets"] for item in out["nftables"]
               if "rule" in item)


def clear() -> None:
    subprocess.run(["ip", "netns", "exec", NETNS, "nft", "delete", "table", "netdev", TABLE], capture_output=True)
