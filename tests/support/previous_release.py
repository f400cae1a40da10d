"""A previous release of splitrelay, as shipped: its tree taken from git at
the commit that shipped a map layout, run with its own Python and BPF
sources (PYTHONPATH), so an upgrade test takes over from what that relayd
really pinned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# A commit of each shipped layout (manager/relay/kernel/layouts.py SHIPPED).
RELEASES = {"v1": "ac84ef3ce0399a970198e232fea9957d7a115c82"}


def extract(release: str, dest: Path) -> Path:
    """The release's tree under dest. Its BPF sources are linked where its
    package looks for them, so this checkout's editable install (which maps
    manager.relay.kernel.bpf onto the current bpf/) is not consulted."""
    dest.mkdir(parents=True, exist_ok=True)
    commit = RELEASES[release]
    if subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"],
                      capture_output=True).returncode:
        raise RuntimeError(f"release {release} ({commit[:12]}) is not in this clone's history: "
                           "a shallow clone needs `git fetch --unshallow` (make test does it)")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", RELEASES[release]],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    (dest / "manager" / "relay" / "kernel" / "bpf").symlink_to(dest / "bpf")
    return dest


def env(tree: Path) -> dict[str, str]:
    """The environment that runs the release's code instead of this checkout's."""
    return {**os.environ, "PYTHONPATH": str(tree)}


# Run by the release's Python: load and attach its fast path, then install
# the flows given (as its relayd would for calls), and print what it pinned.
_INSTALL = """
import json, sys
from manager.protocol.addresses import OwnerAddr
from manager.relay.config import DatapathConfig
from manager.relay.kernel.datapath import Datapath
spec = json.loads(sys.argv[1])
dp = Datapath(DatapathConfig(**spec["datapath"]))
dp.load()
dp.attach()
for f in spec["flows"]:
    dp.set_owner(f["conn_id"], OwnerAddr(**f["owner"]))
    dp.add_flow(tuple(f["client"]), tuple(f["vip"]), f["conn_id"], f["flow_port"])
for u in spec.get("ufrags", []):
    dp.admit_ufrag(u)
dp.close()
"""


def install(tree: Path, datapath: dict, flows: list[dict], ufrags: list[str] = (), ns: str | None = None) -> None:
    """Load the release's fast path with these flows (in namespace ns)."""
    spec = json.dumps({"datapath": datapath, "flows": flows, "ufrags": list(ufrags)}, default=str)
    argv = [sys.executable, "-c", _INSTALL, spec]
    if ns is not None:
        # nsenter, not `ip netns exec`: that remounts /sys, hiding bpffs.
        argv = ["nsenter", f"--net=/run/netns/{ns}", *argv]
    done = subprocess.run(argv, env=env(tree), cwd=tree, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the release's datapath install failed: {done.stderr.strip()[-2000:]}")


# Run by the release's Python: the tree of config keys its relayd accepts
# (nested sections as dicts, leaves as null).
_CONFIG_KEYS = """
import json
from pydantic import BaseModel
from manager.relay.config import RelaydConfig
def keys(model):
    out = {}
    for name, f in model.model_fields.items():
        a = f.annotation
        out[name] = keys(a) if isinstance(a, type) and issubclass(a, BaseModel) else None
    return out
print(json.dumps(keys(RelaydConfig)))
"""


def config_for(tree: Path):
    """A function that trims a relayd config (as the lab writes it) to the
    keys the release's relayd knows: its config refuses unknown keys, and
    settings added since have their defaults in this checkout's relayd."""
    done = subprocess.run([sys.executable, "-c", _CONFIG_KEYS], env=env(tree), cwd=tree, capture_output=True,
                          text=True, check=True)
    known = json.loads(done.stdout)

    def trim(cfg: dict, keys: dict = known) -> dict:
        return {k: trim(v, keys[k]) if isinstance(v, dict) and isinstance(keys[k], dict) else v
                for k, v in cfg.items() if k in keys}

    return trim
