"""NAT rebinding: media of an installed leg from a new client tuple.

The owner's media check is what proves a move, and it costs the owner (a
mutual-TLS request, an SRTP unprotect) and the relay. Anyone can spoof RTP
with a live SSRC from random sources, so a check is asked only:

* at a tuple's second packet (SeenOnce): a spoofer that changes source every
  packet never reaches the owner, while a client that moved keeps sending
  from its new tuple (50 packets/s of audio);
* within the call's own bucket (slowpath.rebind_call_rate/_burst) and with at
  most MAX_REBIND_CHECKS under way per leg.

Refused checks are counted (rebind_refused); their log lines are rate-limited.
"""

from __future__ import annotations

import logging
import random
import time

from manager.protocol.log_budget import LogBudget
from manager.relay.kernel.datapath import DatapathError
from manager.relay.slowpath.legs import MAX_REBIND_CHECKS, Leg

log = logging.getLogger(__name__)
_log_budget = LogBudget(log)

SEEN_CAPACITY = 1 << 16


class SeenOnce:
    """The media tuples seen once lately, at most `capacity`. When full, a
    random one makes room: a flood of one-off tuples cannot flush a real
    client's tuple out within its next packet (at 14,000 one-offs/s and a
    client's 50 packets/s, it survives 280 insertions with p = 0.996), as it
    would flush the oldest."""

    def __init__(self, capacity: int = SEEN_CAPACITY) -> None:
        self.capacity = capacity
        self._slot: dict[tuple, int] = {}
        self._keys: list[tuple] = []

    def second_time(self, key: tuple) -> bool:
        """True if `key` was seen before (and it is forgotten); else it is remembered."""
        i = self._slot.pop(key, None)
        if i is not None:
            last = self._keys.pop()
            if i < len(self._keys):
                self._keys[i] = last
                self._slot[last] = i
            return True
        if len(self._keys) >= self.capacity:
            i = random.randrange(len(self._keys))
            del self._slot[self._keys[i]]
            self._keys[i] = key
        else:
            i = len(self._keys)
            self._keys.append(key)
        self._slot[key] = i
        return False

    def __len__(self) -> int:
        return len(self._keys)


class Rebinding:
    def _maybe_rebinding(self, vip: tuple[str, int], data: bytes, client: tuple[str, int]) -> bool:
        """Media from an unknown tuple with the SSRC of an installed leg (XDP
        passed it as pass_rebind): the client may have moved behind its NAT.
        The packet goes to the owner to authenticate; only then does the leg
        move. False if it is nothing of the kind."""
        if self.datapath is None or not 128 <= (data[0] if data else 0) <= 191 or len(data) < 12:
            return False
        if not self._rebind_seen.second_time((client, vip, data[8:12])):
            self.stats["rebind_first_packet"] += 1  # asked at the tuple's next packet
            return True
        found = self.datapath.ssrc_flow(data)
        leg = self.legs.get(found) if found is not None and found[1] == vip else None
        if leg is None and found is not None and found[1] == vip and self._maybe_failover(found, client, vip, data):
            return True
        if leg is None or leg.installed_at is None:
            self.stats["drop_rebind_no_leg"] += 1
            return True
        if self.check_media is None:
            self.stats["drop_rebind_unchecked"] += 1
            return True
        if leg.rebind_checks >= MAX_REBIND_CHECKS:
            self.stats["drop_rebind_busy"] += 1
            return True
        if not self._rebind_buckets.take(leg.conn_id, time.monotonic()):
            self.stats["drop_rebind_call_budget"] += 1
            return True
        leg.rebind_checks += 1
        self.stats["rebind_checks"] += 1
        self._spawn(self._check_rebinding(leg, client, data, time.monotonic()))
        return True

    async def _check_rebinding(self, leg: Leg, client: tuple[str, int], data: bytes, t0: float) -> None:
        try:
            authentic = await self.check_media(leg.conn_id, data)
        except Exception as exc:  # the owner unreachable: the client's next packet asks again
            self.stats["rebind_check_failed"] += 1
            _log_budget.log(logging.WARNING, "check_failed", "media check for call %s from %s failed: %s",
                            leg.conn_id, client, exc)
            return
        finally:
            leg.rebind_checks -= 1
        if not authentic:
            self.stats["rebind_refused"] += 1
            _log_budget.log(logging.INFO, "refused", "call %s: the owner refused media from %s as the call's",
                            leg.conn_id, client)
            return
        self.stats["forward_in"] += 1  # the owner took the packet as media
        self.bytes["forward_in"] += len(data)
        self._rebind(leg, client, t0)

    def _rebind(self, leg: Leg, client: tuple[str, int], t0: float) -> None:
        old = (leg.client, leg.vip)
        if self.legs.get(old) is not leg or (client, leg.vip) in self.legs:
            return  # the leg ended, or another check moved it already
        if self.datapath is not None:
            try:
                if not self.datapath.rebind_flow(leg.client, client, leg.vip):
                    self.stats["rebind_lost_flow"] += 1
                    return
            except (DatapathError, OSError) as exc:
                self.stats["install_failed"] += 1
                log.error("cannot move flow %s to %s: %s", leg.client, client, exc)
                return
        del self.legs[old]
        log.info("call %s: client moved %s -> %s (authenticated by its owner in %.1f ms)", leg.conn_id, leg.client,
                 client, (time.monotonic() - t0) * 1000)
        if self.fleet is not None:
            self.fleet.withdraw_leg(leg.conn_id, leg.client, leg.vip)
        leg.client = client
        leg.missing_since = None
        leg.reinstalled_at = time.monotonic()
        self.legs[(client, leg.vip)] = leg
        self._publish(leg)
        self.stats["legs_rebound"] += 1
        if self.on_rebound:
            self.on_rebound(time.monotonic() - t0)
