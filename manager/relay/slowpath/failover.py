"""The fleet: publishing this relay's legs, taking over another relay's, and
applying its ownership moves."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from manager.observability import tracing
from manager.protocol.addresses import family_of
from manager.relay.kernel.datapath import DatapathError
from manager.relay.registry import Call
from manager.relay.slowpath.legs import Addr, Leg

log = logging.getLogger(__name__)


class Failover:
    # (conn_id, relay taken over from, seconds from its media here to the flow installed): call records.
    on_failover: Callable[[int, str, float], None] | None = None

    def _source_addr(self, leg: Leg) -> Addr:
        return (self.flow_sockets.address(leg.family, leg.flow_addr), leg.flow_port)

    def _publish(self, leg: Leg) -> None:
        if self.fleet is not None:
            self.fleet.publish_leg(leg.conn_id, leg.client, leg.vip, self._source_addr(leg), leg.ssrc)


    async def _repoint(self, leg: Leg, old: Addr | None) -> None:
        if self.repoint is None:
            return
        # A take-over by the client's checks (the media one is _take_over's).
        trace = tracing.begin("call.failover", conn_id=leg.conn_id, via="stun")
        try:
            with trace.phase("repoint"):  # the owner sends the call's replies to this relay's flow source
                ok = await self.repoint(leg.conn_id, old, self._source_addr(leg))
        except Exception as exc:  # the owner's next consent check from here retries
            self.stats["repoint_failed"] += 1
            log.warning("re-pointing call %s to %s failed: %s", leg.conn_id, self._source_addr(leg), exc)
            trace.end(f"re-pointing failed: {exc}")
            return
        self.stats["repointed" if ok else "repoint_refused"] += 1
        trace.end(None if ok else "the owner refused")

    def publish_ssrcs(self) -> None:
        """Tell the fleet each installed leg's SSRC once XDP has seen one, so
        that another relay can recognise the call's media (failover)."""
        if self.fleet is None or self.datapath is None:
            return
        for leg in list(self.legs.values()):
            if leg.installed_at is None or leg.ssrc:
                continue
            try:
                ssrc = self.datapath.flow_ssrc(leg.client, leg.vip)
            except (DatapathError, OSError):
                continue
            if ssrc:
                leg.ssrc = ssrc
                self._publish(leg)

    def remote_leg_known(self, remote) -> None:
        """Another relay serves this tuple: index its SSRC here, so the
        client's media reaches this slow path if its packets ever come here."""
        if self.datapath is None or not remote.ssrc or (remote.client, remote.vip) in self.legs:
            return
        try:
            self.datapath.index_ssrc(remote.ssrc, remote.client, remote.vip)
        except (DatapathError, OSError, ValueError) as exc:
            log.warning("cannot index SSRC of call %s: %s", remote.conn_id, exc)

    def owner_moved(self, call: Call, previous) -> None:
        """Another relay moved a call (migration): this relay's legs of it now
        return from the new owner. Same order as the migrator's flip: return
        entries for the new owner, the owner entry, then the old entries go."""
        if self.datapath is None or call.owner is None:
            return
        legs = [leg for leg in self.legs_of(call.conn_id) if leg.installed_at is not None]
        try:
            staged = []
            for leg in legs:
                ep = call.owner.for_family(leg.family)
                if ep is not None:
                    self.datapath.add_reverse(ep, leg.flow_port, leg.client, leg.vip, call.conn_id, leg.flow_addr)
                    staged.append((ep, leg.source))
            cur = self.datapath.get_owner(call.conn_id)
            if (legs or cur is not None) and (cur is None or cur[0] != call.owner):
                self.datapath.set_owner(call.conn_id, call.owner)
            for leg in legs:
                ep = previous.for_family(leg.family) if previous else None
                if ep is not None and (ep, leg.source) not in staged:
                    self.datapath.remove_reverse(ep, *leg.source)
        except (DatapathError, OSError) as exc:
            log.error("cannot apply the move of call %s: %s", call.conn_id, exc)
            return
        self.stats["owner_moves_applied"] += 1

    def _maybe_failover(self, found: tuple[Addr, Addr], client: Addr, vip: Addr, data: bytes) -> bool:
        """Media of a call another relay served (its SSRC was indexed from the
        fleet): that relay is gone or the route moved. The owner authenticates
        the packet and re-points its replies; then the flow is installed here."""
        remote = self.fleet.remote_leg(*found) if self.fleet is not None else None
        if remote is None:
            return False
        key = (client, vip)
        if key in self._taking_over or key in self.legs:
            self.stats["drop_failover_busy"] += 1
            return True
        call = self.registry.get_call(remote.conn_id)
        if (call is None or call.state != "active" or self.sources.get(family_of(client[0])) is None
                or self.check_media is None):
            self.stats["drop_failover_unknown_call"] += 1
            return True
        source = self._take_source(client)
        if source is None:
            return True
        leg = Leg(client=client, vip=vip, conn_id=call.conn_id, flow_port=source[0], flow_addr=source[1])
        self._add_leg(leg)
        self._taking_over.add(key)
        self.stats["failover_checks"] += 1
        self._spawn(self._take_over(leg, remote, data, time.monotonic()))
        return True

    async def _take_over(self, leg: Leg, remote, data: bytes, t0: float) -> None:
        key = (leg.client, leg.vip)
        trace = tracing.begin("call.failover", conn_id=leg.conn_id, via="media", from_relay=remote.relay)
        try:
            with trace.phase("check"):  # the owner authenticates the packet and re-points its replies
                authentic = await self.check_media(leg.conn_id, data, path=(remote.source, self._source_addr(leg)))
        except Exception as exc:
            authentic = False
            log.warning("failover check for call %s from %s failed: %s", leg.conn_id, leg.client, exc)
        finally:
            self._taking_over.discard(key)
        if not authentic:
            self.stats["failover_refused"] += 1
            self._close_leg(leg)
            trace.end("the owner did not authenticate the packet")
            return
        if self.legs.get(key) is not leg:
            trace.end("the leg was closed meanwhile")
            return
        trace.phase("install")
        self.stats["forward_in"] += 1  # the owner took the packet as media
        self.bytes["forward_in"] += len(data)
        leg.ssrc = remote.ssrc
        self.fleet.replaced(leg.client, leg.vip, remote.relay)
        self._install(leg)
        trace.end()
        self.stats["failovers"] += 1
        if self.on_failover is not None:
            self.on_failover(leg.conn_id, remote.relay, time.monotonic() - t0)
        log.info("call %s: took over %s from relay %s in %.1f ms", leg.conn_id, leg.client, remote.relay,
                 (time.monotonic() - t0) * 1000, extra={"conn_id": leg.conn_id})

