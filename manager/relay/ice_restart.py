"""ICE restart by PATCH on a WHIP session (RFC 9725 section 4.3.2).

A client that changed networks (a browser's restartIce()) PATCHes its new ICE
credentials with `If-Match: "*"`. The relay

1. bounds it: at most `limits.max_ice_restarts_per_minute` restarts per call
   in any 60 s (a storm is 429, code restart-storm), one at a time per call.
   In a fleet the count is the fleet's (RedisFleet.take_restart), so a client
   cannot spread a storm over relays; while Redis is away, each relay's own;
2. mints a new server ufrag: the same routing hint (first owner, connection
   id) with a new nonce and MAC, so the client's first check from its new
   address routes like the call's first check did;
3. asks the call's owner for the restart (`POST /calls/{conn_id}/ice-restart`
   on its control API): it routes checks for the new ufrag to the call, with a
   new password, beside the old credentials until the first new check;
4. records the new ufrags (the registry, and through it the fleet's store and
   XDP's admitted ufrags; the old server ufrag routes nothing any more);
5. answers 200 with an `application/trickle-ice-sdpfrag` body: the new
   a=ice-ufrag and a=ice-pwd and the relay's candidates, and the new ETag.

The media, DTLS and SRTP sessions and the agent are untouched: no renegotiation.
A call kept on aiortc (a transceiver run with --no-media-engine) cannot restart:
422 code ice-restart-unsupported, naming why. Every refusal is counted by reason
(SignalingCounters) and leaves the call as it was.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from manager.protocol.sdp import relay_candidates
from manager.protocol.sdpfrag import Fragment
from manager.protocol.ufrag import HintKeys, UfragError, decode_ufrag, encode_ufrag, is_ice_ufrag
from manager.relay.call_desk import CallDesk
from manager.relay.problems import problem
from manager.relay.registry import Call, StoreUnavailable, UnknownCallError
from manager.relay.transceiver_client import TransceiverError, TransceiverRefused
from manager.relay.whip import TRICKLE, etag

log = logging.getLogger(__name__)

WINDOW = 60.0  # seconds: the storm limit counts restarts per minute
PWD_MIN, PWD_MAX = 22, 256  # RFC 8445 section 5.3: ice-pwd = 22*256ice-char

# The fleet's count of a call's restarts: (call_id, limit, window) -> None if
# within the limit (counted), else the seconds to wait; StoreUnavailable when
# the shared store is away.
SharedCount = Callable[[str, int, float], Awaitable[float | None]]


class RestartWindow:
    """Each call's restarts in the last WINDOW seconds (a sliding window)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._times: dict[int, collections.deque[float]] = {}

    def take(self, conn_id: int, limit: int) -> float | None:
        """Count a restart of `conn_id`; None if within `limit`, else the
        seconds until one falls out of the window (nothing counted)."""
        now = self._clock()
        times = self._times.setdefault(conn_id, collections.deque())
        while times and now - times[0] >= WINDOW:
            times.popleft()
        if len(times) >= limit:
            return WINDOW - (now - times[0])
        times.append(now)
        return None

    def forget(self, conn_id: int) -> None:
        self._times.pop(conn_id, None)


def answer_fragment(ufrag: str, pwd: str, candidates: Sequence[str]) -> str:
    """The restart's answer (RFC 8840 fragment, CRLF lines as SDP has them)."""
    return "".join(f"{line}\r\n" for line in (f"a=ice-ufrag:{ufrag}", f"a=ice-pwd:{pwd}", *candidates))


