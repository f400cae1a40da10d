"""An installed relayd works outside the checkout: the wheel carries the BPF
sources, and the installed package compiles and loads the XDP program from
its own copy (found with importlib.resources), from a directory with no
checkout in sight."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import uuid
import zipfile
from pathlib import Path

import pytest

from tests.support.paths import REPO

BPF_FILES = {"relay.bpf.c", "consts.h", "structs.h", "maps.h", "parse.h", "stun.h", "csum.h"}

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the tracked (and new, unignored) files: no build/
    # leftovers of an earlier layout can leak into it.
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
                   check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("splitrelay-*.whl")
    return whl


def test_wheel_carries_the_bpf_sources(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith("manager/relay/kernel/bpf/")}
    assert shipped >= BPF_FILES, f"missing from the wheel: {BPF_FILES - shipped}"
    assert "manager/relay/kernel/bpf/testing/redirect_only.bpf.c" in names
    assert not any(n.startswith(("tests/", "bpf/")) for n in names)


def test_installed_relayd_loads_its_own_program(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    # System site packages for bcc (Debian's python3-bpfcc), as the set-up does.
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # The third-party dependencies come from the project's venv (no index
    # here), appended after the new venv's own site-packages, so `manager`
    # can only come from the wheel installed below.
    Path(site, "splitrelay-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=300)

    pin_dir = f"/sys/fs/bpf/srwheel-{uuid.uuid4().hex[:8]}"
    script = textwrap.dedent(f"""
        import json, manager
        from manager.relay.config import DatapathConfig
        from manager.relay.kernel.datapath import PROG_SOURCE, Datapath
        from manager.relay.kernel.structs import BPF_DIR
        dp = Datapath(DatapathConfig(pin_dir={pin_dir!r}, interfaces=[], vips=[{{"addr": "10.9.9.9", "port": 3478}}],
                                     internal_addr4="10.9.9.1", max_flows=1024, max_reverse=1024,
                                     max_owners=1024))
        try:
            adopted = dp.load()
            ok = dp.prog_fd >= 0
        finally:
            dp.detach(purge=True)
            dp.close()
        print(json.dumps({{"manager": manager.__file__, "bpf_dir": str(BPF_DIR), "source": str(PROG_SOURCE),
                           "adopted": adopted, "loaded": ok}}))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    res = subprocess.run([str(py), "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["manager"].startswith(str(venv)), got
    assert got["bpf_dir"].startswith(str(venv)) and got["source"].startswith(str(venv)), got
    assert got["loaded"] and not got["adopted"]
    assert not Path(pin_dir).exists()

    # The console script runs from there too.
    res = subprocess.run([str(venv / "bin" / "relayd"), "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and "relay manager" in res.stdout
