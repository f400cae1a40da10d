"""What /readyz answers: each part relayd needs to serve, named, with why it is not ready.

relayd is ready when it has started, its XDP program is attached on every
interface it serves, its maps are open (adopted or new), its registry is
reachable (always, in memory) and at least one healthy transceiver can take
a call. Each part is a check passed in by the daemon, so the probe holds no
knowledge of the components and each check is tested where it lives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

CheckResult = tuple[bool, str]


@dataclass(frozen=True)
class Part:
    name: str
    ok: bool
    detail: str

    def to_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


class Readiness:
    """Named checks, evaluated on every probe (each is cheap: no I/O beyond a netlink read)."""

    def __init__(self, checks: list[tuple[str, Callable[[], CheckResult]]]) -> None:
        self.checks = checks

    def parts(self) -> list[Part]:
        out = []
        for name, check in self.checks:
            try:
                ok, detail = check()
            except Exception as exc:  # a failing check is "not ready", with its reason
                ok, detail = False, f"check failed: {exc}"
            out.append(Part(name, bool(ok), detail))
        return out

    def evaluate(self) -> tuple[bool, list[Part]]:
        parts = self.parts()
        return all(p.ok for p in parts), parts

    @staticmethod
    def render_text(parts: list[Part]) -> str:
        return "".join(f"{p.name}: {'ok' if p.ok else 'NOT READY'} ({p.detail})\n" for p in parts)


def started(started_at: Callable[[], float | None]) -> Callable[[], CheckResult]:
    return lambda: (True, "serving") if started_at() else (False, "starting")


def xdp_attached(interfaces: list[str], attachment: Callable[[str], tuple[int | None, str | None]],
                 expected_prog_id: Callable[[], int | None]) -> Callable[[], CheckResult]:
    """Every served interface carries this relay's program (by id, when known)."""
    def check() -> CheckResult:
        want = expected_prog_id()
        missing = []
        for ifname in interfaces:
            prog_id, _mode = attachment(ifname)
            if prog_id is None or (want is not None and prog_id != want):
                missing.append(ifname if prog_id is None else f"{ifname} (program {prog_id}, not {want})")
        if missing:
            return False, "not attached on " + ", ".join(missing)
        return True, "attached on " + ", ".join(interfaces)
    return check


def transceivers_healthy(count_healthy: Callable[[], int]) -> Callable[[], CheckResult]:
    def check() -> CheckResult:
        n = count_healthy()
        return (n > 0), f"{n} healthy"
    return check