class IceRestarts:
    """The restart half of PATCH (manager.relay.whip hands it a parsed fragment)."""

    def __init__(self, desk: CallDesk, hint_key: HintKeys, public_addrs: Sequence[tuple[str, int]],
                 tcp_addrs: Sequence[tuple[str, int]] = (), clock: Callable[[], float] = time.monotonic,
                 shared: SharedCount | None = None) -> None:
        self.desk = desk
        self.shared = shared
        self.hint_key = hint_key
        self.candidates = relay_candidates(public_addrs, tcp_addrs)
        self.window = RestartWindow(clock)
        self._busy: set[int] = set()
        desk.registry.on_call_ended(lambda call, reason: self.window.forget(call.conn_id))

    def _refuse(self, reason: str, status: int, detail: str, headers: dict[str, str] | None = None,
                kind: str | None = None) -> web.Response:
        self.desk.counters.refused(reason)
        return problem(status, detail, headers, kind=kind)

    async def restart(self, call: Call, frag: Fragment) -> web.Response:
        assert frag.ufrag is not None
        if frag.pwd is None:
            return self._refuse("no-pwd", 400, "bad fragment: an ICE restart needs the new a=ice-pwd with its "
                                "a=ice-ufrag")
        if not is_ice_ufrag(frag.ufrag):
            return self._refuse("bad-fragment", 400, "bad fragment: a=ice-ufrag must be 4 to 256 ICE characters")
        if not (PWD_MIN <= len(frag.pwd) <= PWD_MAX and is_ice_ufrag(frag.pwd)):
            return self._refuse("bad-fragment", 400, f"bad fragment: a=ice-pwd must be {PWD_MIN} to {PWD_MAX} "
                                "ICE characters")
        if call.conn_id in self._busy:
            return self._refuse("restart-busy", 409, "an ICE restart of this call is under way; retry after it",
                                {"Retry-After": "1"})
        self._busy.add(call.conn_id)  # before the (shared) count is awaited: one at a time
        try:
            limit = self.desk.limits.max_ice_restarts_per_minute
            wait = await self._take(call, limit)
            if wait is not None:
                return self._refuse("restart-storm", 429, f"too many ICE restarts: at most {limit} a minute per "
                                    "call", {"Retry-After": str(max(1, round(wait)))}, kind="restart-storm")
            return await self._restart(call, frag.ufrag, frag.pwd)
        finally:
            self._busy.discard(call.conn_id)

    async def _take(self, call: Call, limit: int) -> float | None:
        if self.shared is not None:
            try:
                return await self.shared(call.call_id, limit, WINDOW)
            except StoreUnavailable as exc:  # a restart keeps a call alive: bound it here meanwhile
                log.warning("ICE restart of conn_id %d counted on this relay only: %s", call.conn_id, exc)
        return self.window.take(call.conn_id, limit)

    def _mint(self, call: Call) -> str:
        # The same routing fields as the call's ufrag: its first owner names
        # it in the hint (a migration does not change the hint).
        try:
            transceiver_id = decode_ufrag(self.hint_key, call.server_ufrag).transceiver_id
        except UfragError:  # its key was retired since: the current owner routes it as well
            transceiver_id = call.transceiver_id
        return encode_ufrag(self.hint_key, transceiver_id, call.conn_id)

    async def _restart(self, call: Call, client_ufrag: str, client_pwd: str) -> web.Response:
        server_ufrag = self._mint(call)
        try:
            transceiver = self.desk.registry.get_transceiver(call.transceiver_id)
            reply = await self.desk.client.call_op(
                transceiver, "POST", f"/calls/{call.conn_id}/ice-restart",
                {"ufrag": server_ufrag, "remote_ufrag": client_ufrag, "remote_pwd": client_pwd}, expect=(200,))
        except TransceiverRefused as exc:
            return self._refused_by_owner(call, exc)
        except (TransceiverError, LookupError) as exc:
            log.warning("ICE restart of conn_id %d on %d: %s", call.conn_id, call.transceiver_id, exc)
            return self._refuse("restart-failed", 502, "the call's transceiver failed to restart ICE")
        pwd = reply.get("pwd")
        if reply.get("ufrag") != server_ufrag or not isinstance(pwd, str) or not is_ice_ufrag(pwd):
            log.warning("ICE restart of conn_id %d on %d: a reply without the new credentials",
                        call.conn_id, call.transceiver_id)
            return self._refuse("restart-failed", 502, "the call's transceiver failed to restart ICE")
        try:
            call = self.desk.registry.restart_ice(call.conn_id, client_ufrag, server_ufrag)
        except UnknownCallError:
            return self._refuse("restart-ended", 404, "the call ended during its ICE restart")
        self.desk.counters.restarted()
        log.info("call %s conn_id %d: ICE restarted", call.call_id, call.conn_id)
        return web.Response(status=200, text=answer_fragment(server_ufrag, pwd, self.candidates),
                            content_type=TRICKLE, headers={"ETag": etag(call)})

    def _refused_by_owner(self, call: Call, exc: TransceiverRefused) -> web.Response:
        if exc.status == 422:  # this call can never restart (kept on aiortc)
            return self._refuse("ice-restart-unsupported", 422, f"this call cannot restart ICE: {exc.reason}",
                                kind="ice-restart-unsupported")
        if exc.status == 409:  # frozen for a migration: a moment later it can
            return self._refuse("restart-conflict", 409, f"ICE restart refused for now: {exc.reason}",
                                {"Retry-After": "1"})
        if exc.status == 404:
            return self._refuse("restart-ended", 404, "the call ended during its ICE restart")
        log.warning("ICE restart of conn_id %d on %d: %s", call.conn_id, call.transceiver_id, exc)
        return self._refuse("restart-failed", 502, "the call's transceiver failed to restart ICE")
