"""Keep the neighbour entries XDP forwards through resolved.

bpf_fib_lookup() finds a route but no usable neighbour entry for a next hop
the kernel stack has not talked to lately (or whose entry was collected):
the packet is passed to the stack (`pass_no_neigh`), where it is addressed
to the VIP and lands on relayd's public socket. While relayd restarts or is
upgraded nobody is there, and the packet is lost; XDP's own forwarding never
refreshes an entry, since it bypasses the neighbour code.

So every next hop a flow forwards through (a client's gateway or the client
itself when on-link, an owner's address) gets a *managed* neighbour entry
(NTF_EXT_MANAGED, Linux 5.16): the kernel resolves it at once and keeps it
resolved without traffic, and it outlives relayd. Entries someone configured
(permanent, noarp) are left as they are.

The netlink work runs on one worker thread: the event loop only queues an
address (pyroute2's synchronous API refuses to run inside a running loop).
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from pyroute2 import IPRoute, NetlinkError, NetNS

log = logging.getLogger(__name__)

# ndmsg states and flags (linux/neighbour.h).
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NUD_NONE = 0x00
NTF_EXT_MANAGED = 0x01  # in NDA_FLAGS_EXT
RTN_UNICAST = 1

# Addresses already looked at (a flood of new client addresses must not grow it without end).
MAX_SEEN = 65536
# Managed entries this relay creates at most: next hops are gateways and owners, a handful.
MAX_MANAGED = 4096

_STOP = object()


class NextHops:
    """Queue addresses with want(); a worker makes their next hops managed
    neighbours. `netns` names a network namespace to work in (tests); None
    is the relay's own."""

    def __init__(self, *, netns: str | None = None, max_managed: int = MAX_MANAGED,
                 on_managed: Callable[[str, int], None] | None = None):
        self.netns = netns
        self.max_managed = max_managed
        self.on_managed = on_managed
        self.stats = {"managed": 0, "kept": 0, "skipped": 0, "failed": 0, "over_cap": 0}
        self._seen: set[str] = set()
        self._hops: set[tuple[str, int]] = set()  # (next hop, ifindex) done, whatever the outcome
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending = 0  # queued and not yet handled (wait_idle)
        self._done = threading.Condition()

    # --- the loop's side ----------------------------------------------------------

    def want(self, addr: str) -> None:
        """Make sure `addr`'s next hop stays resolved (cheap: a set lookup and
        a queue put for an address not seen before)."""
        if addr in self._seen:
            return
        if len(self._seen) >= MAX_SEEN:
            self._seen.clear()  # looked at again: the work is idempotent
        self._seen.add(addr)
        with self._done:
            self._pending += 1
        self._queue.put(addr)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="next-hops", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the worker. The managed entries stay: they are what keeps a
        restarting relay's flows forwarding."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=5)
            self._thread = None

    def wait_idle(self, timeout: float) -> bool:
        """Whether everything queued so far has been handled (tests)."""
        with self._done:
            return self._done.wait_for(lambda: self._pending == 0, timeout)

    # --- the worker ---------------------------------------------------------------

    def _run(self) -> None:
        ipr = NetNS(self.netns) if self.netns else IPRoute()
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    return
                try:
                    self._handle(ipr, item)
                except Exception as exc:  # a netlink surprise must not stop the worker
                    self.stats["failed"] += 1
                    log.warning("cannot keep the next hop of %s resolved: %s", item, exc)
                with self._done:
                    self._pending -= 1
                    self._done.notify_all()
        finally:
            ipr.close()

    def _handle(self, ipr: Any, addr: str) -> None:
        ip = ipaddress.ip_address(addr)
        if ip.is_loopback or ip.is_multicast or ip.is_unspecified:
            self.stats["skipped"] += 1
            return
        try:
            route = ipr.route("get", dst=addr)[0]
        except NetlinkError:  # no route: fib lookups fail too, nothing to keep
            self.stats["skipped"] += 1
            return
        if route["type"] != RTN_UNICAST:  # local, blackhole, ...
            self.stats["skipped"] += 1
            return
        hop, oif = route.get_attr("RTA_GATEWAY") or addr, route.get_attr("RTA_OIF")
        if (hop, oif) in self._hops:
            return
        if len(self._hops) >= self.max_managed:
            self.stats["over_cap"] += 1
            return
        self._hops.add((hop, oif))
        for entry in ipr.get_neighbours(dst=hop, ifindex=oif):
            if entry["state"] & (NUD_PERMANENT | NUD_NOARP) or (entry.get_attr("NDA_FLAGS_EXT") or 0) & NTF_EXT_MANAGED:
                self.stats["kept"] += 1
                return
        try:
            ipr.neigh("replace", dst=hop, ifindex=oif, state=NUD_NONE, NDA_FLAGS_EXT=NTF_EXT_MANAGED)
        except NetlinkError as exc:  # e.g. a device without neighbours (tun), or a kernel before 5.16
            self.stats["failed"] += 1
            log.warning("cannot keep neighbour %s (ifindex %d) resolved for XDP: %s", hop, oif, exc)
            return
        self.stats["managed"] += 1
        log.info("keeping neighbour %s (ifindex %d) resolved for XDP (next hop of %s)", hop, oif, addr)
        if self.on_managed is not None:
            self.on_managed(hop, oif)
