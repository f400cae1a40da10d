"""The wheel carries every package of the code: a package missing from pyproject's list
installs a relayd or a transceiver that fails at import (the container image runs the wheel)."""

from __future__ import annotations

import tomllib

from tests.support.paths import REPO


def test_every_python_package_is_listed_for_the_wheel():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts)
             for top in ("manager", "cli") for p in (REPO / top).rglob("__init__.py")}
    assert found - listed == set(), f"packages missing from [tool.setuptools] packages: {sorted(found - listed)}"
