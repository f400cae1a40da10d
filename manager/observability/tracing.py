"""Traces: OpenTelemetry spans for a call's set-up, its migrations and failovers.

Off unless configured (``[telemetry] otlp_endpoint`` in relayd's config, the
transceiver's ``--otlp-endpoint``): then every function here returns at once
and the internal API requests carry no header. On, spans go by OTLP
(HTTP/protobuf) to the endpoint through the SDK's batch processor.

A trace is a root span with one child span per *phase*; a phase ends where
the next begins, and the root carries an event at each boundary:

- ``call.setup`` (relayd): ``place`` (offer received → placed on a
  transceiver), ``answer`` (→ the transceiver's answer), ``ice`` (→ the
  client's first STUN check at the relay), ``install`` (→ the flow is in the
  kernel). The transceiver adds ``transceiver.connect`` (answered → ICE and
  DTLS connected) to the same trace.
- ``call.migrate`` (relayd): ``export`` (the old owner freezes the call and
  exports it; its ``transceiver.freeze`` span shows the freeze), ``import``,
  ``flip`` (the owner entry), ``resume`` (→ the new owner's first packet).
- ``call.failover`` (the relay that takes a client over): ``check`` (the
  owner authenticates the client's packet), ``install``.

relayd's requests to a transceiver carry the W3C ``traceparent`` of the phase
under way (``inject``); the transceiver's control API continues it in a server
span (``server_span``), so one trace holds both processes' spans.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger(__name__)

#: Calls whose set-up is still traced; beyond, the oldest is ended as "abandoned".
MAX_OPEN = 10_000

# The OpenTelemetry modules, imported when tracing is first switched on: a
# process without an endpoint never loads them.
_ot = SimpleNamespace()
_provider: TracerProvider | None = None
_tracer: Tracer | None = None  # None: tracing is off
# The phase whose requests to a transceiver carry its context (set only inside `with phase`).
_current: contextvars.ContextVar[Span | None] = contextvars.ContextVar("splitrelay_trace_phase", default=None)
# Traces that outlive the request that began them, by (kind, conn_id).
_open: OrderedDict[tuple[str, int], Phases] = OrderedDict()


def check_endpoint(url: str) -> str:
    """An OTLP/HTTP endpoint as given, or ValueError saying what is wrong with it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"OTLP endpoint {url!r} must be an http:// or https:// URL with a host, "
                         "e.g. http://collector:4318")
    try:
        parts.port  # noqa: B018 (a bad port raises here)
    except ValueError:
        raise ValueError(f"OTLP endpoint {url!r} has an invalid port") from None
    return url


def configure(service: str, endpoint: str | None, *, instance: str | None = None) -> bool:
    """Export this process's spans to an OTLP/HTTP endpoint (``http://host:4318``
    or the full ``…/v1/traces`` URL); None leaves tracing off. Returns whether on."""
    if not endpoint:
        return False
    # Imported here, as in _load: a process without an endpoint never needs them.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    url = endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
    attrs = {"service.name": service, **({"service.instance.id": instance} if instance else {})}
    provider = TracerProvider(resource=Resource.create(attrs))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    use_provider(provider)
    log.info("traces: OTLP to %s", url)
    return True


def use_provider(provider: TracerProvider | None) -> None:
    """Trace through `provider` (tests: one with an in-memory exporter); None: off."""
    global _provider, _tracer
    if provider is not None:
        _load()
    _provider = provider
    _tracer = provider.get_tracer("splitrelay") if provider is not None else None
    _open.clear()


def _load() -> None:
    if hasattr(_ot, "trace"):
        return
    from opentelemetry import trace  # noqa: PLC0415
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator  # noqa: PLC0415

    _ot.trace, _ot.propagator = trace, TraceContextTextMapPropagator()


def shutdown() -> None:
    """Export what is buffered, then stop (the process is ending). Set-ups
    still under way are ended first, marked so, to be sent too."""
    for phases in list(_open.values()):
        phases.end("process stopping")
    provider = _provider
    use_provider(None)
    if provider is not None:
        provider.shutdown()


def enabled() -> bool:
    return _tracer is not None


