"""Running code, processes and sockets inside a network namespace, and reading
its links: what the lab, the services and the tests share."""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import os
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute

T = TypeVar("T")

NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000


class LabError(Exception):
    """A lab operation failed; str() is one line meant for the user."""


def _ns_path(ns: str) -> str:
    return ns if "/" in ns else str(NETNS_DIR / ns)


_libc: ctypes.CDLL | None = None


def _enter_netns(ns: str) -> None:
    """Move the *calling thread* (only) into network namespace `ns`."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = os.open(_ns_path(ns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


class NetnsExecutor(concurrent.futures.Executor):
    """Runs callables on one dedicated thread that lives in network namespace `ns`.

    Only that thread switches namespace (setns is per thread), so the process
    and its other threads stay where they are. Sockets (and netlink or BPF
    calls that resolve ifindexes) made on it belong to `ns`; sockets stay
    there and may be used from any thread afterwards.

        with NetnsExecutor("sr1234-client") as ex:
            sock = ex.submit(socket.socket, socket.AF_INET, socket.SOCK_DGRAM).result()
    """

    def __init__(self, ns: str) -> None:
        self.ns = ns
        # One worker, never shared: every task runs on the thread that did setns.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"netns-{os.path.basename(ns)}")
        try:
            self._pool.submit(_enter_netns, ns).result()
        except OSError as e:
            self._pool.shutdown(wait=True)
            raise LabError(f"cannot enter network namespace {ns!r}: {e.strerror}") from None

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        return self._pool.submit(fn, *args, **kwargs)

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run `fn` in the namespace and return its result (or raise its exception)."""
        return self._pool.submit(fn, *args, **kwargs).result()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)


def in_netns(ns: str) -> NetnsExecutor:
    """`with in_netns(ns) as ex: ex.call(fn, ...)`: see NetnsExecutor."""
    return NetnsExecutor(ns)


def run_in_netns(ns: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """One-shot: run `fn(*args, **kwargs)` inside `ns` and return its result."""
    with NetnsExecutor(ns) as ex:
        return ex.call(fn, *args, **kwargs)


def ns_socket(ns: str, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM,
              proto: int = 0, bind: tuple[str, int] | None = None) -> socket.socket:
    """A socket living in `ns` (optionally bound there), usable from any thread."""
    def make() -> socket.socket:
        s = socket.socket(family, type, proto)
        try:
            if bind is not None:
                s.bind(bind)
        except OSError:
            s.close()
            raise
        return s
    return run_in_netns(ns, make)


def _nsenter(ns: str) -> list[str]:
    # Only the network namespace changes. `ip netns exec` would also give the
    # process a new mount namespace with a fresh /sys, hiding the host's bpffs:
    # relayd's pinned maps would then be invisible outside and lost on restart.
    return ["nsenter", f"--net={_ns_path(ns)}", "--"]


def ns_popen(ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
    """subprocess.Popen of `argv` inside network namespace `ns`."""
    return subprocess.Popen([*_nsenter(ns), *argv], **kw)


def ns_run(ns: str, argv: Sequence[str], *, check: bool = True, capture_output: bool = True,
           text: bool = True, timeout: float | None = 30.0, **kw: Any) -> subprocess.CompletedProcess:
    """subprocess.run of `argv` inside `ns`; checks and captures by default."""
    return subprocess.run([*_nsenter(ns), *argv], check=check,
                          capture_output=capture_output, text=text, timeout=timeout, **kw)


@contextlib.contextmanager
def _ipr(ns: str) -> Iterator[IPRoute]:
    # flags=0: never create a namespace as a side effect of a lookup.
    if not (NETNS_DIR / ns).exists():
        raise LabError(f"network namespace {ns!r} does not exist")
    with IPRoute(netns=ns, flags=0) as ipr:
        yield ipr


def _link(ipr: IPRoute, ns: str, ifname: str) -> Any:
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise LabError(f"no interface {ifname!r} in namespace {ns!r}")
    return ipr.link("get", index=idx[0])[0]


def ifindex(ns: str, ifname: str) -> int:
    """ifindex of `ifname` inside namespace `ns`."""
    with _ipr(ns) as ipr:
        return int(_link(ipr, ns, ifname)["index"])


def mac(ns: str, ifname: str) -> str:
    """MAC address (aa:bb:..) of `ifname` inside namespace `ns`."""
    with _ipr(ns) as ipr:
        return str(_link(ipr, ns, ifname).get("IFLA_ADDRESS"))
