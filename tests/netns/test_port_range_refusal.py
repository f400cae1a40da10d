"""relayd refuses flow ports the kernel may hand out as ephemeral ports, read
from its own namespace's sysctls, in one line; reserving those ports
(ip_local_reserved_ports) lets the same configuration start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from manager import pki
from manager.lab.services import purge_pin_dir, to_toml, write_secret
from tests.support.paths import REPO
from tests.support.waiting import eventually

NS = "splitrelay-portrange"
PIN_DIR = Path("/sys/fs/bpf/splitrelay-portrange")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def namespace():
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    ip("netns", "add", NS)
    ip("-n", NS, "link", "set", "lo", "up")
    try:
        yield NS
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)
        purge_pin_dir(PIN_DIR)


def _config(tmp_path: Path, flow: tuple[int, int]) -> Path:
    pki.init_ca(tmp_path / "pki")
    pki.issue(tmp_path / "pki", pki.relayd_name())
    write_secret(tmp_path / "hint.key", os.urandom(32).hex() + "\n")
    cfg = {
        "hint_key_file": str(tmp_path / "hint.key"),
        "control_socket": str(tmp_path / "relayd.sock"),
        "datapath": {"pin_dir": str(PIN_DIR), "interfaces": ["lo"], "public_interfaces": ["lo"],
                     "vips": [{"addr": "127.0.0.1", "port": 3478}], "internal_addr4": "127.0.0.2",
                     "flow_port_min": flow[0], "flow_port_max": flow[1]},
        "signaling": {"host": "127.0.0.1", "port": 8080},
        "internal": {"host": "127.0.0.1", "port": 8443, "pki_dir": str(tmp_path / "pki")},
        "metrics": {"port": 0},
    }
    path = tmp_path / "relayd.toml"
    write_secret(path, to_toml(cfg))
    return path


def _relayd(ns: str, config: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        # nsenter, not `ip netns exec`: that remounts /sys, hiding the bpffs.
        return subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-m", "cli.relayd", "-c", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)


def test_relayd_refuses_flow_ports_in_the_ephemeral_range(namespace: str, tmp_path: Path) -> None:
    ip("netns", "exec", namespace, "sysctl", "-qw", "net.ipv4.ip_local_port_range=32768 60999")
    config = _config(tmp_path, (20000, 39999))
    proc = _relayd(namespace, config, tmp_path / "relayd.log")
    try:
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:  # it started: the refusal is gone
            proc.kill()
            proc.wait()
    out = (tmp_path / "relayd.log").read_text()
    assert "Traceback" not in out
    (line,) = [x for x in out.splitlines() if "ephemeral" in x]
    assert line.startswith("Error: the flow ports 20000-39999 overlap the kernel's ephemeral port range 32768-60999")
    assert not PIN_DIR.exists()  # refused before anything was loaded


def test_reserved_flow_ports_let_the_same_configuration_start(namespace: str, tmp_path: Path) -> None:
    ip("netns", "exec", namespace, "sysctl", "-qw", "net.ipv4.ip_local_port_range=32768 60999")
    ip("netns", "exec", namespace, "sysctl", "-qw", "net.ipv4.ip_local_reserved_ports=32768-39999")
    config = _config(tmp_path, (20000, 39999))
    log = tmp_path / "relayd.log"
    proc = _relayd(namespace, config, log)
    try:
        eventually(lambda: proc.poll() is not None or "relayd ready" in log.read_text(), 60,
                   what="relayd to start or exit")
        assert proc.poll() is None, log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
