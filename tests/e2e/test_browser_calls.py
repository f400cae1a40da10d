"""Real browser calls through the lab: Debian's Chromium, headless, opens
relayd's "talk to the agent" page in the client namespace with a fake
microphone playing a 440 Hz tone, and calls the echo agent. For each path:
the call connects, the agent's audio comes back carrying the tone, the
data-channel pings are echoed, the page's own statistics name the path, and
the relay's counters prove it (XDP forwarding for UDP, the bridge for TCP).
A failing call leaves a screenshot and the browser's logs in test-artifacts/."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket

import pytest

from manager.lab.netns import NetnsExecutor, _ipr
from manager.lab.services import LAB_TCP_PORT, running_lab
from manager.relay.control_client import ControlClient
from tests.support.chromium import Chromium
from tests.support.tcp_calls import BLOCK_UDP

# realtime: the checks count media against the wall clock.
pytestmark = [pytest.mark.netns, pytest.mark.realtime, pytest.mark.browser]

MESSAGES = 5
TONE = 440


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with running_lab(f"br{secrets.token_hex(3)}", tmp_path_factory.mktemp("services")) as (lab, svc):
        yield lab, svc, ControlClient(svc.config["control_socket"])


def fast_forwarded(ctl: ControlClient) -> int:
    rows = ctl.request("GET", "/stats")["fastpath"]["counters"]
    return sum(r["packets"] for r in rows if r["name"].startswith("fwd_"))


def bridged(ctl: ControlClient) -> int:
    tcp = ctl.request("GET", "/stats")["slowpath"]["tcp"] or {}
    return tcp.get("events", {}).get("frames_in", 0) + tcp.get("events", {}).get("frames_out", 0)


def _heard_everything(r: dict) -> bool:
    return bool(r.get("error")) or (
        r.get("state") == "connected" and r.get("dc_echoed", 0) >= MESSAGES and r.get("path") is not None
        and r.get("level", 0) > 0.01 and r.get("peak_hz") is not None and abs(r["peak_hz"] - TONE) < 30)


def browser_call(lab, name: str, base_url: str) -> dict:
    """One call from Chromium in the client namespace; the page's report (artifacts saved on failure)."""
    chrome = Chromium(lab.client_ns, f"{base_url}/?autostart=1&messages={MESSAGES}", origin=base_url)
    chrome.start()
    try:
        with NetnsExecutor(lab.client_ns) as ex:
            report, shot = ex.call(asyncio.run, chrome.watch(_heard_everything, timeout=30))
        if not _heard_everything(report) or report.get("error"):
            where = chrome.save_artifacts(name, report, shot)
            pytest.fail(f"browser call over {name} failed: {report}; screenshot and logs in {where}")
        return report
    finally:
        chrome.stop()


@contextlib.contextmanager
def only_family(lab, family: int):
    """The client namespace without its address (and so its routes) of the other family."""
    ep = lab.client
    addr, plen, gw = ((ep.addr6, ep.prefixlen6, ep.relay_addr6) if family == socket.AF_INET
                      else (ep.addr4, ep.prefixlen4, ep.relay_addr4))
    with _ipr(lab.client_ns) as ipr:
        idx = ipr.link_lookup(ifname=ep.ifname)[0]
        ipr.addr("del", index=idx, address=addr, prefixlen=plen)
    try:
        yield
    finally:
        with _ipr(lab.client_ns) as ipr:
            idx = ipr.link_lookup(ifname=ep.ifname)[0]
            other = socket.AF_INET6 if family == socket.AF_INET else socket.AF_INET
            # IFA_F_NODAD (0x02) for IPv6: usable at once, as the lab adds it.
            ipr.addr("add", index=idx, address=addr, prefixlen=plen, flags=0x02 if other == socket.AF_INET6 else 0)
            ipr.route("replace", dst="::/0" if other == socket.AF_INET6 else "0.0.0.0/0", gateway=gw, oif=idx,
                      family=other)


def test_chromium_calls_over_udp_ipv4(env):
    lab, svc, ctl = env
    with only_family(lab, socket.AF_INET):
        before = fast_forwarded(ctl)
        report = browser_call(lab, "udp-ipv4", lab.signaling_url)
    assert report["path"].startswith("UDP IPv4 to 10.10.1.1:"), report
    assert fast_forwarded(ctl) - before > 100  # XDP carried it
    print(f"\nChromium over UDP/IPv4: connected in {report['connected_ms']} ms, {report}")


def test_chromium_calls_over_udp_with_ipv6_only(env):
    lab, svc, ctl = env
    with only_family(lab, socket.AF_INET6):
        before = fast_forwarded(ctl)
        report = browser_call(lab, "udp-ipv6", lab.signaling_url6)
    assert report["path"].startswith(f"UDP IPv6 to {lab.vip6}:"), report
    assert fast_forwarded(ctl) - before > 100
    print(f"\nChromium over UDP/IPv6: connected in {report['connected_ms']} ms, {report}")


def test_chromium_falls_back_to_tcp_when_udp_is_blocked(env):
    lab, svc, ctl = env
    lab.run(lab.client_ns, ["nft", "-f", "-"],
            input=BLOCK_UDP.format(vip4=lab.vip4, vip6=lab.vip6, port=lab.port), check=True)
    try:
        before_fast, before_bridge = fast_forwarded(ctl), bridged(ctl)
        report = browser_call(lab, "tcp", lab.signaling_url)
    finally:
        lab.run(lab.client_ns, ["nft", "delete", "table", "inet", "splitrelay_test_block"], check=True)
    assert report["path"].startswith("TCP IPv") and report["path"].endswith(f":{LAB_TCP_PORT}"), report
    assert bridged(ctl) - before_bridge > 100  # the bridge carried it (frames both ways)
    assert fast_forwarded(ctl) - before_fast < 10  # and XDP did not
    print(f"\nChromium over ICE-TCP: connected in {report['connected_ms']} ms, {report}")


def test_the_lab_serves_the_page(env):
    lab, svc, ctl = env
    with NetnsExecutor(lab.client_ns) as ex:
        body = ex.call(_get, f"{lab.signaling_url}/")
    assert "<title>splitrelay: talk to the agent</title>" in body


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()
