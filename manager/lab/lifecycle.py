"""A lab's life: `lab_up` builds the planned topology (manager.lab.model) in
namespaces and records it, `lab_down` removes it with whatever runs in it,
`lab()` is both around a block. Any failure half-way removes what was made."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator, Sequence

from pyroute2 import netns

from manager.lab.host_link import add_host_link, remove_host_link
from manager.lab.links import configure_fleet_links, configure_links, set_offloads, set_sysctls, wait_ready
from manager.lab.model import Lab, check_prefix, random_prefix, state_file
from manager.lab.netns import LabError
from manager.lab.reaper import kill_ns_processes
from manager.lab.routing import add_fleet_routes, isolate_relay
from manager.lab.state import save_state
from manager.protocol.api import one_line


def check_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, veth, sysctls): run as root")


def _check_environment() -> None:
    check_root()
    for tool in ("ip", "ethtool"):
        if shutil.which(tool) is None:
            raise LabError(f"{tool!r} not found: install iproute2 and ethtool (make setup)")


def lab_namespaces(prefix: str) -> list[str]:
    """Existing namespaces that belong to `prefix` (exact role names only, so
    prefix "sr" never matches another lab "sr-a")."""
    pat = re.compile(rf"^{re.escape(prefix)}-(client|relay|relay[0-9]+|edge|tx[0-9]+)$")
    return sorted(n for n in netns.listnetns() if pat.match(n))


def lab_up(prefix: str | None = None, transceivers: int = 2, relays: int = 1, *, host_link: bool = False) -> Lab:
    """Create the lab's namespaces and links, record it in STATE_DIR, return it.
    `host_link`: also connect this machine to the relay's public side (add_host_link).

    On any failure, whatever was created is removed and LabError is raised.
    """
    _check_environment()
    prefix = random_prefix() if prefix is None else check_prefix(prefix)
    lab = Lab.plan(prefix, transceivers, relays)
    lab.host_link = host_link
    taken = lab_namespaces(prefix)
    if taken or lab.state_file.exists():
        raise LabError(f"lab prefix {prefix!r} is already in use "
                       f"({', '.join(taken) or lab.state_file}); run `relayctl lab down {prefix}` first")
    created: list[str] = []
    step = "creating namespaces"
    try:
        for ns in lab.namespaces:
            netns.create(ns)
            created.append(ns)
        step = "setting sysctls"
        set_sysctls(lab)
        step = "creating links"
        configure_links(lab)
        if lab.relays > 1:
            configure_fleet_links(lab)
            add_fleet_routes(lab)
        if host_link:
            step = "connecting this machine to the relay"
            add_host_link(lab)
        step = "adding policy rules"
        isolate_relay(lab)
        step = "setting offloads"
        set_offloads(lab)
        step = "waiting for links and addresses"
        wait_ready(lab)
        step = "saving state"
        save_state(lab)
    except BaseException as e:  # KeyboardInterrupt too: never leave half a lab
        remove_namespaces(created)
        with contextlib.suppress(OSError):
            lab.state_file.unlink()
        if isinstance(e, Exception):
            raise LabError(f"lab {prefix}: {step} failed: {one_line(e) or type(e).__name__}") from e
        raise
    return lab


def remove_namespaces(names: Sequence[str]) -> list[str]:
    removed = []
    for ns in names:
        try:
            netns.remove(ns)
            removed.append(ns)
        except FileNotFoundError:
            pass  # already gone
    return removed


def lab_down(lab_or_prefix: Lab | str, kill: bool = True) -> list[str]:
    """Remove a lab's namespaces (and processes in them if `kill`) and its state
    file. Tolerates missing pieces; touches only that prefix's namespaces.
    Returns the namespaces removed (empty if nothing was left)."""
    check_root()
    if isinstance(lab_or_prefix, Lab):
        prefix, known = lab_or_prefix.prefix, lab_or_prefix.namespaces
    else:
        prefix, known = check_prefix(lab_or_prefix), []
    present = set(netns.listnetns())
    names = sorted({*(n for n in known if n in present), *lab_namespaces(prefix)})
    if kill and names:
        kill_ns_processes(names)
    remove_host_link(prefix)
    removed = remove_namespaces(names)
    with contextlib.suppress(FileNotFoundError):
        state_file(prefix).unlink()
    return removed


@contextlib.contextmanager
def lab(prefix: str | None = None, transceivers: int = 2, relays: int = 1) -> Iterator[Lab]:
    """`with lab() as l:` a lab that is removed on exit, whatever happens."""
    lb = lab_up(prefix, transceivers, relays)
    try:
        yield lb
    finally:
        lab_down(lb)


