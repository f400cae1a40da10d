"""Reloading relayd's configuration while it runs (SIGHUP, `relayctl reload`).

The file is read and validated again; only what a running relayd can take
changes: the creation limits, CORS origins, trusted proxies, the client
credentials (API keys, the token key ring) and the routing-hint key ring,
and XDP's admission rates. Any other field that differs needs a restart:
the reload is refused naming it, and so is a file that does not parse or
validate. A refused reload changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from manager.protocol.keyring import KeyRing
from manager.relay.config import ConfigError, RelaydConfig, load_config
from manager.relay.credentials import ClientAuth
from manager.relay.fleet import redact_url
from manager.relay.kernel.datapath import Datapath
from manager.relay.signaling import reconfigure

log = logging.getLogger(__name__)

# Dotted field paths (or a prefix ending in ".") a reload may change.
RELOADABLE = (
    "limits.create_rate", "limits.create_burst", "limits.max_pending", "limits.max_pending_per_source",
    "limits.max_media_sections", "limits.max_sdp_lines", "limits.max_ice_restarts_per_minute",
    "signaling.allowed_origins", "signaling.trusted_proxies",
    "client_auth.api_keys_file", "client_auth.token_key_file", "client_auth.max_calls_per_subject",
    "hint_key", "hint_key_file",
    "datapath.admit_",
)
# Not the file's to say: the command line's choice stays (relayd --detach-on-exit).
KEPT = ("detach_on_exit",)


class ReloadError(ValueError):
    """A reload refused; str() is the one line the operator sees."""


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def _reloadable(path: str) -> bool:
    return any(path == r or (r.endswith("_") and path.startswith(r)) for r in RELOADABLE)


def diff(old: RelaydConfig, new: RelaydConfig) -> tuple[list[str], list[str]]:
    """(reloadable changes, restart-only changes), each 'field: old -> new'.
    Key material never shows: the rings are compared by id."""
    a, b = _flat(old.model_dump(mode="json")), _flat(new.model_dump(mode="json"))
    live, restart = [], []
    for path in sorted(set(a) | set(b)):
        if path in KEPT or path == "hint_key" or a.get(path) == b.get(path):
            continue
        show = redact_url if path == "registry.url" else (lambda v: v)  # a password may be in it
        line = f"{path}: {show(a.get(path))!r} -> {show(b.get(path))!r}"
        (live if _reloadable(path) else restart).append(line)
    if old.hint_ring != new.hint_ring:
        live.append(f"hint keys: {new.hint_ring.change_from(old.hint_ring)}")
    return live, restart


@dataclass
class ReloadTargets:
    """The running parts a reload changes, passed in by the daemon."""

    public_app: web.Application
    auth: ClientAuth
    hint_ring: KeyRing  # the ring the signaling API and the slow path hold
    datapath: Datapath


class Reloader:
    """Re-reads the config file and applies what may change; one reload at a time."""

    def __init__(self, path: str | Path | None, current: RelaydConfig, targets: ReloadTargets,
                 on_applied: Callable[[RelaydConfig], None] = lambda cfg: None) -> None:
        self.path = path
        self.current = current
        self.targets = targets
        self.on_applied = on_applied
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None  # the SIGHUP reload under way (held: the loop keeps tasks weakly)

    async def reload(self) -> dict[str, Any]:
        """{"changed": [...]} once applied; ReloadError (nothing changed) if refused."""
        async with self._lock:
            return await self._reload()

    async def _reload(self) -> dict[str, Any]:
        if self.path is None:
            raise ReloadError("reload refused: relayd was started without a config file (-c), nothing to re-read")
        try:
            new = await asyncio.to_thread(load_config, self.path)
        except ConfigError as exc:
            lines = str(exc).splitlines()
            where = "" if self.path is None or lines[0].startswith(str(self.path)) else f"{self.path}: "
            raise ReloadError(f"reload refused, the running configuration stays: {where}{'; '.join(lines)}") from None
        for name in KEPT:
            setattr(new, name, getattr(self.current, name))
        live, restart = diff(self.current, new)
        if restart:
            fields = [line.split(":", 1)[0] for line in restart]
            raise ReloadError(f"reload refused, the running configuration stays: {', '.join(fields)} "
                              f"need{'s' if len(fields) == 1 else ''} a restart ({'; '.join(restart)})")
        t = self.targets
        try:
            # First: the one step that reads more files (and checks them before it changes anything).
            live += t.auth.reload(new.client_auth)
        except ValueError as exc:
            raise ReloadError(f"reload refused, the running configuration stays: {exc}") from None
        reconfigure(t.public_app, limits=new.limits, allowed_origins=new.signaling.allowed_origins,
                    trusted_proxies=new.signaling.trusted_proxies)
        t.hint_ring.replace(new.hint_ring)
        if any(line.startswith("datapath.admit_") for line in live):
            t.datapath.cfg = new.datapath
            await asyncio.to_thread(t.datapath.configure)
        self.current = new
        self.on_applied(new)
        return {"changed": live, "hint_keys": new.hint_ring.summary()}

    def on_sighup(self) -> None:
        """SIGHUP: reload, and log what changed or why not."""

        async def run() -> None:
            try:
                result = await self.reload()
            except ReloadError as exc:
                log.error("%s", exc)
                return
            except Exception:  # a bug, not the operator's file: keep serving
                log.exception("reload failed")
                return
            log.info("reloaded: %s", "; ".join(result["changed"]) or "nothing changed")

        self._task = asyncio.get_running_loop().create_task(run())


async def post_reload(reloader: Reloader | None) -> web.Response:
    """The control API's POST /reload."""
    if reloader is None:
        return web.json_response({"error": "relayd is not running yet"}, status=503)
    try:
        result = await reloader.reload()
    except ReloadError as exc:
        return web.json_response({"error": str(exc)}, status=409)
    log.info("reloaded (control API): %s", "; ".join(result["changed"]) or "nothing changed")
    return web.json_response(result)
