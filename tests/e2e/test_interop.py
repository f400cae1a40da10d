"""The interop matrix: every standard WebRTC stack calls the echo agent
through the lab's relay (relayd with XDP, two transceivers) and:

- hears its tone come back, at the level it sent it (within LEVEL_DB);
- gets its data-channel pings echoed;
- is moved live to the other transceiver, and its audio and data channel
  go on (more pings echoed, the tone at its level again).

Clients (tests/support/interop_clients.py): Chromium over UDP/IPv4, UDP with
IPv6 only, and ICE-TCP (UDP blocked); Firefox ESR; GStreamer's webrtcbin with
its default RSA certificate and with an ECDSA one; aiortc. Each row records
what the transceiver negotiated (DTLS version, cipher suite, SRTP profile)
into test-artifacts/interop.json, which docs/interop.md is rendered from
(tests/support/interop_doc.py). A failing browser row leaves its report and
logs under test-artifacts/."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from manager.lab.netns import NetnsExecutor, _ipr
from manager.lab.services import LAB_TCP_PORT, running_lab
from manager.relay.control_client import ControlClient
from tests.support.chromium import Chromium
from tests.support.firefox import Firefox
from tests.support.interop_clients import AiortcClient, BrowserClient, GstClient, Reading
from tests.support.interop_doc import client_versions, write_artifact
from tests.support.tcp_calls import udp_blocked

# realtime: the checks count media against the wall clock.
pytestmark = [pytest.mark.netns, pytest.mark.realtime]

LEVEL_DB = 1.0  # echo level against the sent level, over a second of readings
PINGS_BEFORE = 3  # data-channel echoes before the migration
PINGS_AFTER = 5  # and after it
PAGE_PINGS = 1000  # the page pings every 200 ms until it has sent this many: for the whole call


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with running_lab(f"io{secrets.token_hex(3)}", tmp_path_factory.mktemp("services")) as (lab, svc):
        yield lab, svc, ControlClient(svc.config["control_socket"])


@pytest.fixture(scope="module")
def matrix():
    rows: list[dict] = []
    yield rows
    write_artifact(rows, client_versions())


def fast_forwarded(ctl: ControlClient) -> int:
    rows = ctl.request("GET", "/stats")["fastpath"]["counters"]
    return sum(r["packets"] for r in rows if r["name"].startswith("fwd_"))


def bridged(ctl: ControlClient) -> int:
    tcp = ctl.request("GET", "/stats")["slowpath"]["tcp"] or {}
    return tcp.get("events", {}).get("frames_in", 0) + tcp.get("events", {}).get("frames_out", 0)


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


@dataclass(frozen=True)
class Row:
    name: str
    client: str  # the key of client_versions()
    make: Callable  # (lab, url) -> client
    network: str = "dual"  # "ipv4", "ipv6" (only that family) or "tcp" (UDP blocked)

    def url(self, lab) -> str:
        return lab.signaling_url6 if self.network == "ipv6" else lab.signaling_url

    def conditions(self, lab):
        if self.network == "ipv4":
            return only_family(lab, socket.AF_INET)
        if self.network == "ipv6":
            return only_family(lab, socket.AF_INET6)
        if self.network == "tcp":
            return udp_blocked(lab)
        return contextlib.nullcontext()


def _chromium(lab, url):
    return BrowserClient(Chromium(lab.client_ns, f"{url}/?messages={PAGE_PINGS}", origin=url))


def _firefox(lab, url):
    return BrowserClient(Firefox(lab.client_ns, f"{url}/?messages={PAGE_PINGS}"))


ROWS = [
    pytest.param(Row("chromium-udp4", "chromium", _chromium, "ipv4"), marks=pytest.mark.browser, id="chromium-udp4"),
    pytest.param(Row("chromium-udp6", "chromium", _chromium, "ipv6"), marks=pytest.mark.browser, id="chromium-udp6"),
    pytest.param(Row("chromium-tcp", "chromium", _chromium, "tcp"), marks=pytest.mark.browser, id="chromium-tcp"),
    pytest.param(Row("firefox-esr", "firefox", _firefox), marks=pytest.mark.browser, id="firefox-esr"),
    pytest.param(Row("gstreamer-rsa", "gstreamer", lambda lab, url: GstClient(url, ecdsa=False)), id="gstreamer-rsa"),
    pytest.param(Row("gstreamer-ecdsa", "gstreamer", lambda lab, url: GstClient(url, ecdsa=True)),
                 id="gstreamer-ecdsa"),
    pytest.param(Row("aiortc", "aiortc", lambda lab, url: AiortcClient(url)), id="aiortc"),
]


def level_db(readings: list[Reading]) -> float:
    """The echo's level against the sent level, medians over the readings."""
    echo = statistics.median(r.level for r in readings)
    sent = statistics.median(r.sent_level for r in readings)
    return 20 * math.log10(max(echo, 1e-6) / max(sent, 1e-6))


async def until(client, what: str, predicate, timeout: float) -> Reading:
    deadline = time.monotonic() + timeout
    while True:
        r = await client.status()
        if r.error:
            raise AssertionError(f"{what}: the client failed: {r.error}")
        if predicate(r):
            return r
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {r}")
        await asyncio.sleep(0.25)  # pacing: the clients refresh their readings every 250 ms


async def listen(client, seconds: float = 1.0) -> list[Reading]:
    """A second of readings, each with the tone in the echo."""
    readings = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        r = await client.status()
        assert r.connected and r.tone_ok, f"the echo lost its tone: {r}"
        readings.append(r)
        await asyncio.sleep(0.25)  # pacing: one reading per refresh
    return readings


