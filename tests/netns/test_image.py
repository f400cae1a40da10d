"""The OCI image `make image` builds, run with podman as deploy/ runs it:
relayd in a container on the lab relay namespace's network with exactly the
capabilities the DaemonSet grants (no --privileged), each transceiver in its
own container as a non-root user, and a real aiortc call through them.

The image is (re)built first: the debootstrapped rootfs and the wheels are
cached (/var/cache/splitrelay/image), so a rebuild takes about half a minute;
a cold build about two (docs/operations.md)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from manager.lab.lifecycle import lab as lab_ctx
from manager.lab.services import Services, purge_pin_dir, to_toml, write_secret
from tests.support.image import (
    HEADERS_DIR,
    IMAGE,
    ImageLauncher,
    build_image,
    daemonset_capabilities,
    podman,
    relayd_security_args,
)
from tests.support.lab_calls import run_call

pytestmark = pytest.mark.netns

CAP_NUMBERS = {"NET_ADMIN": 12, "NET_RAW": 13, "SYS_ADMIN": 21, "PERFMON": 38, "BPF": 39}  # linux/capability.h


@pytest.fixture(scope="module")
def image() -> str:
    seconds = build_image()
    print(f"\nimage {IMAGE} built in {seconds:.0f} s", file=sys.stderr)
    return IMAGE


def run_image(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(podman("run", "--rm", *args), capture_output=True, text=True, timeout=timeout)


def test_the_image_holds_the_clis_and_bcc(image: str) -> None:
    for cli in ("relayd", "relayctl", "splitrelay-transceiver"):
        out = run_image(image, cli, "--help")
        assert out.returncode == 0 and "usage" in out.stdout.lower(), (cli, out.stderr)
    out = run_image("--user", "splitrelay", image, "sh", "-c", "id -u; python3 -c 'import bcc'")
    assert out.returncode == 0 and out.stdout.split() == ["10001"], out.stderr
    # The headers bcc uses: the image's merged tree, not the node's (this
    # machine's kernel has none of its own in the image).
    out = run_image(image, "sh", "-c", f"ls {HEADERS_DIR}/*/.complete {HEADERS_DIR}/*/include/uapi/linux/bpf.h; "
                    "ls /lib/modules 2>&1 || true")
    assert out.returncode == 0 and out.stdout.count(HEADERS_DIR) == 2, out.stdout + out.stderr


def test_relayd_gets_no_privilege_the_daemonset_does_not_grant() -> None:
    caps = daemonset_capabilities()
    assert "SYS_ADMIN" not in caps and "SYS_RESOURCE" not in caps
    assert set(caps) == {"BPF", "PERFMON", "NET_ADMIN", "NET_RAW"}


def test_a_call_through_relayd_and_transceivers_in_containers(image: str, tmp_path: Path) -> None:
    prefix = f"img{secrets.token_hex(3)}"
    launcher = ImageLauncher(workdir=tmp_path, prefix=prefix, image=image)
    with lab_ctx(prefix=prefix, transceivers=2) as lab:
        svc = Services(lab, workdir=tmp_path, launcher=launcher)
        try:
            svc.start(timeout=90)  # bcc compiles inside the container
            running = subprocess.run(podman("ps", "--format", "{{.Names}} {{.Image}}"), capture_output=True,
                                     text=True, check=True).stdout
            for name in ("relayd", "tx1", "tx2"):
                assert f"{prefix}-{name} {image}" in running, running
            # What each process holds: relayd uid 0 with the four capabilities, a transceiver uid 10001 with none.
            status = {name: dict(line.split(":\t", 1) for line in subprocess.run(
                podman("exec", f"{prefix}-{name}", "cat", "/proc/1/status"), capture_output=True, text=True,
                check=True).stdout.splitlines() if ":\t" in line) for name in ("relayd", "tx1")}
            assert status["relayd"]["Uid"].split()[:2] == ["0", "0"]
            assert int(status["relayd"]["CapEff"], 16) == sum(1 << CAP_NUMBERS[c] for c in daemonset_capabilities())
            assert status["tx1"]["Uid"].split()[:2] == ["10001", "10001"] and int(status["tx1"]["CapEff"], 16) == 0
            rep = run_call(lab, duration=3.0, messages=10)
            assert rep.error is None, rep.error
            assert rep.connected and "failed" not in rep.connection_states
            assert rep.audio_frames_received > 100 and rep.dc_echoed == 10 and rep.tone_ratio > 10, rep.to_dict()
            # The media crossed relayd's XDP program, loaded from the container.
            forwarded = sum(v for (name, labels), v in svc.metrics().items()
                            if name == "splitrelay_fastpath_packets_total" and dict(labels)["verdict"] == "forward")
            assert forwarded >= rep.rtp_packets_sent
            log = svc.log_path("relayd").read_text()
            assert "relayd ready" in log and "Traceback" not in log
        finally:
            svc.stop()
            launcher.remove_all()


def test_an_image_without_headers_for_the_kernel_says_so_in_one_line(image: str, tmp_path: Path) -> None:
    """The image's merged headers hidden (an empty tmpfs, not a copy of them:
    an image built without them) and no node headers mounted: relayd names
    the problem in one line."""
    ns = f"img{secrets.token_hex(3)}"
    pin_dir = Path(f"/sys/fs/bpf/splitrelay-{ns}")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        write_secret(tmp_path / "hint.key", os.urandom(32).hex() + "\n")
        write_secret(tmp_path / "relayd.toml", to_toml({
            "hint_key_file": str(tmp_path / "hint.key"), "control_socket": str(tmp_path / "relayd.sock"),
            "datapath": {"pin_dir": str(pin_dir), "interfaces": ["lo"], "public_interfaces": ["lo"],
                         "vips": [{"addr": "127.0.0.1", "port": 3478}], "internal_addr4": "127.0.0.2"}}))
        out = run_image("--network", f"ns:/run/netns/{ns}", *relayd_security_args(),
                        "--mount", f"type=tmpfs,destination={HEADERS_DIR},notmpcopyup", "-v", "/sys/fs/bpf:/sys/fs/bpf",
                        "-v", f"{tmp_path}:{tmp_path}", image, "relayd", "-c", str(tmp_path / "relayd.toml"))
        assert out.returncode == 1, out.stdout + out.stderr
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert "Traceback" not in out.stderr
        assert lines[-1].startswith(f"Error: no kernel headers for {os.uname().release}"), out.stderr
        assert not any("Error" in line for line in lines[:-1]), out.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        purge_pin_dir(pin_dir)
