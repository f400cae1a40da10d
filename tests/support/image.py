"""The OCI image (scripts/image-build.sh) and running its components with podman.

ImageLauncher plugs into manager.lab.services.Services(launcher=...): each
component the lab would start as a process runs instead in its own container
that joins the component's namespace, as the manifests in deploy/ run them.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.support.paths import REPO

VERSION = next(line.split('"')[1] for line in (REPO / "pyproject.toml").read_text().splitlines()
               if line.startswith("version = "))
IMAGE = f"localhost/splitrelay:{VERSION}"  # what `make image` tags and deploy/ runs
HEADERS_DIR = "/var/lib/splitrelay/kernel-headers"  # the image's merged headers (scripts/image-build.sh)
TRANSCEIVER_UID = 10001  # the image's splitrelay user
CLIS = {"cli.relayd": "relayd", "manager.transceiver": "splitrelay-transceiver"}


def build_image() -> float:
    """`scripts/image-build.sh` (the debootstrap rootfs and wheels are cached);
    the seconds it took."""
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(REPO / "scripts" / "image-build.sh")], capture_output=True, text=True,
                          timeout=1200)
    if proc.returncode != 0:
        raise AssertionError(f"image build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.monotonic() - t0


def _relayd_security() -> dict:
    doc = yaml.safe_load((REPO / "deploy" / "base" / "relay-daemonset.yaml").read_text())
    (c,) = doc["spec"]["template"]["spec"]["containers"]
    return c["securityContext"]


def daemonset_capabilities() -> list[str]:
    """The capabilities deploy/relay-daemonset.yaml grants relayd."""
    return list(_relayd_security()["capabilities"]["add"])


def relayd_security_args() -> list[str]:
    """podman's flags for relayd's securityContext in the DaemonSet: its
    capabilities only, its seccomp profile, a read-only root."""
    sc = _relayd_security()
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["readOnlyRootFilesystem"] is True
    assert not sc.get("privileged") and sc["allowPrivilegeEscalation"] is False
    seccomp = {"Unconfined": "unconfined", "RuntimeDefault": None}[sc["seccompProfile"]["type"]]
    return ["--cap-drop", "ALL", *(a for c in sc["capabilities"]["add"] for a in ("--cap-add", f"CAP_{c}")),
            "--read-only", "--security-opt", "no-new-privileges",
            *(["--security-opt", f"seccomp={seccomp}"] if seccomp else [])]


def podman(*args: str) -> list[str]:
    """podman with what this kind of machine needs, and nothing a cluster lacks:
    runc (crun 1.8 refuses hybrid cgroup v1/v2 hosts), and explicit open-file
    and process limits below the current ones (podman's defaults raise them,
    which needs CAP_SYS_RESOURCE, which a sandboxed root may not hold)."""
    nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 16384)
    return ["podman", "--runtime", shutil.which("runc") or "runc", *args[:1],
            *(["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=16384:16384"]
              if args[:1] in (("run",), ("create",)) else []), *args[1:]]


@dataclass
class ImageLauncher:
    """(name, namespace, module argv) -> `podman run` of that component.

    relayd: uid 0 with exactly the DaemonSet's capabilities (no --privileged),
    a read-only root file system, the host's bpffs for its pins. Transceivers:
    the image's non-root user, no capabilities, their secrets copied to a
    directory of that user and mounted where the Deployment mounts them."""

    workdir: Path
    prefix: str
    image: str = IMAGE
    containers: list[str] = field(default_factory=list)

    def __call__(self, name: str, ns: str, argv: list[str]) -> list[str]:
        assert argv[0] == "-m" and argv[1] in CLIS, argv
        cli, args = CLIS[argv[1]], list(argv[2:])
        container = f"{self.prefix}-{name}"
        self.containers.append(container)
        # --rm and the name: a container left from an earlier run would refuse the name.
        subprocess.run(podman("rm", "-f", "-t", "0", container), capture_output=True)
        common = ["run", "--rm", "--name", container, "--network", f"ns:/run/netns/{ns}"]
        if cli == "relayd":
            Path("/run/splitrelay").mkdir(parents=True, exist_ok=True)
            return podman(*common, *relayd_security_args(), "-v", "/sys/fs/bpf:/sys/fs/bpf",
                          "-v", f"{self.workdir}:{self.workdir}", "-v", "/run/splitrelay:/run/splitrelay",
                          self.image, cli, *args)
        mounts = self._transceiver_secrets(name, args)
        return podman(*common, "--cap-drop", "ALL", "--read-only", "--security-opt", "no-new-privileges",
                      "--user", f"{TRANSCEIVER_UID}:{TRANSCEIVER_UID}", *mounts, self.image, cli, *args)

    def _transceiver_secrets(self, name: str, args: list[str]) -> list[str]:
        """Copy the transceiver's certificate, key and the hint key for its
        user (mode 0400, as the Deployment's Secret volumes); rewrite args."""
        tid = args[args.index("--id") + 1]
        pki_src = Path(args[args.index("--pki-dir") + 1])
        hint_src = Path(args[args.index("--hint-key-file") + 1])
        base = self.workdir / f"{name}-secrets"
        shutil.rmtree(base, ignore_errors=True)
        for sub, files in (("pki", [pki_src / "ca.pem", pki_src / f"transceiver-{tid}.pem",
                                    pki_src / f"transceiver-{tid}.key"]), ("hint", [hint_src])):
            d = base / sub
            d.mkdir(parents=True)
            for f in files:
                shutil.copyfile(f, d / f.name)
                os.chown(d / f.name, TRANSCEIVER_UID, TRANSCEIVER_UID)
                os.chmod(d / f.name, 0o400)
            os.chown(d, TRANSCEIVER_UID, TRANSCEIVER_UID)
        os.chmod(base, 0o755)
        args[args.index("--pki-dir") + 1] = "/etc/splitrelay/pki"
        args[args.index("--hint-key-file") + 1] = "/etc/splitrelay/hint/hint.key"
        return ["-v", f"{base / 'pki'}:/etc/splitrelay/pki:ro", "-v", f"{base / 'hint'}:/etc/splitrelay/hint:ro"]

    def remove_all(self) -> None:
        for c in self.containers:
            subprocess.run(podman("rm", "-f", "-t", "2", c), capture_output=True)