# --- across processes ------------------------------------------------------------------


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current phase's ``traceparent`` to an internal API request's headers."""
    span = _current.get() if _tracer is not None else None
    if span is not None:
        _ot.propagator.inject(headers, context=_ot.trace.set_span_in_context(span))
    return headers


@contextlib.contextmanager
def server_span(name: str, headers: Mapping[str, str], **attrs: Any) -> Iterator[Span | None]:
    """A request served for relayd: a span continuing the trace its
    ``traceparent`` names (none without one), current while it is handled."""
    if _tracer is None or "traceparent" not in headers:
        yield None
        return
    parent = _ot.propagator.extract(headers)
    with _tracer.start_as_current_span(name, context=parent, kind=_ot.trace.SpanKind.SERVER,
                                       attributes=_attrs(attrs)) as span:
        yield span


@contextlib.contextmanager
def span(name: str, **attrs: Any) -> Iterator[None]:
    """A child of the current span, if one is being traced (a step inside a request)."""
    if _tracer is None or not _ot.trace.get_current_span().get_span_context().is_valid:
        yield
        return
    with _tracer.start_as_current_span(name, attributes=_attrs(attrs)):
        yield


def _attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if v is not None}


# --- phased traces ---------------------------------------------------------------------


class Phases:
    """A root span and its phases, one after another (see the module docstring)."""

    def __init__(self, name: str, **attrs: Any) -> None:
        # A child of the current span if there is one (transceiver.connect), else a root.
        self.root = _tracer.start_span(name, attributes=_attrs(attrs))
        self.phase_span: Span | None = None
        self.phase_name: str | None = None
        self.done = False

    def set(self, **attrs: Any) -> None:
        self.root.set_attributes(_attrs(attrs))

    def phase(self, name: str, **attrs: Any) -> _PhaseScope:
        """End the phase under way (an event on the root marks the boundary),
        begin `name`. As a context manager it is current meanwhile: the
        internal API requests made inside carry it."""
        now = time.time_ns()
        if self.phase_span is not None:
            self.phase_span.end(end_time=now)
        if self.phase_name is not None:
            self.root.add_event(f"{self.phase_name} done", timestamp=now)
        self.phase_name = name
        self.phase_span = _tracer.start_span(name, context=_ot.trace.set_span_in_context(self.root),
                                             attributes=_attrs(attrs), start_time=now)
        return _PhaseScope(self.phase_span)

    def end(self, error: str | None = None) -> None:
        """End the phase under way and the root; with `error`, both are marked failed."""
        if self.done:
            return
        self.done = True
        now = time.time_ns()
        if error is None and self.phase_name is not None:
            self.root.add_event(f"{self.phase_name} done", timestamp=now)
        for span in (self.phase_span, self.root):
            if span is None:
                continue
            if error is not None:
                span.set_status(_ot.trace.Status(_ot.trace.StatusCode.ERROR, error))
            span.end(end_time=now)

    def keep(self, kind: str, conn_id: int) -> None:
        """Hold this trace until a later milestone of the call ends a phase (`advance`)."""
        old = _open.pop((kind, conn_id), None)
        if old is not None:
            old.end("superseded")
        _open[(kind, conn_id)] = self
        while len(_open) > MAX_OPEN:
            _open.popitem(last=False)[1].end("abandoned")


class _PhaseScope:
    """`with phases.phase(...)`: the phase is current (its context is injected) inside."""

    def __init__(self, span: Span) -> None:
        self.span = span
        self._token: contextvars.Token | None = None

    def __enter__(self) -> Span:
        self._token = _current.set(self.span)
        return self.span

    def __exit__(self, *exc: object) -> None:
        _current.reset(self._token)


class _Off:
    """What tracing hands out while off: every method does nothing."""

    def set(self, **attrs: Any) -> None:
        pass

    def phase(self, name: str, **attrs: Any) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    def end(self, error: str | None = None) -> None:
        pass

    def keep(self, kind: str, conn_id: int) -> None:
        pass


OFF = _Off()
#: What `begin` hands out: a traced run of phases, or OFF.
Trace = Phases | _Off


def begin(name: str, first_phase: str | None = None, **attrs: Any) -> Trace:
    """A new trace (``call.setup``, ``call.migrate``, ``call.failover``), in
    `first_phase` if given."""
    if _tracer is None:
        return OFF
    phases = Phases(name, **attrs)
    if first_phase is not None:
        phases.phase(first_phase)
    return phases


def advance(kind: str, conn_id: int, phase: str | None, /, **attrs: Any) -> None:
    """A held trace of this call reached its next milestone: begin `phase`, or
    with None end the trace. Nothing if none is held (tracing off, or the
    milestone came again)."""
    if _tracer is None:
        return
    phases = _open.get((kind, conn_id))
    if phases is None or (phase is not None and phases.phase_name == phase):
        return
    if phase is None:
        del _open[(kind, conn_id)]
        phases.set(**attrs)
        phases.end()
    else:
        phases.phase(phase, **attrs)


def drop(kind: str, conn_id: int, reason: str) -> None:
    """The call ended before its held trace did: end it, failed with `reason`."""
    if _tracer is None:
        return
    phases = _open.pop((kind, conn_id), None)
    if phases is not None:
        phases.end(reason)


def follow(name: str, kind: str, conn_id: int, /, **attrs: Any) -> None:
    """Begin a held span in the current trace (the transceiver's ``transceiver.connect``,
    inside the request that placed the call); `advance` or `drop` ends it."""
    if _tracer is None or not _ot.trace.get_current_span().get_span_context().is_valid:
        return
    phases = Phases(name, **attrs)
    phases.keep(kind, conn_id)
