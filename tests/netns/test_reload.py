"""Reloading a running relayd (SIGHUP, `relayctl reload`) in a namespace
lab: real relayd and transceiver processes, the client's requests from its
own namespace. The new API key, rate limit, CORS origin and trusted proxy
take effect; a field that needs a restart and a broken file are refused and
the running configuration stays."""

from __future__ import annotations

import asyncio
import ctypes
import json
import secrets
import signal
import subprocess
import sys

import aiohttp
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import AudioStreamTrack

from manager.lab.netns import NetnsExecutor
from manager.lab.services import running_lab, to_toml, write_secret
from tests.support.waiting import eventually

pytestmark = pytest.mark.netns

ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with running_lab(f"rl{secrets.token_hex(3)}", tmp_path_factory.mktemp("reload"), transceivers=1,
                     client_auth="api_keys") as (lab, svc):
        yield lab, svc


def create(lab, key: str, forwarded_for: str | None = None) -> tuple[int, str]:
    """POST an offer from the client's namespace: (status, the answer or a
    refusal's detail); a created call is ended again."""
    async def go() -> tuple[int, str]:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTrack(AudioStreamTrack())
        await pc.setLocalDescription(await pc.createOffer())
        headers = {"Content-Type": "application/sdp", "Authorization": f"Bearer {key}"}
        if forwarded_for:
            headers["X-Forwarded-For"] = forwarded_for
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{lab.signaling_url}/v1/calls", data=pc.localDescription.sdp,
                                     headers=headers) as resp:
                    status = resp.status
                    # A refusal is an RFC 9457 problem: its one-line detail.
                    text = ((await resp.json(content_type=None))["detail"]
                            if resp.content_type == "application/problem+json" else await resp.text())
                    location = resp.headers.get("Location")
                if status == 201:
                    async with http.delete(f"{lab.signaling_url}{location}", headers=headers) as resp:
                        assert resp.status == 204
                return status, text.strip()
        finally:
            await pc.close()

    with NetnsExecutor(lab.client_ns) as ex:
        return ex.call(asyncio.run, go())


def preflight(lab) -> int:
    async def go() -> int:
        async with aiohttp.ClientSession() as http, http.options(f"{lab.signaling_url}/v1/calls", headers={
                "Origin": ORIGIN, "Access-Control-Request-Method": "POST"}) as resp:
            return resp.status

    with NetnsExecutor(lab.client_ns) as ex:
        return ex.call(asyncio.run, go())


def write_config(svc, **sections) -> None:
    cfg = svc.config
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    write_secret(svc.config_path, to_toml(cfg))


def relayctl(svc, *args: str) -> subprocess.CompletedProcess:
    # The socket, not -c: relayd itself reads the file (relayctl would refuse a broken one first).
    return subprocess.run([sys.executable, "-m", "cli.relayctl", "--socket", svc.config["control_socket"], *args],
                          capture_output=True, text=True, timeout=60)


def sighup(svc) -> None:
    svc.procs["relayd"].send_signal(signal.SIGHUP)


def log_has(svc, text: str) -> bool:
    return text in svc.log_path("relayd").read_text(errors="replace")


def admit_source_interval_ns(svc) -> int:
    """XDP's per-source admission interval, read from the pinned admit_cfg map."""
    dp = svc.open_datapath(1)
    try:
        return dp.maps.admit_cfg.lookup(ctypes.c_uint32(0)).source_interval_ns
    finally:
        dp.close()


def test_sighup_applies_a_new_key_rate_origin_and_proxy(env):
    lab, svc = env
    assert admit_source_interval_ns(svc) == 10**9 // 20  # admit_source_rate's default: 20 checks/s
    old = (svc.workdir / "api.keys").read_text().strip()
    new = secrets.token_hex(16)
    assert create(lab, old)[0] == 201
    assert create(lab, new) == (401, "unauthorized: API key is not valid")
    assert preflight(lab) == 403

    write_secret(svc.workdir / "api.keys", new + "\n")
    write_config(svc, limits={"create_rate": 0.001, "create_burst": 1}, datapath={"admit_source_rate": 5.0},
                 signaling={"allowed_origins": [ORIGIN], "trusted_proxies": [f"{lab.client.addr4}/32"]})
    sighup(svc)
    eventually(lambda: log_has(svc, "reloaded: "), 10, what="relayd to log the reload")
    assert preflight(lab) == 204  # the origin
    assert admit_source_interval_ns(svc) == 10**9 // 5  # XDP's admission rate, in its map
    assert create(lab, old) == (401, "unauthorized: API key is not valid")  # the old key is gone ...
    assert create(lab, new, "192.0.2.1")[0] == 201  # ... the new one works
    # One call per source from now on; behind the trusted proxy, the source is the one it names.
    status, text = create(lab, new, "192.0.2.1")
    assert status == 429 and "at most 0.001 per second" in text, text
    assert create(lab, new, "192.0.2.2")[0] == 201


def test_restart_fields_and_broken_files_are_refused_and_change_nothing(env):
    lab, svc = env
    key = (svc.workdir / "api.keys").read_text().strip()
    other = secrets.token_hex(16)
    good = svc.config_path.read_text()
    # A restart-only field beside a live change: neither is applied.
    write_secret(svc.workdir / "api.keys", other + "\n")
    write_config(svc, datapath={"flow_port_max": 25000})
    res = relayctl(svc, "reload")
    assert res.returncode == 1, res
    line = res.stderr.strip()
    assert line.startswith("relayctl: reload refused, the running configuration stays: datapath.flow_port_max "
                           "needs a restart") and "\n" not in line, line
    sighup(svc)
    eventually(lambda: log_has(svc, "datapath.flow_port_max needs a restart"), 10, what="SIGHUP's refusal logged")
    assert create(lab, key, "192.0.2.11")[0] == 201
    assert create(lab, other, "192.0.2.12")[0] == 401

    # A file that does not parse: one line naming it, the running configuration stays.
    write_secret(svc.config_path, good + "\n[limits\n")
    res = relayctl(svc, "reload")
    assert res.returncode == 1 and "not valid TOML" in res.stderr and res.stderr.count("\n") == 1, res
    assert "Traceback" not in res.stderr
    assert create(lab, key, "192.0.2.13")[0] == 201

    # Put right, it applies, and --json says what changed.
    write_secret(svc.config_path, good)
    res = relayctl(svc, "reload", "--json")
    assert res.returncode == 0, res
    assert json.loads(res.stdout)["changed"] == ["client_auth.api_keys: 1 added, 1 removed"]
    assert create(lab, other, "192.0.2.14")[0] == 201
    assert create(lab, key, "192.0.2.15")[0] == 401
