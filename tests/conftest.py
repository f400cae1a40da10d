"""Suite-wide markers: what a test needs, and skips that say why when it is missing.

The layer a test lives in says what it needs: tests/unit runs as any user with
no network; tests/bpf, tests/netns, tests/e2e and tests/bench load XDP
programs, build namespaces or start real services, so they need root. A test
that drives a browser is marked ``browser``. Without root (or a browser) those
tests are skipped with a one-line reason. ``make test`` sets
SPLITRELAY_FORBID_SKIPS=1: there a skip fails the run, so CI always runs the
whole suite.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT_LAYERS = ("bpf", "netns", "e2e", "bench")
BROWSERS = ("chromium", "firefox-esr", "firefox")
FORBID_SKIPS = "SPLITRELAY_FORBID_SKIPS"


def _layer(item: pytest.Item) -> str:
    try:
        return Path(str(item.path)).resolve().relative_to(HERE).parts[0]
    except (ValueError, IndexError):
        return ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    is_root = os.geteuid() == 0
    have_browser = any(shutil.which(b) for b in BROWSERS)
    no_root = pytest.mark.skip(reason="needs root (XDP, namespaces or real services): run `sudo make test`")
    no_browser = pytest.mark.skip(reason="needs a browser: `make setup` installs chromium and firefox-esr")
    for item in items:
        if _layer(item) in ROOT_LAYERS:
            item.add_marker(pytest.mark.root)
        if item.get_closest_marker("root") and not is_root:
            item.add_marker(no_root)
        elif item.get_closest_marker("browser") and not have_browser:
            item.add_marker(no_browser)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if os.environ.get(FORBID_SKIPS) == "1" and skipped:
        terminalreporter.write_line(
            f"{len(skipped)} test(s) skipped while {FORBID_SKIPS}=1: the whole suite must run here", red=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if os.environ.get(FORBID_SKIPS) == "1" and skipped and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