async def call_row(client, svc, ctl, known: set[str], result: dict) -> None:
    """One row's call (runs on the client namespace's thread)."""
    t0 = time.monotonic()
    await client.start()
    try:
        await until(client, "connected, echoing tone and pings", lambda r: r.connected and r.tone_ok
                    and r.level > 0.01 and r.sent_level > 0.01 and r.dc_echoed >= PINGS_BEFORE, 30)
        result["connected_s"] = round(time.monotonic() - t0, 2)
        before = await listen(client)
        result["level_db_before"] = round(level_db(before), 2)
        result["sent_level"] = round(statistics.median(r.sent_level for r in before), 3)
        result["path"] = before[-1].path
        calls = [c for c in await asyncio.to_thread(svc.calls) if c["call_id"] not in known]
        assert len(calls) == 1, f"expected this row's one call in the registry, got {calls}"
        call = calls[0]
        known.add(call["call_id"])
        state = await asyncio.to_thread(svc.transceiver_api, call["transceiver_id"], f"/calls/{call['conn_id']}")
        dtls = state["export"]["dtls"]
        result["media_engine"] = state["media_engine"]  # the established call's carrier, before the move
        result.update(dtls_version=dtls["version"], cipher=dtls["cipher"], srtp_profile=dtls["srtp_profile"],
                      data_channels_movable=state["export"]["sctp"]["association"] is not None
                      if state["export"].get("sctp") else False)
        target = 2 if call["transceiver_id"] == 1 else 1
        mark = (await client.status()).dc_echoed
        res = await asyncio.to_thread(ctl.request, "POST", f"/sessions/{call['call_id']}/migrate", {"to": target})
        result["migration"] = res["outcome"]
        assert res["outcome"] == "moved", res
        await until(client, "pings echoed after the migration",
                    lambda r: r.connected and r.dc_echoed >= mark + PINGS_AFTER, 15)
        after = await listen(client)
        result["level_db_after"] = round(level_db(after), 2)
        last = after[-1]
        result["dc"] = f"{last.dc_echoed}/{last.dc_sent}"
        if result["network"] == "tcp":  # the bridge's counts of the ICE-TCP leg, as the record has them
            live = await asyncio.to_thread(ctl.request, "GET", f"/calls/{call['call_id']}")
            result["client_relay"] = live["record"]["client_relay"]
            result["relay_transceiver"] = live["record"]["relay_transceiver"]
        moved = await asyncio.to_thread(svc.transceiver_api, target, f"/calls/{call['conn_id']}")
        assert moved is not None and moved["imported"], moved
        data = moved["migration"]["data_channels"]
        assert data is not None and data["rx_records"] >= 1 and data["rx_unauthenticated"] == 0, data
    finally:
        await client.stop()


@pytest.mark.parametrize("row", ROWS)
def test_interop(env, matrix, row: Row):
    lab, svc, ctl = env
    known = {c["call_id"] for c in svc.calls()}
    result: dict = {"row": row.name, "client": row.client, "network": row.network, "passed": False}
    matrix.append(result)
    with row.conditions(lab):
        fast, bridge = fast_forwarded(ctl), bridged(ctl)
        client = row.make(lab, row.url(lab))
        try:
            with NetnsExecutor(lab.client_ns) as ex:
                ex.call(asyncio.run, asyncio.wait_for(call_row(client, svc, ctl, known, result), 50))
        except BaseException as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"[:300]
            if isinstance(client, BrowserClient):
                where = save_browser_artifacts(client, row.name)
                raise AssertionError(f"{row.name}: {exc}; the page's report and logs in {where}") from exc
            raise
        fast, bridge = fast_forwarded(ctl) - fast, bridged(ctl) - bridge
    for key in ("level_db_before", "level_db_after"):
        assert abs(result[key]) <= LEVEL_DB, f"echo level {result[key]:+.2f} dB from the sent level: {result}"
    assert result["dtls_version"] == "DTLSv1.2" and result["data_channels_movable"], result
    assert result["media_engine"] == {"carried": True, "handed_over": True}, result  # aiortc only shook hands
    if row.network == "tcp":
        assert result["path"].startswith("TCP IPv") and result["path"].endswith(f":{LAB_TCP_PORT}"), result
        assert bridge > 100 and fast < 10, (bridge, fast)  # the bridge carried it, XDP did not
        # The bridge counted the leg as XDP counts a flow: every packet both ways on
        # the client's hop, the client's RTP (its loss, 0 on TCP) and the agent's
        # as it reached the relay (the relay ⇄ transceiver hop's loss).
        hop, inner = result["client_relay"], result["relay_transceiver"]
        assert hop["uplink"]["packets"] > 100 and hop["downlink"]["packets"] > 100, hop
        for seq in (hop["uplink"], inner["downlink"]):
            assert (seq["expected"] or 0) > 100 and seq["lost"] <= 0 and seq["loss_fraction"] == 0, (hop, inner)
    elif row.network in ("ipv4", "ipv6"):
        vip = lab.vip4 if row.network == "ipv4" else lab.vip6
        assert result["path"].startswith(f"UDP IPv{row.network[-1]} to {vip}:"), result
        assert fast > 100, fast  # XDP carried it
    if row.name == "gstreamer-rsa":
        assert result["cipher"].startswith("ECDHE-RSA-"), result
    result["passed"] = True
    print(f"\n{row.name}: {json.dumps(result)}")


def save_browser_artifacts(client: BrowserClient, name: str):
    browser = client.browser
    if isinstance(browser, Chromium):
        return browser.save_artifacts(name, client.last, "")
    return browser.save_artifacts(name, client.last)


def test_the_lab_serves_the_page(env):
    lab, svc, ctl = env
    with NetnsExecutor(lab.client_ns) as ex:
        body = ex.call(_get, f"{lab.signaling_url}/")
    assert "<title>splitrelay: talk to the agent</title>" in body


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()
