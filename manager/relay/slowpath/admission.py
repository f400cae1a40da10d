"""A new client tuple's first packet: admitted or refused (counted)."""

from __future__ import annotations

import logging
import time

from aioice import stun

from manager.protocol.addresses import family_of
from manager.protocol.stun_header import CLASS_REQUEST, METHOD_BINDING, parse_header
from manager.protocol.ufrag import UfragError, decode_ufrag, parse_stun_username
from manager.relay.registry import Call
from manager.relay.slowpath.legs import MAX_PENDING_TXIDS, Addr, Leg

log = logging.getLogger(__name__)


class Admission:
    def _admit(self, data: bytes, client: Addr) -> tuple[Call, stun.Message] | None:
        """A new client tuple's first packet: a Binding request whose USERNAME
        carries a valid routing hint, for a live call with an owner in the
        client's family, within the per-call and per-source bounds; None
        (counted) otherwise."""
        try:
            msg = stun.parse_message(data)
        except ValueError:
            self.stats["drop_malformed_stun"] += 1
            return None
        if msg.message_method != stun.Method.BINDING or msg.message_class != stun.Class.REQUEST:
            self.stats["drop_not_binding_request"] += 1
            return None
        username = msg.attributes.get("USERNAME")
        if not username:
            self.stats["drop_no_username"] += 1
            return None
        try:
            server_ufrag, _ = parse_stun_username(username)
            hint = decode_ufrag(self.hint_key, server_ufrag)
        except UfragError:
            self.stats["drop_forged_hint"] += 1
            return None
        call = self.registry.get_call(hint.conn_id)
        if call is None or call.state != "active":
            self.stats["drop_unknown_call"] += 1
            return None
        if call.server_ufrag != server_ufrag:
            # A valid MAC for a connection id that now belongs to another call.
            self.stats["drop_stale_hint"] += 1
            return None
        owner = call.owner.for_family(family_of(client[0])) if call.owner else None
        if owner is None or self.sources.get(family_of(client[0])) is None:
            self.stats["drop_no_owner_in_family"] += 1
            return None
        if self._legs_per_call[call.conn_id] >= self.max_legs_per_call:
            self.stats["drop_leg_cap"] += 1
            return None
        if self._pending_per_source[self.source_key(client[0])] >= self.max_pending_per_source:
            self.stats["drop_source_pending_cap"] += 1
            return None
        return call, msg

    def _take_source(self, client: Addr) -> tuple[int, int] | None:
        try:
            return self.sources[family_of(client[0])].take()
        except OSError as exc:
            self.stats["drop_no_flow_port"] += 1
            log.warning("no flow source for %s: %s", client, exc)
            return None


    def _note_txid(self, leg: Leg, data: bytes, msg: stun.Message | None = None) -> None:
        if leg.installed_at is not None or not data or data[0] > 1:
            return
        if msg is not None:
            request = msg.message_method == stun.Method.BINDING and msg.message_class == stun.Class.REQUEST
            txid = msg.transaction_id
        else:
            try:  # the header says all we keep: no need to decode the attributes
                h = parse_header(data)
            except ValueError:
                return
            request, txid = h.method == METHOD_BINDING and h.message_class == CLASS_REQUEST, h.transaction_id
        if request:
            leg.txids[txid] = time.monotonic()  # sent to the owner: its answer times the hop
            while len(leg.txids) > MAX_PENDING_TXIDS:
                leg.txids.popitem(last=False)

