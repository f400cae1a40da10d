"""relayd's client of transceivers' control APIs (`{control_url}/calls...`):
place a call, and the migration steps (export, import, activate, release,
unfreeze). Every failure is a TransceiverError with a one-line message."""

from __future__ import annotations

import json
import ssl

import aiohttp
from pydantic import ValidationError

from manager import pki
from manager.observability import tracing
from manager.protocol.addresses import OwnerAddr
from manager.protocol.api import CreateCallReply, CreateCallRequest, one_line, validation_message
from manager.relay.registry import Transceiver

DEFAULT_TRANSCEIVER_TIMEOUT = 10.0  # aiortc gathers candidates before it answers


class TransceiverError(Exception):
    """A transceiver's control API failed, timed out or answered nonsense."""


class TransceiverRefused(TransceiverError):
    """The transceiver refused the request (a 4xx): `status`, and `reason` its one-line error."""

    def __init__(self, message: str, status: int, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def _reason(body: bytes) -> str:
    """The control API's `{"error": ...}` line, or the body as one line."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return one_line(data["error"])
    return one_line(body.decode("utf-8", "replace"))


class TransceiverClient:
    """Talks to transceivers' control APIs (`{control_url}/calls`)."""

    def __init__(
        self,
        session: aiohttp.ClientSession | None = None,
        *,
        timeout: float = DEFAULT_TRANSCEIVER_TIMEOUT,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._session = session
        self._own_session = session is None
        self.timeout = timeout
        # relayd's client context (manager.pki.client_context): each request
        # verifies the server is the transceiver it is meant for. None: plain
        # HTTP, for in-process tests only.
        self.tls = tls

    def _http(self) -> aiohttp.ClientSession:
        # Created lazily: a ClientSession must be made inside the running loop.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._own_session = True
        return self._session

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(self, transceiver: Transceiver, method: str, url: str, **kwargs) -> tuple[int, bytes]:
        if self.tls is not None:
            if not url.startswith("https://"):
                raise TransceiverError(f"{method} {url}: transceiver {transceiver.id} must be reached over https")
            kwargs.update(ssl=self.tls, server_hostname=pki.transceiver_name(transceiver.id))
        if tracing.enabled():  # the phase under way continues on the transceiver (W3C traceparent)
            kwargs["headers"] = tracing.inject(dict(kwargs.get("headers") or {}))
        try:
            async with self._http().request(
                method, url, timeout=aiohttp.ClientTimeout(total=self.timeout), **kwargs
            ) as resp:
                return resp.status, await resp.read()
        except TimeoutError:
            raise TransceiverError(f"{method} {url} timed out after {self.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            reason = one_line(str(exc)) or type(exc).__name__
            raise TransceiverError(f"{method} {url} failed: {reason}") from None

    async def create_call(
        self, transceiver: Transceiver, conn_id: int, ufrag: str, offer: str, *, session: dict | None = None
    ) -> tuple[str, OwnerAddr]:
        """Have the transceiver answer `offer` as `ufrag`; return (answer, owner).
        `session`: the Realtime session JSON for the call's agent (sent only when given)."""
        url = f"{transceiver.control_url}/calls"
        request = CreateCallRequest(conn_id=conn_id, ufrag=ufrag, offer=offer, session=session)
        status, body = await self._request(transceiver, "POST", url,
                                           json=request.model_dump(exclude_none=True))
        if status != 201:
            detail = one_line(body.decode("utf-8", "replace"))
            raise TransceiverError(f"POST {url} returned {status}: {detail}")
        try:
            reply = CreateCallReply.model_validate_json(body)
            owner = OwnerAddr(**reply.owner.model_dump())
        except ValidationError as exc:
            detail = validation_message(exc)
            raise TransceiverError(f"POST {url} reply is invalid: {detail}") from None
        except ValueError as exc:
            raise TransceiverError(f"POST {url} reply is invalid: {exc}") from None
        return reply.answer, owner

    async def call_op(self, transceiver: Transceiver, method: str, path: str, body: dict | None = None,
                      expect: tuple[int, ...] = (200, 201, 204)) -> dict:
        """A JSON request to a transceiver's control API (migration steps:
        export, import, activate, release, unfreeze); the reply's JSON or {}."""
        url = f"{transceiver.control_url}{path}"
        status, reply = await self._request(transceiver, method, url, json=body if body is not None else {})
        if status not in expect:
            detail = one_line(reply.decode("utf-8", "replace"))
            if 400 <= status < 500:
                raise TransceiverRefused(f"{method} {url} returned {status}: {detail}", status, _reason(reply))
            raise TransceiverError(f"{method} {url} returned {status}: {detail}")
        if not reply.strip():
            return {}
        try:
            data = json.loads(reply)
        except ValueError:
            raise TransceiverError(f"{method} {url} reply is not JSON") from None
        if not isinstance(data, dict):
            raise TransceiverError(f"{method} {url} reply is not a JSON object")
        return data

    async def sideband(self, transceiver: Transceiver, conn_id: int) -> aiohttp.ClientWebSocketResponse:
        """A websocket to the call's sideband on its transceiver (manager.transceiver.sideband)."""
        url = f"{transceiver.control_url}/calls/{conn_id}/sideband"
        kwargs: dict = {}
        if self.tls is not None:
            if not url.startswith("https://"):
                raise TransceiverError(f"GET {url}: transceiver {transceiver.id} must be reached over https")
            kwargs.update(ssl=self.tls, server_hostname=pki.transceiver_name(transceiver.id))
        try:
            return await self._http().ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
                                                 heartbeat=15.0, **kwargs)
        except aiohttp.WSServerHandshakeError as exc:
            raise TransceiverError(f"GET {url} returned {exc.status}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = one_line(str(exc)) or type(exc).__name__
            raise TransceiverError(f"GET {url} failed: {reason}") from None

    async def delete_call(self, transceiver: Transceiver, conn_id: int) -> None:
        url = f"{transceiver.control_url}/calls/{conn_id}"
        status, body = await self._request(transceiver, "DELETE", url)
        # 404: the transceiver has already forgotten the call, which is the goal.
        if status not in (200, 204, 404):
            detail = one_line(body.decode("utf-8", "replace"))
            raise TransceiverError(f"DELETE {url} returned {status}: {detail}")
