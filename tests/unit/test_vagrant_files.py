"""The VM tooling (vagrant/) without a VM: scripts parse, the box builder
carries Vagrant's real insecure key, the Vagrantfile provisions with the
project's own set-up and forwards nothing. `make vm-test` runs the real thing
(docs/vm.md)."""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess

import pytest

from tests.support.paths import REPO

VAGRANT = REPO / "vagrant"
# MD5 fingerprint of Vagrant's published insecure public key (keys/vagrant.pub).
INSECURE_KEY_MD5 = "dd:3b:b8:2e:85:04:06:e9:ab:ff:a8:0a:c0:04:6e:d6"


@pytest.mark.parametrize("script", ["build-box.sh", "vm-test.sh", "accel.sh"])
def test_scripts_parse(script: str) -> None:
    path = VAGRANT / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_box_has_vagrants_insecure_key() -> None:
    text = (VAGRANT / "build-box.sh").read_text()
    (blob,) = re.findall(r"INSECURE_KEY='ssh-rsa (\S+) ", text)
    digest = hashlib.md5(base64.b64decode(blob)).hexdigest()
    assert ":".join(digest[i:i + 2] for i in range(0, 32, 2)) == INSECURE_KEY_MD5


def test_vagrantfile_provisions_with_the_projects_setup_and_forwards_nothing() -> None:
    text = (VAGRANT / "Vagrantfile").read_text()
    assert "make -C /splitrelay setup" in text
    assert "forwarded_port" not in text
    assert 'lv.driver = accel == "tcg" ? "qemu" : "kvm"' in text  # TCG where KVM cannot run guests
    assert "vagrant/.box/" in text  # the box build is never synced into the VM
