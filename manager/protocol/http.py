"""What the four aiohttp apps (relayd's control, registration and signaling
APIs, the transceiver's control API) share: one-line error responses, JSON
request bodies, and the middleware that turns ApiError (and whatever else an
app maps to a status) into an error response instead of a traceback.

Errors are `{"error": "..."}` on the JSON APIs (json_error) and a text/plain
line on the client-facing and registration APIs (text_error), as
manager.protocol.api describes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from manager.protocol.api import ApiError, M, json_object, parse_body

Respond = Callable[[int, str], web.Response]
#: (status, message) for an exception the app maps itself, None to let it through.
Translate = Callable[[web.Request, Exception], "tuple[int, str] | None"]


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def text_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=message + "\n", content_type="text/plain", headers=headers)


async def json_body(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    """The request's JSON object ({} for an empty optional body); ApiError(400) otherwise."""
    return json_object(await request.read(), optional=optional)


async def model_body(request: web.Request, model: type[M]) -> M:
    """A JSON body validated by `model`: 415 unless it says application/json,
    400 naming the field when it does not validate."""
    if request.content_type != "application/json":
        raise ApiError(415, "Content-Type must be application/json")
    return parse_body(await request.read(), model)


def error_middleware(respond: Respond, translate: Translate | None = None,
                     refusals: logging.Logger | None = None):
    """A middleware answering ApiError with `respond(status, message)`, and
    any other exception `translate` maps to a status likewise (the rest
    propagates: aiohttp's own HTTPExceptions, unless translated). With
    `refusals`, every 403 is logged there as a warning."""

    @web.middleware
    async def errors(request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            if refusals is not None and exc.status == 403:
                refusals.warning("refused %s %s from %s: %s", request.method, request.path, request.remote, exc)
            return respond(exc.status, str(exc))
        except Exception as exc:
            found = translate(request, exc) if translate is not None else None
            if found is None:
                raise
            return respond(*found)

    return errors
