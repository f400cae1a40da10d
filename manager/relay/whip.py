"""The WHIP session resource (RFC 9725): its entity tag and PATCH.

    PATCH /v1/calls/{call_id}   application/trickle-ice-sdpfrag
        the call's ICE ufrag      -> 204: trickled candidates taken (counted; the
                                     relay learns the client's address from its STUN,
                                     the candidates route nothing)
        another ufrag, If-Match:* -> an ICE restart (manager.relay.ice_restart): 200 with
                                     the answer fragment and a new ETag
        another ufrag, no If-Match:* -> 422 wrong-ufrag
        If-Match not the ETag     -> 412 code stale-etag
        no a=ice-ufrag            -> 400 code no-ufrag

The ETag names the ICE session: a digest of the call id and the server's
ufrag, the same on every relay of a fleet (both are in the shared registry).
Every refusal is counted by reason (SignalingCounters) and leaves the call as
it was. No Link headers: clients need no STUN or TURN server (the relay's
address is the answer's only candidate), so there is no ice-server to name.
"""

from __future__ import annotations

import collections
import hashlib
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from manager.protocol.client_auth import same_credential
from manager.protocol.sdpfrag import Fragment, FragmentError, parse_fragment
from manager.relay.call_desk import CallDesk
from manager.relay.problems import problem
from manager.relay.registry import Call, Registry

TRICKLE = "application/trickle-ice-sdpfrag"
ENDED_TTL = 60.0  # seconds a DELETE of an ended call is still answered 204
MAX_ENDED = 4096


def etag(call: Call) -> str:
    """The call's ICE session entity tag (strong, quoted)."""
    digest = hashlib.sha256(f"{call.call_id}:{call.server_ufrag}".encode()).hexdigest()[:32]
    return f'"{digest}"'


def _matches(if_match: str, tag: str) -> bool:
    """RFC 9110 If-Match: "*" or a list of entity tags (strong comparison)."""
    tags = [t.strip() for t in if_match.split(",")]
    return "*" in tags or tag in tags


class EndedCalls:
    """Calls that ended in the last ENDED_TTL seconds. A client that closes
    its peer connection before its DELETE (as whip-whep does) has the call
    ended by the transceiver first; its DELETE, with the credential that
    created the call, is answered 204 all the same, as the session is gone."""

    def __init__(self, registry: Registry, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._ended: collections.OrderedDict[str, tuple[bytes | None, float]] = collections.OrderedDict()
        registry.on_call_ended(self._on_ended)

    def _on_ended(self, call: Call, reason: str) -> None:
        if reason in ("client-hangup", "placement-failed"):
            return  # ended by a DELETE (a second one finds nothing), or never the client's
        self._ended[call.call_id] = (call.credential, self._clock())
        while len(self._ended) > MAX_ENDED:
            self._ended.popitem(last=False)

    def ended(self, call_id: str, credential: str | None) -> bool:
        entry = self._ended.get(call_id)
        if entry is None or self._clock() - entry[1] > ENDED_TTL:
            return False
        digest = entry[0]
        return digest is None or (credential is not None and same_credential(credential, digest))


# An ICE restart, given the call and its fragment (manager.relay.ice_restart).
Restart = Callable[[Call, Fragment], Awaitable[web.Response]]


class Trickle:
    """PATCH on a WHIP session resource."""

    def __init__(self, desk: CallDesk, restart: Restart) -> None:
        self.desk = desk
        self.restart = restart

    def _refuse(self, reason: str, status: int, detail: str, headers: dict[str, str] | None = None,
                kind: str | None = None) -> web.Response:
        self.desk.counters.refused(reason)
        return problem(status, detail, headers, kind=kind)

    async def patch(self, request: web.Request) -> web.Response:
        call = self.desk.own_call(request)
        if isinstance(call, web.Response):
            return call
        if request.content_type != TRICKLE:
            return self._refuse("content-type", 415, f"Content-Type must be {TRICKLE}")
        tag = etag(call)
        if_match = request.headers.get("If-Match")
        if if_match is not None and not _matches(if_match, tag):
            return self._refuse("stale-etag", 412, "If-Match does not name this ICE session's current ETag",
                                {"ETag": tag}, kind="stale-etag")
        raw = await self.desk.read_body(request)
        if len(raw) > self.desk.limits.max_body:
            return self._refuse("too-large", 413, f"fragment too large: more than {self.desk.limits.max_body} bytes")
        try:
            frag = parse_fragment(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return self._refuse("bad-fragment", 400, "bad fragment: not valid UTF-8")
        except FragmentError as exc:
            return self._refuse("bad-fragment", 400, f"bad fragment: {exc}")
        if frag.ufrag is None:
            return self._refuse("no-ufrag", 400, "bad fragment: no a=ice-ufrag (RFC 8840 requires the ICE "
                                "credentials the candidates belong to)", kind="no-ufrag")
        if frag.ufrag != call.client_ufrag:
            if if_match is not None and "*" in [t.strip() for t in if_match.split(",")]:
                return await self.restart(call, frag)  # RFC 9725: a restart carries If-Match: "*"
            return self._refuse("wrong-ufrag", 422, "the fragment's ice-ufrag is not this call's")
        # The candidates are checked and counted, never used: the relay is the only path.
        self.desk.counters.candidates(len(frag.candidates))
        return web.Response(status=204, headers={"ETag": tag})
