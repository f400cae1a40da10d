"""Ends and expiry: pending legs, idle kernel flows, evicted legs, calls left
without any."""

from __future__ import annotations

import asyncio
import logging
import os
import time

from manager.relay.kernel.datapath import DatapathError

log = logging.getLogger(__name__)


class Expiry:
    def expire(self, now: float | None = None) -> None:
        """Drop legs that never got a success response, flows idle either way
        for idle_timeout, and calls left with no flow (all on the caller's
        thread; the housekeeper walks the kernel map off the event loop)."""
        self.expire_pending(time.monotonic() if now is None else now)
        if self.datapath is not None:
            self.after_kernel_expiry(self.datapath.expire_idle(self.idle_timeout))

    def expire_pending(self, now: float) -> None:
        for leg in list(self._pending.values()):  # only the legs still waiting: not every leg
            if leg.installed_at is not None:
                self._pending.pop(id(leg), None)
            elif now - leg.first_seen > self.pending_timeout:
                self._close_leg(leg, reason="the owner never answered a check")
                self._pending.pop(id(leg), None)
                self.stats["legs_expired_pending"] += 1

    async def expire_kernel(self, idle_s: float | None = None) -> tuple[list, set]:
        """One walk of the kernel's flows: those idle for `idle_s` (default
        idle_timeout) go, with their legs. The walk runs in a thread, the
        decisions about legs and calls here on the loop, and one walk at a
        time (the housekeeper's and the control API's /expire share the
        lock). Returns (the flows removed, the flows-map keys left in place)."""
        idle = self.idle_timeout if idle_s is None else idle_s
        async with self._expiry_lock:
            started = time.monotonic()
            kept: set = set()
            expired = await asyncio.to_thread(self.datapath.expire_idle, idle, kept=kept)
            return self.after_kernel_expiry(expired, walk_started=started), kept

    def after_kernel_expiry(self, expired: list, *, walk_started: float | None = None) -> list:
        """Close the legs of flows the kernel walk removed; end calls left
        without any. Returns the flows that stay removed.

        The walk judged each entry as it read it. If the loop put the tuple
        back into the kernel since the walk began (an evicted flow's client
        came back, a rebinding), the walk removed, or judged, a live flow:
        it is installed again and its leg kept."""
        touched = set()
        removed = []
        for flow in expired:
            leg = self.legs.get((flow.client, flow.vip))
            if leg is not None and walk_started is not None and (
                    leg.reinstalled_at >= walk_started or (leg.installed_at or 0.0) >= walk_started):
                self.stats["expiry_raced_live_flow"] += 1
                if self.datapath is not None and not self.datapath.has_flow(flow.client, flow.vip):
                    self._install(leg, again=True)
                continue
            touched.add(flow.conn_id)
            if leg is not None:
                self._close_leg(leg, remove_kernel=False)
            self.stats["flows_expired_idle"] += 1
            removed.append(flow)
        self._settle(touched)
        return removed

    def evicted(self, kept: set) -> set:
        """Installed tuples whose flows-map key is not among `kept` (what an
        expiry walk found in the kernel)."""
        return {k for k, leg in self.legs.items() if leg.installed_at is not None and leg.kernel_key not in kept}

    def sweep_evicted(self, missing: set, now: float) -> None:
        """Installed legs the kernel lost (LRU eviction) and that no STUN has
        brought back within idle_timeout: their client is gone. Close them
        and end calls left without a leg."""
        touched = set()
        for key, leg in list(self.legs.items()):
            if leg.installed_at is None:
                continue
            if key not in missing:
                leg.missing_since = None
            elif leg.missing_since is None:
                leg.missing_since = now
            elif now - leg.missing_since > self.idle_timeout:
                self._close_leg(leg, remove_kernel=False)
                touched.add(leg.conn_id)
                self.stats["legs_expired_evicted"] += 1
        self._settle(touched)

    def _settle(self, touched: set[int]) -> None:
        for conn_id in touched:
            if self.legs_of(conn_id) or self.stream_legs_of(conn_id):
                continue
            if self.fleet is not None and self.fleet.others_serve(conn_id):
                self.stats["idle_served_elsewhere"] += 1  # the client's packets go to another relay now
                continue
            if self.registry.get_call(conn_id) is not None:
                self.registry.end_call(conn_id, "idle-timeout")  # its end removes the owner entry
            else:
                # A call the registry does not know (adopted after a restart
                # and never reported again): its owner entry goes with its
                # last flow, or the owners map (a plain hash) fills up.
                try:
                    if self.datapath.remove_owner(conn_id):
                        self.stats["owners_removed_unknown"] += 1
                except (DatapathError, OSError) as exc:
                    log.warning("cannot remove owner of unknown call %s: %s", conn_id, exc)

    async def _housekeeping(self) -> None:
        period = max(0.5, min(self.idle_timeout, self.pending_timeout) / 4)
        # The kernel walk costs in proportion to the flows held (batched reads,
        # but Python work per entry), and idle flows need not go to the
        # second: a quarter of the idle timeout apart, not every round.
        walk_every = max(period, self.idle_timeout / 4)
        walked = time.monotonic()
        while True:
            await asyncio.sleep(period)
            try:
                self.expire_pending(time.monotonic())
                if self.datapath is not None:
                    if time.monotonic() - walked >= walk_every:
                        walked = time.monotonic()
                        # A thread walks the map; the loop keeps serving packets and APIs.
                        _, kept = await self.expire_kernel()
                        self.sweep_evicted(self.evicted(kept), time.monotonic())
                    self.publish_ssrcs()
                fds = [s.fileno() for s in self.public.values()]
                self.queue_bytes = await asyncio.to_thread(public_queue_bytes, fds)
            except Exception:  # keep the slow path alive; the next round retries
                log.exception("slow-path housekeeping failed")



def public_queue_bytes(fds: list[int]) -> int:
    """Bytes queued on these UDP sockets (rx_queue of /proc/net/udp{,6})."""
    inodes = {str(os.fstat(fd).st_ino) for fd in fds}
    total = 0
    for path in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if len(cols) > 9 and cols[9] in inodes:
                        total += int(cols[4].split(":")[1], 16)
        except OSError:
            continue
    return total


