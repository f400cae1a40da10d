"""ICE-TCP connections (tcp_bridge.py) as stream legs of the slow path."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from manager.observability import tracing
from manager.protocol.rfc7983 import is_stun
from manager.relay.slowpath.legs import Addr, Leg
from manager.relay.slowpath.stream_media import StreamMedia

log = logging.getLogger(__name__)


class StreamLegs:
    def open_stream_leg(self, listener: Addr, data: bytes, client: Addr, *, send: Callable[[bytes], None],
                        close: Callable[[str], None]) -> Leg | None:
        """The first frame of an ICE-TCP connection: admitted as a new UDP
        tuple's first packet is, then sent to the owner from a flow source of
        its own. None (counted) if refused: the bridge closes the connection."""
        if not is_stun(data):
            self.stats["tcp_drop_not_stun"] += 1
            return None
        admitted = self._admit(data, client)
        if admitted is None:
            return None
        call, msg = admitted
        source = self._take_source(client)
        if source is None:
            return None
        leg = Leg(client=client, vip=listener, conn_id=call.conn_id, flow_port=source[0], flow_addr=source[1],
                  stream=send, close_stream=close, media=StreamMedia())
        self.stream_legs[(client, listener)] = leg
        self._by_source[(leg.family, *leg.source)] = leg
        self._legs_per_call.add(leg.conn_id)
        self._pending_per_source.add(self.source_key(client[0]))
        self._pending[id(leg)] = leg
        self.stats["tcp_legs_opened"] += 1
        tracing.advance("setup", call.conn_id, "install")  # the call's first STUN check (over TCP)
        self._note_txid(leg, data, msg)
        self._to_owner(leg, data)
        return leg

    def stream_packet(self, leg: Leg, data: bytes) -> None:
        """A later frame of a stream leg: to the call's current owner. Until the
        owner's success only Binding requests pass (on UDP, XDP drops the rest)."""
        leg.last_seen = now = time.monotonic()
        if leg.installed_at is None:
            if not is_stun(data):
                self.stats["tcp_drop_before_success"] += 1
                return
            self._note_txid(leg, data)
        elif leg.media is not None:  # counted from the install on, as XDP counts a flow
            leg.media.up.count(data, now)
        self.stats["tcp_in"] += 1
        self._to_owner(leg, data)

    def close_stream_leg(self, leg: Leg, *, settle: bool = True) -> None:
        """The connection is gone: free the leg, and (`settle`) end the call if
        nothing else carries it. A relay stopping does not settle: its calls
        are not over (the registry may be shared, the client may reconnect)."""
        if self.stream_legs.get((leg.client, leg.vip)) is not leg:
            return
        self._close_leg(leg)
        self.stats["tcp_legs_closed"] += 1
        if settle and leg.installed_at is not None:
            self._settle({leg.conn_id})

    def stream_legs_of(self, conn_id: int) -> list[Leg]:
        return [leg for leg in self.stream_legs.values() if leg.conn_id == conn_id]

