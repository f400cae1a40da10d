"""The public listener: clients' SDP exchange, WHIP (RFC 9725), and
nothing else (no listing, no transceiver routes; those are on the internal
listener, manager.relay.registration).

    POST    /v1/calls              application/sdp offer -> 201 answer, Location, ETag
    DELETE  /v1/calls/{call_id}    -> 204 (the credential that created the call)
    PATCH   /v1/calls/{call_id}    trickle-ice-sdpfrag (manager.relay.whip)
    OPTIONS any                    CORS preflight (configured origins only)

The same placement serves the Realtime-style calls endpoint
(manager.relay.realtime_api) and Pipecat's offer API
(manager.relay.pipecat_offer); docs/http-api.md describes them all.

With client auth on, every request carries `Authorization: Bearer <API key or
token>`; a call can be ended or updated only with the credential that
created it. With it off, the call's Location (128 random bits) is the only
capability. Creation is bounded (manager.relay.limits; body size, media
sections, SDP lines), per source: the peer's address, or behind a configured
trusted proxy the client its X-Forwarded-For names. Every refusal is an RFC 9457
problem (manager.relay.problems) whose one-line detail names no internal address.

Placing a call: validate the offer, pick a transceiver, mint the server ufrag
carrying the routing hint, have the transceiver answer the offer (with the
client's candidates stripped) using that ufrag, then give the client the
answer with the relay's public address(es) as the only candidates.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from manager.observability import tracing
from manager.observability.logs import bind_call
from manager.protocol.api import ApiError
from manager.protocol.client_auth import AuthError, credential_digest, same_credential
from manager.protocol.http import text_error
from manager.protocol.sdp import (
    SdpError,
    check_public_addrs,
    ice_credentials,
    rewrite_candidates,
    strip_candidates,
    validate,
)
from manager.protocol.sources import TrustedProxies
from manager.protocol.tasks import TaskSet
from manager.protocol.ufrag import HintKeys, encode_ufrag
from manager.relay import pipecat_offer, realtime_api, sideband, whip
from manager.relay.call_desk import Create, Placed, SignalingCounters
from manager.relay.config import LimitsConfig
from manager.relay.credentials import ClientAuth, CreateGrant
from manager.relay.ice_restart import IceRestarts, SharedCount
from manager.relay.limits import CreateLimits
from manager.relay.page import PAGE_HTML
from manager.relay.problems import problem_middleware
from manager.relay.registry import Call, PlacementError, Registry, StoreUnavailable, Transceiver
from manager.relay.transceiver_client import TransceiverClient, TransceiverError

log = logging.getLogger(__name__)

CORS_MAX_AGE = 600


def _unauthorized(message: str) -> web.Response:
    return text_error(401, f"unauthorized: {message}", {"WWW-Authenticate": 'Bearer realm="splitrelay"'})


def check_offer_size(offer: str, limits: LimitsConfig) -> str | None:
    """Why an offer is too big to look at, or None (checked before parsing)."""
    lines = offer.count("\n") + 1
    if lines > limits.max_sdp_lines:
        return f"offer has {lines} lines; at most {limits.max_sdp_lines} are accepted"
    sections = sum(1 for line in offer.splitlines() if line.startswith("m="))
    if sections > limits.max_media_sections:
        return f"offer has {sections} media sections; at most {limits.max_media_sections} are accepted"
    return None


# A fleet's reservation of a connection id: False if taken, StoreUnavailable
# if the shared registry cannot be reached (manager.relay.fleet).
ClaimConnId = Callable[[int], Awaitable[bool]]


class _Api:
    def __init__(self, registry: Registry, hint_key: HintKeys, public_addrs: list[tuple[str, int]],
                 client: TransceiverClient, *, auth: ClientAuth, limits: LimitsConfig,
                 allows_owner: Callable[[str], bool], claim_conn_id: ClaimConnId | None = None,
                 tcp_addrs: Sequence[tuple[str, int]] = (), trusted_proxies: Sequence[str] = (),
                 counters: SignalingCounters | None = None) -> None:
        self.registry = registry
        self.hint_key = hint_key
        self.public_addrs = public_addrs
        self.tcp_addrs = list(tcp_addrs)
        self.client = client
        self.auth = auth
        self.limits = limits
        self.create_limits = CreateLimits(rate=limits.create_rate, burst=limits.create_burst,
                                          max_pending=limits.max_pending,
                                          max_pending_per_source=limits.max_pending_per_source,
                                          source_key=limits.source_key())
        self.proxies = TrustedProxies(trusted_proxies)
        registry.on_call_ended(lambda call, reason: auth.call_ended(call.conn_id))
        registry.on_call_ended(lambda call, reason: tracing.drop("setup", call.conn_id, reason))
        self.allows_owner = allows_owner
        self.claim_conn_id = claim_conn_id
        self._background = TaskSet("signaling", log)
        self.counters = counters or SignalingCounters()
        self.ended = whip.EndedCalls(registry)

    def client_of(self, request: web.Request) -> str:
        """The address the per-source limits count: the peer, or the client a
        trusted proxy names (an untrusted peer's X-Forwarded-For is ignored)."""
        return self.proxies.client_of(request.remote or "?", request.headers.getall("X-Forwarded-For", []))

    async def create_call(self, request: web.Request) -> web.Response:
        return await self.admit(request, self._create, ("application/sdp",))

    async def admit(self, request: web.Request, create: Create, content_types: Sequence[str]) -> web.Response:
        """Run `create` within the creation bounds: the credential, the body's
        type and size, the per-source rate and the placements under way."""
        try:
            grant = self.auth.begin_create(request.headers.get("Authorization"))
        except AuthError as exc:
            return _unauthorized(str(exc))
        except ApiError as exc:
            return text_error(exc.status, str(exc), {"Retry-After": "1"})
        try:
            if request.content_type not in content_types:
                return text_error(415, f"Content-Type must be {' or '.join(content_types)}")
            return await self._admitted(request, grant, create)
        finally:
            self.auth.end_create(grant)  # a token that created no call can be used again

    async def _admitted(self, request: web.Request, grant: CreateGrant, create: Create) -> web.Response:
        if request.content_length is not None and request.content_length > self.limits.max_body:
            return text_error(413, f"offer too large: {request.content_length} bytes; at most {self.limits.max_body}")
        source = self.client_of(request)
        try:
            self.create_limits.admit(source)
        except ApiError as exc:
            return text_error(exc.status, str(exc), {"Retry-After": "1"})
        setup = tracing.begin("call.setup", "place")  # the offer is received
        try:
            resp = await create(request, grant, setup)
        except BaseException:
            setup.end("interrupted")
            raise
        finally:
            self.create_limits.release(source)
        if resp.status >= 300:  # 201, or 200 for Pipecat's offer
            setup.end(f"refused: {resp.status} {resp.text.strip()}")
        return resp

    async def read_body(self, request: web.Request) -> bytes:
        """The whole body, up to max_body + 1 bytes: content.read(n) returns
        what has arrived so far, and a body may come in several segments."""
        limit = self.limits.max_body + 1
        raw = bytearray()
        while len(raw) < limit:
            chunk = await request.content.read(limit - len(raw))
            if not chunk:
                break
            raw += chunk
        return bytes(raw)

    async def _create(self, request: web.Request, grant: CreateGrant, setup: tracing.Trace) -> web.Response:
        raw = await self.read_body(request)
        if len(raw) > self.limits.max_body:
            return text_error(413, f"offer too large: more than {self.limits.max_body} bytes")
        try:
            offer = raw.decode("utf-8")
        except UnicodeDecodeError:
            return text_error(400, "bad offer: SDP is not valid UTF-8")
        placed = await self.place(offer, grant, setup)
        if isinstance(placed, web.Response):
            return placed
        return web.Response(status=201, text=placed.answer, content_type="application/sdp",
                            headers={"Location": f"/v1/calls/{placed.call.call_id}", "ETag": whip.etag(placed.call)})

    async def place(self, offer: str, grant: CreateGrant, setup: tracing.Trace,
                    session: dict | None = None) -> Placed | web.Response:
        """Place a call for this offer: the answer as the client gets it, or the refusal.
        `session`: the Realtime session JSON, handed to the call's agent."""
        credential = grant.credential
        problem = check_offer_size(offer, self.limits)
        if problem is not None:
            return text_error(400, f"bad offer: {problem}")
        try:
            validate(offer, "offer")
            client_ufrag, _ = ice_credentials(offer)
        except SdpError as exc:
            return text_error(400, f"bad offer: {exc}")

        try:
            transceiver = self.registry.place()
        except PlacementError as exc:
            return text_error(503, f"no transceiver available: {exc}")
        conn_id = self.registry.allocate_conn_id()
        if self.claim_conn_id is not None:
            # A fleet: the id must be free on every relay, and the shared
            # registry must be reachable, or the call could not be served
            # (nor ended, nor moved) by the other relays.
            try:
                for _ in range(8):
                    if await self.claim_conn_id(conn_id):
                        break
                    self.registry.release_conn_id(conn_id)
                    conn_id = self.registry.allocate_conn_id()
                else:
                    return text_error(503, "could not reserve a connection id; try again", {"Retry-After": "1"})
            except StoreUnavailable as exc:
                self.registry.release_conn_id(conn_id)
                log.warning("call refused: %s", exc)
                return text_error(503, "the relay fleet's registry is unavailable; established calls are unaffected, "
                                  "try again shortly", {"Retry-After": "1"})
            if self.registry.get_transceiver(transceiver.id).draining:
                self.registry.release_conn_id(conn_id)
                return text_error(503, f"no transceiver available: transceiver {transceiver.id} started draining")
        server_ufrag = encode_ufrag(self.hint_key, transceiver.id, conn_id)
        # Recorded before the transceiver is asked, so that concurrent offers
        # already see this one in the transceiver's load.
        call = self.registry.add_call(
            conn_id=conn_id,
            transceiver_id=transceiver.id,
            client_ufrag=client_ufrag,
            server_ufrag=server_ufrag,
            credential=credential_digest(credential) if credential is not None else None,
        )
        setup.set(call_id=call.call_id, conn_id=conn_id, transceiver_id=transceiver.id)
        bind_call(call_id=call.call_id, conn_id=conn_id)  # this request's log lines name the call
        try:
            with setup.phase("answer"):
                answer, owner = await self.client.create_call(
                    transceiver, conn_id, server_ufrag, strip_candidates(offer), session=session
                )
        except TransceiverError as exc:
            self.registry.end_call(conn_id, "placement-failed")
            # Logged in full; the client learns nothing of the inside.
            log.warning("placing conn_id %d on %d: %s", conn_id, transceiver.id, exc)
            return text_error(502, f"transceiver {transceiver.id} failed to answer the offer")
        except BaseException:
            # Cancelled (client gone, shutdown): the transceiver may hold the call.
            self.registry.end_call(conn_id, "placement-failed")
            self._delete_later(transceiver, conn_id)
            raise

        problem = self._check_answer(answer, server_ufrag)
        if problem is None:
            outside = [a for a, _ in owner.endpoints() if not self.allows_owner(a)]
            if outside:
                problem = f"owner address {outside[0]} is not in the internal prefixes"
        if problem is None and self.registry.get_call(conn_id) is not call:
            problem = "the call ended while it was being placed"
        if problem is not None:
            self.registry.end_call(conn_id, "placement-failed")
            self._delete_later(transceiver, conn_id)
            log.warning("placing conn_id %d on %d: %s", conn_id, transceiver.id, problem)
            return text_error(502, f"transceiver {transceiver.id} failed to answer the offer")

        self.registry.activate(conn_id, owner)
        self.auth.created(grant, conn_id)
        setup.phase("ice")  # until the client's first check reaches the relay (manager.relay.slowpath)
        setup.keep("setup", conn_id)
        log.info(
            "call %s conn_id %d placed on transceiver %d", call.call_id, conn_id, transceiver.id
        )
        return Placed(call, rewrite_candidates(answer, self.public_addrs, self.tcp_addrs))

    @staticmethod
    def _check_answer(answer: str, server_ufrag: str) -> str | None:
        try:
            validate(answer, "answer")
            ufrag, _ = ice_credentials(answer)
        except SdpError as exc:
            return f"invalid answer: {exc}"
        if ufrag != server_ufrag:
            # The client would send the hint-less ufrag: the relay could not route it.
            return f"answer uses ufrag {ufrag!r}, not the minted one"
        return None

    def _delete_later(self, transceiver: Transceiver, conn_id: int) -> None:
        """Best-effort cleanup that must not delay (or fail) the reply."""

        async def delete() -> None:
            try:
                await self.client.delete_call(transceiver, conn_id)
            except TransceiverError as exc:
                log.warning("cleaning up conn_id %d: %s", conn_id, exc)

        self._background.spawn(delete())

    def own_call(self, request: web.Request, call_id: str | None = None) -> Call | web.Response:
        """The call at this URL (or `call_id`), if the request carries the credential that created it."""
        try:
            credential = self.auth.check(request.headers.get("Authorization"))
        except AuthError as exc:
            self.counters.refused("unauthorized")
            return _unauthorized(str(exc))
        call = self.registry.get_call_by_id(call_id if call_id is not None else request.match_info["call_id"])
        if call is None:
            return text_error(404, "unknown call")
        bind_call(call_id=call.call_id, conn_id=call.conn_id)
        if call.credential is not None and (credential is None or not same_credential(credential, call.credential)):
            self.counters.refused("other-credential")
            return _unauthorized("this call was created with another credential")
        return call

    async def delete_call(self, request: web.Request) -> web.Response:
        call = self.own_call(request)
        if isinstance(call, web.Response):
            if call.status == 404 and self.ended.ended(request.match_info["call_id"],
                                                       self.auth.check(request.headers.get("Authorization"))):
                return web.Response(status=204)  # it ended moments ago (the client's close_notify came first)
            return call
        await self.end_call(call)
        return web.Response(status=204)

    async def end_call(self, call: Call) -> None:
        """The client hung up: end the call here and on its transceiver."""
        transceiver_id = call.transceiver_id
        # Ended first: the relay stops forwarding even if the transceiver is unreachable.
        self.registry.end_call(call.conn_id, "client-hangup")
        try:
            transceiver = self.registry.get_transceiver(transceiver_id)
            await self.client.delete_call(transceiver, call.conn_id)
        except (TransceiverError, LookupError) as exc:
            log.warning("ending conn_id %d on %d: %s", call.conn_id, transceiver_id, exc)

    async def cleanup(self, app: web.Application) -> None:
        await self._background.close()


def cors_middleware(allowed_origins: Sequence[str]):
    """CORS for the configured origins only (default none): preflights are
    answered, and responses carry Access-Control-Allow-Origin for them.
    The sequence is read at each request (a reload changes it in place)."""
    allowed = allowed_origins
    allow_headers = "Authorization, Content-Type, If-Match"
    expose = "Location, ETag"

    @web.middleware
    async def cors(request: web.Request, handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        ok = origin is not None and origin in allowed
        if request.method == "OPTIONS":
            if not ok:
                return text_error(403, "CORS: origin not allowed")
            return web.Response(status=204, headers={
                "Access-Control-Allow-Origin": origin, "Vary": "Origin",
                "Access-Control-Allow-Methods": "POST, DELETE, PATCH, OPTIONS",
                "Access-Control-Allow-Headers": allow_headers, "Access-Control-Max-Age": str(CORS_MAX_AGE)})
        resp = await handler(request)
        if ok:
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Access-Control-Expose-Headers"] = expose
            resp.headers["Vary"] = "Origin"
        return resp

    return cors


_RELOADABLE = web.AppKey("reloadable", tuple)


def reconfigure(app: web.Application, *, limits: LimitsConfig, allowed_origins: Sequence[str],
                trusted_proxies: Sequence[str]) -> None:
    """Apply reloaded settings to a running public app (manager.relay.reload);
    a placement under way finishes under the limits it was admitted by."""
    api, origins = app[_RELOADABLE]
    api.limits = limits
    api.create_limits.retune(rate=limits.create_rate, burst=limits.create_burst, max_pending=limits.max_pending,
                             max_pending_per_source=limits.max_pending_per_source)
    api.proxies = TrustedProxies(trusted_proxies)
    origins[:] = allowed_origins


async def _talk_page(request: web.Request) -> web.Response:
    return web.Response(text=PAGE_HTML, content_type="text/html",
                        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})


async def _cors_refused(request: web.Request) -> web.Response:
    # Reached only when the CORS middleware did not answer the preflight.
    return text_error(403, "CORS: origin not allowed")


def make_app(
    registry: Registry,
    *,
    hint_key: HintKeys,
    public_addrs: Sequence[tuple[str, int]],
    transceiver_client: TransceiverClient | None = None,
    auth: ClientAuth | None = None,
    limits: LimitsConfig | None = None,
    allowed_origins: Sequence[str] = (),
    allows_owner: Callable[[str], bool] = lambda addr: True,
    claim_conn_id: ClaimConnId | None = None,
    tcp_addrs: Sequence[tuple[str, int]] = (),
    page: bool = False,
    trusted_proxies: Sequence[str] = (),
    counters: SignalingCounters | None = None,
    shared_restarts: SharedCount | None = None,
) -> web.Application:
    """Build the public signaling application. A client passed in stays the caller's to close.
    `tcp_addrs`: ICE-TCP listeners the answers offer as passive TCP candidates.
    `page`: serve the "talk to the agent" page at / (manager.relay.page).
    `shared_restarts`: a fleet's count of ICE restarts (manager.relay.ice_restart)."""
    encode_ufrag(hint_key, 1, 1)  # fail now, not on the first call, if the key is unusable
    addrs = [(addr, port) for addr, port, _ in check_public_addrs(public_addrs)]
    client = transceiver_client if transceiver_client is not None else TransceiverClient()
    limits = limits or LimitsConfig()
    tcp = [(addr, port) for addr, port, _ in check_public_addrs(tcp_addrs)] if tcp_addrs else []
    api = _Api(registry, hint_key, addrs, client, auth=auth or ClientAuth("off"), limits=limits,
               allows_owner=allows_owner, claim_conn_id=claim_conn_id, tcp_addrs=tcp,
               trusted_proxies=trusted_proxies, counters=counters)

    origins = list(allowed_origins)
    # aiohttp's own body cap is a backstop (a chunked body has no length to check first).
    app = web.Application(client_max_size=limits.max_body + 1024,
                          middlewares=[cors_middleware(origins), problem_middleware])
    app[_RELOADABLE] = (api, origins)
    if page:
        app.router.add_get("/", _talk_page)
    app.router.add_post("/v1/calls", api.create_call)
    app.router.add_delete("/v1/calls/{call_id}", api.delete_call)
    restarts = IceRestarts(api, hint_key, addrs, tcp, shared=shared_restarts)
    app.router.add_patch("/v1/calls/{call_id}", whip.Trickle(api, restarts.restart).patch)
    realtime_api.add_routes(app, api)
    pipecat_offer.add_routes(app, api)
    sideband.add_routes(app, api)
    app.router.add_route("OPTIONS", "/{tail:.*}", _cors_refused)
    app.on_cleanup.append(api.cleanup)
    if transceiver_client is None:

        async def close_client(app: web.Application) -> None:
            await client.close()

        app.on_cleanup.append(close_client)
    return app
