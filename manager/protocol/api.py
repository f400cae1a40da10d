"""Bodies of the HTTP APIs between relayd and transceivers, and the rules every
one of our APIs shares for errors and JSON bodies. No I/O: each aiohttp app
reads the bytes and turns ApiError into its response.

Errors are one line: `{"error": "..."}` (JSON APIs) or text/plain (the
client-facing signaling API, WHIP-style).
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)

ONE_LINE_LIMIT = 200


class ApiError(Exception):
    """A request refused with an HTTP status; str() is the one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def one_line(text: object, limit: int = ONE_LINE_LIMIT) -> str:
    """Whitespace folded to single spaces, cut at `limit` characters: what an
    error body or a log line may carry of an arbitrary message."""
    return " ".join(str(text).split())[:limit]


def validation_message(exc: ValidationError) -> str:
    """pydantic's first error as `field.path: message`."""
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"])
    return one_line(f"{where}: {err['msg']}" if where else err["msg"])


def json_object(raw: bytes, *, optional: bool = False) -> dict[str, Any]:
    """A request body that must be one JSON object ({} for an empty optional one)."""
    if optional and not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        raise ApiError(400, "body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    return body


def parse_body(raw: bytes, model: type[M]) -> M:
    """A JSON body validated by `model`; ApiError(400) naming the field."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise ApiError(400, f"invalid request body: {validation_message(exc)}") from None


# -- relayd ⇄ transceiver ---------------------------------------------------------------


class OwnerBody(BaseModel):
    """Where a transceiver receives a call's packets (manager.protocol.addresses.OwnerAddr)."""

    model_config = ConfigDict(strict=True)
    addr4: str | None = None
    port4: int = 0
    addr6: str | None = None
    port6: int = 0


class Registration(BaseModel):
    """POST /v1/transceivers: a transceiver announces itself."""

    model_config = ConfigDict(strict=True)
    id: int
    control_url: str
    capacity: int


class Heartbeat(BaseModel):
    """PUT /v1/transceivers/{id}/heartbeat: liveness and the calls it holds."""

    model_config = ConfigDict(strict=True)
    healthy: bool
    calls: list[int] | None = None


class CreateCallRequest(BaseModel):
    """POST {control_url}/calls: answer this offer as this ufrag."""

    model_config = ConfigDict(strict=True)
    conn_id: int
    ufrag: str
    offer: str
    session: dict[str, Any] | None = None  # a Realtime-style session JSON, for the call's agent


class CreateCallReply(BaseModel):
    """The transceiver's answer and where it receives the call."""

    answer: str
    owner: OwnerBody
