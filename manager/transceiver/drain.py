"""A transceiver leaving without dropping its calls (SIGTERM).

1. It takes no new call: placements and imports are refused (draining).
2. It asks a relay to drain it (manager.relay.drain, over the internal
   listener with its own certificate): relayd places nothing more here and
   moves each call to another healthy transceiver by live migration.
3. It returns when it holds no call, or at the deadline plus GRACE (the
   relay ends what could not move at the deadline itself and tells us);
   whatever it still holds then ends here with reason `drain-deadline`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Sequence

from .call_migration import RELEASED
from .errors import UnknownCall
from .registrar import Registrar
from .transceiver import Transceiver

logger = logging.getLogger(__name__)

DEADLINE_REASON = "drain-deadline"
GRACE = 2.0  # after the deadline: the relay's own ending of the calls that could not move reaches us
RETRY = 1.0  # no relay took the request (one restarting?): ask again after this


async def drain(tx: Transceiver, registrars: Sequence[Registrar], deadline_s: float, grace: float = GRACE) -> int:
    """Drain `tx` through the first relay that takes the request; returns
    how many calls ended at the deadline."""
    t0 = time.monotonic()
    tx.draining = True
    if not tx.calls() or not registrars:
        return 0
    logger.info("transceiver %d draining: asking the relay to move its %d calls within %g s", tx.id,
                len(tx.calls()), deadline_s)
    changed = asyncio.Event()
    reasons: Counter[str] = Counter()
    # A call leaves the table before its close is done and reported: the
    # drain waits for the reports (of the calls it started with; no new one comes).
    unreported = set(tx.calls())

    def ended(conn_id: int, reason: str) -> None:
        reasons[reason] += 1
        unreported.discard(conn_id)
        changed.set()

    tx.on_call_ended.append(ended)
    try:
        taken = await _ask(tx, registrars, t0 + deadline_s, deadline_s)
        end = t0 + deadline_s + (grace if taken else 0.0)
        while (unreported or tx.calls()) and (left := end - time.monotonic()) > 0:
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left)
    finally:
        tx.on_call_ended.remove(ended)
    remaining = tx.calls()
    if not remaining:
        # "ended": hung up meanwhile, or ended by the relay at its deadline.
        logger.info("transceiver %d drained in %.1f s: %d calls moved, %d ended", tx.id, time.monotonic() - t0,
                    reasons[RELEASED], sum(reasons.values()) - reasons[RELEASED])
        return 0
    logger.warning("transceiver %d: drain deadline (%g s) reached with %d calls that could not move: ending them "
                   "(reason %s)", tx.id, deadline_s, len(remaining), DEADLINE_REASON)
    for conn_id in remaining:
        with contextlib.suppress(UnknownCall):  # ended meanwhile
            await tx.close_call(conn_id, DEADLINE_REASON)
    return len(remaining)


async def _ask(tx: Transceiver, registrars: Sequence[Registrar], end: float, deadline_s: float) -> bool:
    """Ask the relays in turn (one moves the calls: a fleet shares the
    registry) until one takes the request, no call is left, or `end`."""
    told = False
    while tx.calls():
        for registrar in registrars:
            problem = await registrar.request_drain(max(0.001, end - time.monotonic()))
            if problem is None:
                return True
            if not told:
                logger.warning("relay %s did not take the drain request: %s", registrar.relay_url, problem)
        if not told:
            logger.warning("transceiver %d: no relay took the drain request; asking again until the deadline "
                           "(%g s), when its calls end", tx.id, deadline_s)
            told = True
        left = end - time.monotonic()
        if left <= 0:
            break
        await asyncio.sleep(min(RETRY, left))  # pacing: a relay restarting comes back within seconds
    return False
