"""The namespace lab (manager/lab/: model, links, routing, lifecycle), checked independently with `ip -j`,
`ethtool -k` and real packets rather than read back through pyroute2."""

from __future__ import annotations

import concurrent.futures
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from manager.lab import lifecycle, state
from manager.lab import netns as labns
from manager.lab.lifecycle import lab_down, lab_up
from manager.lab.model import Lab
from manager.lab.netns import LabError, NetnsExecutor
from tests.support.waiting import eventually

pytestmark = pytest.mark.netns


def _prefix() -> str:
    return "t" + secrets.token_hex(4)  # 9 chars: unique per run, valid lab prefix


def ip_json(ns: str, *args: str) -> Any:
    out = subprocess.run(["ip", "-j", "-n", ns, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out) if out.strip() else []


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "-j", "netns", "list"], check=True, capture_output=True, text=True).stdout
    return {n["name"] for n in json.loads(out)} if out.strip() else set()


def ns_of(prefix: str) -> set[str]:
    return {n for n in netns_names() if n.startswith(prefix + "-")}


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lb = lab_up(_prefix(), transceivers=2)
    try:
        yield lb
    finally:
        lab_down(lb)


# --- topology as seen by iproute2 -------------------------------------------------

def global_addrs(ns: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for link in ip_json(ns, "addr", "show"):
        for a in link.get("addr_info", []):
            assert not a.get("tentative"), (ns, link["ifname"], a)
            if a.get("scope") == "global":
                out.setdefault(link["ifname"], set()).add(f"{a['local']}/{a['prefixlen']}")
    return out


def test_addresses(lab: Lab) -> None:
    p = lab.prefix
    assert lab.namespaces == [f"{p}-client", f"{p}-relay", f"{p}-tx1", f"{p}-tx2"]
    assert global_addrs(f"{p}-client") == {"eth0": {"10.10.1.2/24", "fd00:10:1::2/64"}}
    assert global_addrs(f"{p}-tx1") == {"eth0": {"10.10.2.2/24", "fd00:10:2::2/64"}}
    assert global_addrs(f"{p}-tx2") == {"eth0": {"10.10.3.2/24", "fd00:10:3::2/64"}}
    relay = global_addrs(f"{p}-relay")
    assert relay == {
        "pub0": {"10.10.1.1/24", "fd00:10:1::1/64"},
        "tx1": {"10.10.2.1/24", "fd00:10:2::1/64"},
        "tx2": {"10.10.3.1/24", "fd00:10:3::1/64"},
        "lo": {"10.10.0.1/32", "10.10.0.2/32", "fd00:10::1/128", "fd00:10::2/128"},  # the flow-source pools
    }
    assert (lab.vip4, lab.vip6, lab.port) == ("10.10.1.1", "fd00:10:1::1", 3478)
    assert (lab.internal4, lab.internal6) == ("10.10.0.1", "fd00:10::1")
    assert lab.public_ifname == "pub0" and lab.internal_ifnames == ["tx1", "tx2"]
    assert lab.signaling_url == "http://10.10.1.1:8080"


def test_links_up_and_paired(lab: Lab) -> None:
    for ns, names in [(lab.relay_ns, {"pub0", "tx1", "tx2"}), *((n, {"eth0"}) for n in [lab.client_ns, *lab.transceiver_ns])]:
        links = {link["ifname"]: link for link in ip_json(ns, "link", "show")}
        assert set(links) == names | {"lo"}, ns
        assert "UP" in links["lo"]["flags"]
        for name in names:
            assert links[name]["operstate"] == "UP", (ns, name)
            assert "link_netnsid" in links[name], (ns, name)  # veth peer lives in another ns


def test_default_routes(lab: Lab) -> None:
    for ep in lab.endpoints:
        (r4,) = ip_json(ep.ns, "-4", "route", "show", "default")
        (r6,) = ip_json(ep.ns, "-6", "route", "show", "default")
        assert (r4["gateway"], r4["dev"]) == (ep.relay_addr4, "eth0")
        assert (r6["gateway"], r6["dev"]) == (ep.relay_addr6, "eth0")
    # The relay knows only its connected networks.
    assert ip_json(lab.relay_ns, "-4", "route", "show", "default") == []
    assert ip_json(lab.relay_ns, "-6", "route", "show", "default") == []


def test_relay_forwarding_on_but_isolated(lab: Lab) -> None:
    # On for bpf_fib_lookup; the prohibit rules keep the kernel from routing
    # between the sides (test_reachability proves they work).
    out = lab.run("relay", ["sysctl", "-n", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"]).stdout
    assert out.split() == ["1", "1"]
    for fam in ("-4", "-6"):
        rules = ip_json(lab.relay_ns, fam, "rule", "show")
        prohibited = {r.get("iif") for r in rules if r.get("action") == "prohibit" and r["priority"] == 100}
        assert prohibited == {"pub0", *lab.internal_ifnames}
        sources = {r.get("src") for r in rules if r["priority"] == 90}
        assert sources == ({*lab.internal_pool(lab.internal4), lab.vip4} if fam == "-4"
                           else {*lab.internal_pool(lab.internal6), lab.vip6})


def ethtool_features(ns: str, dev: str) -> dict[str, str]:
    out = subprocess.run(["ip", "netns", "exec", ns, "ethtool", "-k", dev],
                         check=True, capture_output=True, text=True).stdout
    return {k.strip(): v.split()[0] for k, _, v in (line.partition(":") for line in out.splitlines()[1:]) if v.strip()}


def test_offloads(lab: Lab) -> None:
    devs = [(ep.ns, ep.ifname) for ep in lab.endpoints] + [(lab.relay_ns, ep.relay_ifname) for ep in lab.endpoints]
    for ns, dev in devs:
        f = ethtool_features(ns, dev)
        assert f["generic-receive-offload"] == "on", (ns, dev)
        assert f["tx-checksumming"] == "off", (ns, dev)


def test_ifindex_and_mac(lab: Lab) -> None:
    for ns, dev in [(lab.relay_ns, "pub0"), (lab.relay_ns, "tx2"), (lab.client_ns, "eth0")]:
        (link,) = ip_json(ns, "link", "show", "dev", dev)
        assert labns.ifindex(ns, dev) == link["ifindex"]
        assert labns.mac(ns, dev) == link["address"]
    assert lab.ifindex("relay", "pub0") == labns.ifindex(lab.relay_ns, "pub0")
    with pytest.raises(LabError, match="no interface 'nope'"):
        lab.mac("client", "nope")


# --- reachability with real packets --------------------------------------------------

def icmp_echo(dst: str, timeout: float) -> bool:
    """True if `dst` answers one ICMP(v6) echo (raw socket: no ping binary needed)."""
    v6 = ":" in dst
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                      socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
    with s:
        ident, payload = secrets.randbits(16), secrets.token_bytes(16)
        msg = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, ident, 1) + payload
        if not v6:  # the kernel fills the ICMPv6 checksum itself, not the ICMP one
            words = sum(struct.unpack(f"!{len(msg) // 2}H", msg))
            while words >> 16:
                words = (words & 0xFFFF) + (words >> 16)
            msg = msg[:2] + struct.pack("!H", ~words & 0xFFFF) + msg[4:]
        s.sendto(msg, (dst, 0))
        s.settimeout(timeout)
        try:
            while True:
                data, addr = s.recvfrom(2048)
                if not v6:
                    data = data[(data[0] & 0x0F) * 4:]  # raw IPv4 sockets include the IP header
                typ, _, _, rid, _ = struct.unpack("!BBHHH", data[:8])
                if addr[0] == dst and typ == (129 if v6 else 0) and rid == ident and data[8:] == payload:
                    return True
        except TimeoutError:
            return False


def test_reachability(lab: Lab) -> None:
    cases = {
        # allowed: each side reaches its relay-side gateway
        (lab.client_ns, "10.10.1.1"): True, (lab.client_ns, "fd00:10:1::1"): True,
        (lab.transceiver_ns[0], "10.10.2.1"): True, (lab.transceiver_ns[0], "fd00:10:2::1"): True,
        # forbidden: the relay never routes between client and transceivers
        (lab.client_ns, "10.10.2.2"): False, (lab.client_ns, "fd00:10:2::2"): False,
        (lab.transceiver_ns[0], "10.10.1.2"): False, (lab.transceiver_ns[0], "fd00:10:1::2"): False,
    }
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        futs = {k: pool.submit(labns.run_in_netns, k[0], icmp_echo, k[1], 0.5 if not v else 2.0)
                for k, v in cases.items()}
        got = {k: f.result() for k, f in futs.items()}
    assert got == cases


def udp_delivered(lab: Lab, src_ns: str, dst_ns: str, dst: tuple[str, int], family: int,
                  timeout: float = 1.0) -> tuple[bytes, Any] | None:
    rx = lab.socket(dst_ns, family, bind=dst)
    tx = lab.socket(src_ns, family)
    with rx, tx:
        rx.settimeout(timeout)
        payload = secrets.token_bytes(8)
        tx.sendto(payload, dst)  # from the main thread: the socket stays in src_ns
        try:
            data, addr = rx.recvfrom(2048)
        except TimeoutError:
            return None
        # Echo back to prove the return path as well.
        rx.sendto(data, addr)
        tx.settimeout(timeout)
        back, _ = tx.recvfrom(2048)
        assert back == payload
        return data, addr


def test_udp_client_to_vip(lab: Lab) -> None:
    got = udp_delivered(lab, "client", "relay", lab.vip(socket.AF_INET), socket.AF_INET)
    assert got is not None and got[1][0] == "10.10.1.2"
    got = udp_delivered(lab, "client", "relay", lab.vip(socket.AF_INET6), socket.AF_INET6)
    assert got is not None and got[1][0] == "fd00:10:1::2"


def test_udp_transceiver_to_internal(lab: Lab) -> None:
    # Transceivers reach the relay-internal addresses (on lo) via their default route.
    got = udp_delivered(lab, "tx2", "relay", (lab.internal4, 40000), socket.AF_INET)
    assert got is not None and got[1][0] == "10.10.3.2"
    got = udp_delivered(lab, "tx1", "relay", (lab.internal6, 40000), socket.AF_INET6)
    assert got is not None and got[1][0] == "fd00:10:2::2"


def test_udp_not_routed_between_sides(lab: Lab) -> None:
    assert udp_delivered(lab, "client", "tx1", ("10.10.2.2", 5004), socket.AF_INET, 0.3) is None
    assert udp_delivered(lab, "tx1", "client", ("fd00:10:1::2", 5004), socket.AF_INET6, 0.3) is None


def test_netns_executor_is_per_thread(lab: Lab) -> None:
    target = os.stat(f"/run/netns/{lab.client_ns}").st_ino
    with labns.in_netns(lab.client_ns) as ex:
        assert ex.call(lambda: os.stat("/proc/thread-self/ns/net").st_ino) == target
        assert ex.submit(socket.if_nameindex).result() == [(1, "lo"), (lab.ifindex("client", "eth0"), "eth0")]
    assert os.stat("/proc/thread-self/ns/net").st_ino != target  # the caller never moved
    with pytest.raises(LabError, match="cannot enter network namespace"):
        NetnsExecutor(lab.prefix + "-nope")


# --- state, listing, tear-down ---------------------------------------------------------

def test_state_file_and_listing(lab: Lab) -> None:
    path = Path(f"/run/splitrelay/lab-{lab.prefix}.json")
    assert path.exists()
    assert Lab.from_json(path.read_text()) == lab
    assert state.load_lab(lab.prefix) == lab
    assert lab.prefix in {other.prefix for other in state.list_labs()}
    assert Lab.from_json(lab.to_json()) == lab


def wait_in_netns(pid: int, ns: str, timeout: float = 5.0) -> None:
    """Wait until `ip netns exec` has switched `pid` into `ns` (it starts in ours)."""
    target = os.stat(f"/run/netns/{ns}").st_ino
    eventually(lambda: os.stat(f"/proc/{pid}/ns/net").st_ino == target, timeout, what=f"pid {pid} to enter {ns}",
               interval=0.01)


def test_lab_down_removes_only_its_own(lab: Lab) -> None:
    p = _prefix()
    try:
        with lifecycle.lab(p, transceivers=1) as small:
            assert ns_of(p) == {f"{p}-client", f"{p}-relay", f"{p}-tx1"}
            sleeper = small.popen("client", ["sleep", "30"])
            wait_in_netns(sleeper.pid, small.client_ns)
        # A process left in a lab namespace is stopped so the namespace really goes.
        assert sleeper.wait(timeout=5) == -signal.SIGTERM
        assert ns_of(p) == set()
        assert not Path(f"/run/splitrelay/lab-{p}.json").exists()
        assert ns_of(lab.prefix) == set(lab.namespaces)  # the other lab is untouched
        assert lab_down(p) == []  # nothing left: tolerated
    finally:
        lab_down(p)


def test_lab_down_by_prefix_tolerates_missing_pieces() -> None:
    p = _prefix()
    try:
        lab_up(p, transceivers=2)
        subprocess.run(["ip", "netns", "del", f"{p}-tx1"], check=True)  # gone behind our back
        assert sorted(lab_down(p)) == [f"{p}-client", f"{p}-relay", f"{p}-tx2"]
        assert ns_of(p) == set()
        assert not Path(f"/run/splitrelay/lab-{p}.json").exists()
    finally:
        lab_down(p)


def test_failure_halfway_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    p = _prefix()

    def boom(_lab: Lab) -> None:
        assert ns_of(p)  # namespaces and links exist at this point
        raise RuntimeError("injected failure")

    monkeypatch.setattr(lifecycle, "set_offloads", boom)
    try:
        with pytest.raises(LabError) as ei:
            lab_up(p)
        assert str(ei.value) == f"lab {p}: setting offloads failed: injected failure"
        assert ns_of(p) == set()
        assert not Path(f"/run/splitrelay/lab-{p}.json").exists()
    finally:
        lab_down(p)


# --- user mistakes: one clear line, nothing created --------------------------------------

@pytest.mark.parametrize("bad", ["", "UPPER", "a_b", "-lead", "x" * 11, "sp ace"])
def test_invalid_prefix(bad: str) -> None:
    with pytest.raises(LabError, match="invalid lab prefix") as ei:
        lab_up(bad)
    assert "\n" not in str(ei.value)


def test_invalid_count() -> None:
    with pytest.raises(LabError, match="invalid number of transceivers"):
        lab_up(_prefix(), transceivers=0)


def test_prefix_in_use(lab: Lab) -> None:
    with pytest.raises(LabError, match="already in use"):
        lab_up(lab.prefix)
    assert ns_of(lab.prefix) == set(lab.namespaces)


def test_not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(LabError, match="needs root"):
        lab_up(_prefix())
    with pytest.raises(LabError, match="needs root"):
        lab_down("whatever")


def test_unknown_role(lab: Lab) -> None:
    with pytest.raises(LabError, match="no namespace 'tx9'"):
        lab.run("tx9", ["true"])
