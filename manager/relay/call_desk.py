"""What the public listener's endpoints share: the call desk (placing,
finding and ending calls, manager.relay.signaling implements it) as the
other endpoint modules see it, and the counters of their refusals.

The WHIP, Realtime-style and Pipecat endpoints (manager.relay.whip,
realtime_api, pipecat_offer) are thin shapes over the one placement: they
depend on this protocol, never on signaling itself (which mounts them)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from manager.observability import tracing
from manager.relay.config import LimitsConfig
from manager.relay.credentials import CreateGrant
from manager.relay.registry import Call, Registry
from manager.relay.transceiver_client import TransceiverClient


@dataclass
class Placed:
    """A placed call and the answer the client gets (the relay's candidates in it)."""

    call: Call
    answer: str


# A creation endpoint's own part, once admitted: read its body, place, answer
# (the trace spans the call's set-up, manager.observability.tracing).
Create = Callable[[web.Request, CreateGrant, tracing.Trace], Awaitable[web.Response]]


class CallDesk(Protocol):
    registry: Registry
    client: TransceiverClient
    limits: LimitsConfig
    counters: SignalingCounters

    async def admit(self, request: web.Request, create: Create, content_types: Sequence[str]) -> web.Response:
        """`create` run within the creation bounds (credential, type, size, rate)."""

    async def read_body(self, request: web.Request) -> bytes:
        """The body, up to the size cap plus one byte (more means too large)."""

    async def place(self, offer: str, grant: CreateGrant, setup: tracing.Trace,
                    session: dict[str, Any] | None = None) -> Placed | web.Response:
        """The placed call, or the refusal to send."""

    def own_call(self, request: web.Request, call_id: str | None = None) -> Call | web.Response:
        """The call, if the request carries the credential that created it; else the refusal."""

    async def end_call(self, call: Call) -> None:
        """End the call here and on its transceiver."""


class SignalingCounters:
    """Refusals of requests about calls, by reason (`splitrelay_signaling_refusals_total`),
    the trickled candidates taken (`splitrelay_trickle_candidates_total`) and
    the ICE restarts made (`splitrelay_ice_restarts_total`).
    Registered in relayd's Prometheus registry when one is given."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.prometheus = registry if registry is not None else CollectorRegistry()
        self._refusals = Counter("splitrelay_signaling_refusals", "Refused requests about calls, by reason",
                                 ["reason"], registry=self.prometheus)
        self._candidates = Counter("splitrelay_trickle_candidates", "Candidates received by trickle ICE PATCH",
                                   registry=self.prometheus)
        self._restarts = Counter("splitrelay_ice_restarts", "ICE restarts made by PATCH", registry=self.prometheus)

    def restarted(self) -> None:
        self._restarts.inc()

    def restarts(self) -> float:
        return self.prometheus.get_sample_value("splitrelay_ice_restarts_total") or 0.0

    def refused(self, reason: str) -> None:
        self._refusals.labels(reason).inc()

    def candidates(self, n: int) -> None:
        self._candidates.inc(n)

    def refusals(self, reason: str) -> float:
        return self.prometheus.get_sample_value("splitrelay_signaling_refusals_total", {"reason": reason}) or 0.0
