"""Keeps a transceiver registered with relayd: POST {relay_url}/v1/transceivers,
then PUT {relay_url}/v1/transceivers/{id}/heartbeat every interval (and right
away when a call ends), registering again on 404."""

from __future__ import annotations

import asyncio
import logging
import ssl

import aiohttp

from manager import pki

from .transceiver import Transceiver

logger = logging.getLogger(__name__)


class Registrar:
    """Keeps this transceiver registered with the relay manager and heartbeating.

    Relay down or misbehaving: keep retrying every interval, log the problem
    once, and log again when it recovers.
    """

    def __init__(
        self,
        transceiver: Transceiver,
        relay_url: str,
        control_url: str,
        interval: float = 1.0,
        timeout: float = 2.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.tx = transceiver
        self.relay_url = relay_url.rstrip("/")
        self.control_url = control_url
        self.interval = interval
        self.timeout = timeout
        # pki.client_context of this transceiver: the relay is checked to be
        # relayd, and our certificate is who we register as. None: plain HTTP
        # (in-process tests only).
        self.tls = tls
        self._tls_args = {} if tls is None else {"ssl": tls, "server_hostname": pki.relayd_name()}
        self.registered = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._problem: str | None = None  # last logged problem, to log once
        self.tx.on_call_ended.append(lambda conn_id, reason: self.poke())

    def poke(self) -> None:
        """Heartbeat now (a call ended: the relay should stop routing to it)."""
        self._wake.set()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self, final_heartbeat: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._session is not None:
            if final_heartbeat and self.registered:
                # Tell the relay to place no more calls here; best effort.
                try:
                    await self._heartbeat(healthy=False)
                except (TimeoutError, aiohttp.ClientError, OSError):
                    pass
            await self._session.close()
            self._session = None

    async def request_drain(self, deadline_s: float) -> str | None:
        """Ask this relay to move our calls elsewhere within `deadline_s`
        (manager.relay.drain); None if it took the request, else why not."""
        if self._session is None:
            return "not started"
        url = f"{self.relay_url}/v1/transceivers/{self.tx.id}/drain"
        try:
            async with self._session.post(url, json={"deadline_s": deadline_s}, **self._tls_args) as resp:
                return None if resp.status == 202 else f"HTTP {resp.status} {(await resp.text()).strip()[:200]}"
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return f"unreachable ({type(exc).__name__}: {exc})"

    async def _register(self) -> bool:
        assert self._session is not None
        body = {"id": self.tx.id, "control_url": self.control_url, "capacity": self.tx.capacity}
        async with self._session.post(f"{self.relay_url}/v1/transceivers", json=body, **self._tls_args) as resp:
            if resp.status in (200, 201):
                return True
            self._report(f"registration refused: HTTP {resp.status} {(await resp.text())[:200]}")
            return False

    async def _heartbeat(self, healthy: bool | None = None) -> int:
        assert self._session is not None
        body = {
            "healthy": self.tx.healthy if healthy is None else healthy,
            "calls": self.tx.calls() if healthy is not False else [],
        }
        url = f"{self.relay_url}/v1/transceivers/{self.tx.id}/heartbeat"
        async with self._session.put(url, json=body, **self._tls_args) as resp:
            return resp.status

    def _report(self, problem: str) -> None:
        if problem != self._problem:
            logger.warning(
                "relay manager %s: %s (retrying every %gs)", self.relay_url, problem, self.interval
            )
            self._problem = problem

    async def _loop(self) -> None:
        while True:
            try:
                if not self.registered:
                    self.registered = await self._register()
                    if self.registered:
                        logger.info(
                            "registered with relay manager %s as transceiver %d",
                            self.relay_url,
                            self.tx.id,
                        )
                        self._problem = None
                        continue  # first heartbeat right away
                else:
                    status = await self._heartbeat()
                    if status == 404:
                        # The relay forgot us (restart, expiry): register again.
                        logger.info(
                            "relay manager does not know transceiver %d; re-registering", self.tx.id
                        )
                        self.registered = False
                        continue
                    if status not in (200, 204):
                        self._report(f"heartbeat answered HTTP {status}")
                    elif self._problem is not None:
                        logger.info("relay manager %s reachable again", self.relay_url)
                        self._problem = None
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                self._report(f"unreachable ({type(exc).__name__}: {exc})")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
