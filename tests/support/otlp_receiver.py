"""An OTLP/HTTP trace receiver of our own: a small HTTP server that decodes
each ``POST /v1/traces`` body (a protobuf ExportTraceServiceRequest, as the
OpenTelemetry exporters send it) with opentelemetry-proto and keeps the spans."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass
class ReceivedSpan:
    service: str
    resource: dict
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict
    events: list[str]
    status: int  # 0 unset, 1 ok, 2 error
    start_ns: int
    end_ns: int


def _value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def decode(body: bytes) -> list[ReceivedSpan]:
    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    out = []
    for rs in req.resource_spans:
        resource = {a.key: _value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(ReceivedSpan(
                    service=resource.get("service.name", ""), resource=resource, name=s.name, trace_id=s.trace_id.hex(),
                    span_id=s.span_id.hex(), parent_id=s.parent_span_id.hex(),
                    attributes={a.key: _value(a.value) for a in s.attributes}, events=[e.name for e in s.events],
                    status=s.status.code, start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano))
    return out


@dataclass
class OtlpReceiver:
    server: ThreadingHTTPServer
    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def matching(self, pred: Callable[[ReceivedSpan], bool]) -> list[ReceivedSpan]:
        with self.lock:
            return [s for s in self.spans if pred(s)]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_receiver(host: str = "127.0.0.1", port: int = 0,
                   make_server: Callable[[Callable[[], ThreadingHTTPServer]], ThreadingHTTPServer] | None = None,
                   ) -> OtlpReceiver:
    """Serve on host:port from a thread; `make_server(build)` runs `build`
    where the socket must be made (e.g. inside a lab namespace)."""
    holder: list[OtlpReceiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
                self.send_error(404 if self.path != "/v1/traces" else 415)
                return
            spans = decode(body)
            rec = holder[0]
            with rec.lock:
                rec.spans.extend(spans)
                rec.requests += 1
            reply = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args) -> None:
            pass  # quiet: pytest shows the assertions, not the access log

    def build() -> ThreadingHTTPServer:
        return ThreadingHTTPServer((host, port), Handler)

    server = make_server(build) if make_server is not None else build()
    rec = OtlpReceiver(server)
    holder.append(rec)
    threading.Thread(target=server.serve_forever, name="otlp-receiver", daemon=True).start()
    return rec
