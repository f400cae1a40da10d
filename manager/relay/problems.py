"""Errors of the public listener as RFC 9457 problem details
(`application/problem+json`), and the middleware that makes every error leave
that way: the handlers' own refusals (built here, or one-line text/plain ones
from older code), and aiohttp's (an unknown path, a method a route lacks, a
body over the size cap).

    {"type": "about:blank", "title": "Not Found", "status": 404, "detail": "unknown call"}

`title` is the status's phrase; `detail` is the one-line reason a person
reads. `type` stays about:blank (the status says what kind of refusal it
is); the refusals a client program may want to tell apart carry an extension
member `code` (one of CODES).
"""

from __future__ import annotations

import json
from http import HTTPStatus

from aiohttp import web

from manager.protocol.api import one_line

PROBLEM = "application/problem+json"
#: Refusals with their own `code` (a client may branch on them).
CODES = ("stale-etag", "no-ufrag", "ice-restart-unsupported", "restart-storm", "bad-session")


def problem(status: int, detail: str, headers: dict[str, str] | None = None, *, kind: str | None = None,
            extra: dict[str, object] | None = None) -> web.Response:
    """A problem-details response; `kind` (one of CODES) sets `code`."""
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body: dict[str, object] = {"type": "about:blank", "title": title, "status": status,
                               "detail": one_line(detail, 400)}
    if kind is not None:
        assert kind in CODES, kind
        body["code"] = kind
    if extra:
        body.update(extra)
    return web.Response(status=status, body=json.dumps(body).encode(), content_type=PROBLEM, headers=headers)


def _as_problem(resp: web.StreamResponse) -> web.StreamResponse:
    """A text/plain (or empty) error response turned into a problem, headers kept."""
    if resp.status < 400 or not isinstance(resp, web.Response) or resp.content_type == PROBLEM:
        return resp
    text = resp.text if resp.content_type == "text/plain" and resp.body is not None else None
    detail = (text or "").strip() or (resp.reason or "")
    kept = {k: v for k, v in resp.headers.items() if k.lower() not in ("content-type", "content-length")}
    return problem(resp.status, detail, kept)


@web.middleware
async def problem_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Every error of the public listener as problem details (aiohttp's own included)."""
    try:
        resp = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = exc.text.strip() if exc.text and exc.content_type == "text/plain" else exc.reason
        status = exc.status
        if status == 405 and exc.headers.get("Allow", "").strip() == "OPTIONS":
            status = 404  # only the CORS preflight's catch-all route matched: there is nothing here
        if status == 404:
            return problem(404, f"no such resource: {request.path}")
        if status == 405:
            detail = f"{request.method} is not allowed on {request.path}"
        elif status == 413:
            detail = "request body too large"
        kept = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return problem(status, detail, kept)
    return _as_problem(resp)
