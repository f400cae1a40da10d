"""A transceiver as a service: the control API, the registrar and the ICE
sockets, run until a signal (the programmatic side of `python -m
manager.transceiver`)."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from manager import pki
from manager.observability import tracing
from manager.protocol.keyring import KeyRing

from . import runtime
from .agent import AgentFactory, EchoAgent
from .control import create_app, relayd_only
from .drain import drain
from .imported_call import DEFAULT_CONSENT_TIMEOUT
from .opus import DEFAULT_COMPLEXITY
from .registrar import Registrar
from .transceiver import DEFAULT_CONNECT_TIMEOUT, Transceiver

logger = logging.getLogger(__name__)


@dataclass
class TransceiverConfig:
    """Everything :func:`run` needs; built explicitly by the CLI or a test."""

    id: int
    listen_host: str = "127.0.0.1"
    listen_port: int = 8700
    relay_urls: list[str] = field(default_factory=list)  # every relay of the fleet; none: do not register
    capacity: int = 100
    bind_addrs: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    ice_port: int = 0
    control_url: str | None = None  # advertised URL; default from listen_host:port
    heartbeat_interval: float = 1.0
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    consent_timeout: float = DEFAULT_CONSENT_TIMEOUT  # imported calls (migration)
    agent_factory: AgentFactory = EchoAgent
    pki_dir: Path | None = None  # ca.pem, transceiver-<id>.pem/.key: mutual TLS both ways
    hint_key: KeyRing | pki.KeyRingFile | None = None  # routing-hint keys (pki.read_hint_key): ufrags are checked
    media_engine: bool = True  # placed calls move to the media engine after their handshake
    opus_complexity: int = DEFAULT_COMPLEXITY  # the engine's Opus encoder
    aiortc_audio_buffer: bool = False  # calls on aiortc keep its 80 ms audio jitter buffer
    otlp_endpoint: str | None = None  # traces by OTLP/HTTP (manager.observability.tracing); None: off
    drain_deadline: float = 25.0  # SIGTERM: seconds for the relay to move the calls away (0: end them at once)
    tune_gc: bool = False  # the process is the transceiver's own: runtime.tune_gc once started


async def run(config: TransceiverConfig, stop: asyncio.Event | None = None) -> None:
    """Run a transceiver until SIGTERM/SIGINT (or ``stop`` is set), then drain
    (manager.transceiver.drain) and stop. A second signal ends the drain."""
    tx = Transceiver(
        config.id,
        capacity=config.capacity,
        agent_factory=config.agent_factory,
        bind_addrs=config.bind_addrs,
        ice_port=config.ice_port,
        connect_timeout=config.connect_timeout,
        consent_timeout=config.consent_timeout,
        hint_key=config.hint_key,
        media_engine=config.media_engine,
        opus_complexity=config.opus_complexity,
        aiortc_audio_buffer=config.aiortc_audio_buffer,
    )
    server_tls = client_tls = None
    if config.pki_dir is not None:
        paths = pki.paths(config.pki_dir, pki.transceiver_name(config.id).split(".")[0])
        server_tls, client_tls = pki.server_context(paths), pki.client_context(paths)
    tracing.configure("splitrelay-transceiver", config.otlp_endpoint, instance=str(config.id))
    await tx.start()
    if config.tune_gc:
        runtime.tune_gc()
    app = create_app(tx, authorize=relayd_only if server_tls is not None else None)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.listen_host, config.listen_port, ssl_context=server_tls)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        await tx.stop()
        raise OSError(
            exc.errno, f"cannot listen on {config.listen_host}:{config.listen_port}: {exc.strerror}"
        ) from None
    host, port = runner.addresses[0][:2]
    scheme = "https" if server_tls is not None else "http"
    control_url = config.control_url or (
        f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
    )
    logger.info("transceiver %d control API on %s, ICE owner %s", config.id, control_url, tx.owner)

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    draining: list[asyncio.Future] = []

    def on_signal() -> None:
        if stop.is_set() and draining:
            logger.warning("second signal: ending the drain now")
            draining[0].cancel()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread: rely on `stop`

    # One registrar per relay: each relay hears this transceiver's heartbeats
    # itself, so losing one relay (or the fleet's Redis) loses no health.
    registrars = [Registrar(tx, url, control_url, interval=config.heartbeat_interval, tls=client_tls)
                  for url in config.relay_urls]
    for registrar in registrars:
        await registrar.start()
    try:
        await stop.wait()
        if config.drain_deadline > 0:
            draining.append(asyncio.ensure_future(drain(tx, registrars, config.drain_deadline)))
            await asyncio.gather(draining[0], return_exceptions=True)  # cancelled by a second signal
        logger.info("transceiver %d stopping", config.id)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        for registrar in registrars:
            await registrar.stop()
        await tx.stop()
        await runner.cleanup()
        await asyncio.to_thread(tracing.shutdown)  # what is still buffered goes out
