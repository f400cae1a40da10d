"""A NAT in front of the lab's client: its UDP to the relay's port leaves
from one fixed source port (nftables snat, both families), and moving that
port mid-call is a NAT rebinding as a home router or a mobile carrier makes
one: the client's address as the relay sees it changes, the client knows
nothing of it."""

from __future__ import annotations

import subprocess

from manager.lab.model import Lab
from manager.lab.netns import LabError

TABLE = "srnat"


def _ns(lab: Lab, *cmd: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", lab.client_ns, *cmd], input=stdin, text=True,
                          capture_output=True, check=check)


def set_client_nat(lab: Lab, port: int) -> None:
    """Map the client's UDP to the VIPs' port to source `port` (replacing any
    earlier mapping), and forget the mappings in use: the next packet of every
    flow leaves from the new port."""
    ruleset = f"""
table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
    chain post {{
        type nat hook postrouting priority srcnat; policy accept;
        meta nfproto ipv4 udp dport {lab.port} snat ip to {lab.client.addr4}:{port}
        meta nfproto ipv6 udp dport {lab.port} snat ip6 to [{lab.client.addr6}]:{port}
    }}
}}
"""
    try:
        _ns(lab, "nft", "-f", "-", stdin=ruleset)
    except FileNotFoundError:
        raise LabError("nft is not installed: run `make setup` (Debian package nftables)") from None
    except subprocess.CalledProcessError as exc:
        raise LabError(f"cannot set the client's NAT: {exc.stderr.strip()}") from None
    for family in ("ipv4", "ipv6"):
        # Exit status 1 when there was nothing to delete.
        _ns(lab, "conntrack", "-D", "-f", family, "-p", "udp", "--dport", str(lab.port), check=False)


def clear_client_nat(lab: Lab) -> None:
    _ns(lab, "nft", "delete", "table", "inet", TABLE, check=False)
    for family in ("ipv4", "ipv6"):
        _ns(lab, "conntrack", "-D", "-f", family, "-p", "udp", "--dport", str(lab.port), check=False)
