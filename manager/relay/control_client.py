"""relayctl's side of relayd's control socket: a synchronous client (plain
http.client over AF_UNIX, no event loop, so it works from any caller), and
the fast-path counter view it shows (also read from the pinned maps while
relayd is down)."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any
from urllib.parse import quote

from manager.relay.kernel.structs import STAT_NAMES, stat_labels


class ControlError(RuntimeError):
    """The control API could not be used; str() is one line for the operator.
    `status` is the HTTP status for errors relayd answered (404, ...), else 0."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("relayd", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except BaseException:
            s.close()
            raise
        self.sock = s


class ControlClient:
    """Synchronous client of relayd's control socket (plain http.client over
    AF_UNIX: no event loop, so it works from any caller)."""

    def __init__(self, socket_path: str | Path, timeout: float = 10.0):
        self.path = Path(socket_path)
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        if not self.path.exists():
            raise ControlError(f"relayd is not running (no control socket at {self.path})")
        conn = _UnixHTTPConnection(str(self.path), self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (ConnectionRefusedError, FileNotFoundError):
            raise ControlError(f"relayd is not running (control socket {self.path} refuses connections)") from None
        except PermissionError:
            raise ControlError(f"permission denied on control socket {self.path}: run as root") from None
        except TimeoutError:
            raise ControlError(f"relayd did not answer on {self.path} within {self.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as exc:
            raise ControlError(f"control socket {self.path}: {exc or type(exc).__name__}") from None
        finally:
            conn.close()
        try:
            data = json.loads(raw) if raw.strip() else {}
        except ValueError:
            data = {"error": raw.decode("utf-8", "replace").strip()[:200]}
        if resp.status >= 400:
            msg = data.get("error") if isinstance(data, dict) else None
            raise ControlError(msg or f"relayd answered {resp.status} {resp.reason}", resp.status)
        return data

    def status(self) -> dict:
        return self.request("GET", "/status")

    def sessions(self) -> dict:
        return self.request("GET", "/sessions")

    def transceivers(self) -> dict:
        return self.request("GET", "/transceivers")

    def stats(self) -> dict:
        return self.request("GET", "/stats")

    def expire(self, idle_s: float | None = None) -> dict:
        return self.request("POST", "/expire", {"idle_s": idle_s} if idle_s is not None else {})

    def reload(self) -> dict:
        return self.request("POST", "/reload")

    def end_session(self, call_id: str) -> dict:
        return self.request("DELETE", f"/sessions/{quote(call_id, safe='')}")


def fastpath_view(counters: dict[str, tuple[int, int]]) -> dict[str, Any]:
    rows = []
    totals: dict[str, dict[str, int]] = {}
    for name in STAT_NAMES:
        packets, nbytes = counters.get(name, (0, 0))
        verdict, reason, cls = stat_labels(name)
        rows.append({"name": name, "verdict": verdict, "reason": reason, "class": cls,
                     "packets": packets, "bytes": nbytes})
        t = totals.setdefault(verdict, {"packets": 0, "bytes": 0})
        t["packets"] += packets
        t["bytes"] += nbytes
    return {"counters": rows, "by_verdict": totals}
