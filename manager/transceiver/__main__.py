"""``python -m manager.transceiver``: thin CLI over :func:`manager.transceiver.service.run`."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from manager import pki
from manager.observability.logs import FORMATS
from manager.observability.logs import configure as configure_logs
from manager.observability.tracing import check_endpoint

from . import runtime
from .agent_loader import AgentSpecError, load_agent_factory
from .opus import DEFAULT_COMPLEXITY
from .service import TransceiverConfig, run


def parse_hostport(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not host:port (use [addr]:port for IPv6)")
    return host, int(port)


def parse_ip(value: str) -> str:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an IP address") from None
    if ip.is_unspecified:
        raise argparse.ArgumentTypeError(
            f"{value} is unspecified; the ICE socket needs a concrete address"
        )
    return str(ip)


def positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return int(value)


def seconds(value: str) -> float:
    try:
        s = float(value)
    except ValueError:
        s = -1.0
    if not 0 <= s <= 3600:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds in 0..3600")
    return s


def transceiver_id(value: str) -> int:
    # The routing hint in the ufrag carries the id in 16 bits.
    if not value.isdigit() or not 1 <= int(value) <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"{value!r} is not a transceiver id in 1..65535")
    return int(value)


def otlp_endpoint(value: str) -> str:
    try:
        return check_endpoint(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m manager.transceiver",
        description="splitrelay transceiver: WebRTC endpoint + agent behind the relay",
    )
    p.add_argument(
        "--id",
        type=transceiver_id,
        required=True,
        help="transceiver id registered with the relay (1..65535)",
    )
    p.add_argument(
        "--listen",
        type=parse_hostport,
        default=("127.0.0.1", 8700),
        help="control API host:port (default 127.0.0.1:8700)",
    )
    p.add_argument(
        "--relay-url",
        action="append",
        default=None,
        help="relayd's internal listener, e.g. https://10.10.0.1:8443; repeat for every relay of a fleet "
             "(registers and heartbeats with each; omit: do not register)",
    )
    p.add_argument(
        "--pki-dir",
        type=Path,
        required=True,
        help="directory with ca.pem and transceiver-<id>.pem/.key (from `relayctl pki issue`): "
             "mutual TLS with relayd both ways",
    )
    p.add_argument(
        "--hint-key-file",
        type=Path,
        default=None,
        help="file (mode 0600) with the relay's hex routing-hint key; or set SPLITRELAY_HINT_KEY",
    )
    p.add_argument("--capacity", type=positive_int, default=100, help="maximum simultaneous calls")
    p.add_argument(
        "--bind",
        type=parse_ip,
        action="append",
        default=None,
        metavar="ADDR",
        help="address of the shared ICE socket; repeat for IPv4 + IPv6 (default 127.0.0.1)",
    )
    p.add_argument(
        "--ice-port",
        type=int,
        default=0,
        help="UDP port of the shared ICE socket(s) (default: ephemeral)",
    )
    p.add_argument(
        "--control-url",
        default=None,
        help="control URL advertised to the relay (default: http://<listen>)",
    )
    p.add_argument("--otlp-endpoint", type=otlp_endpoint, default=None, metavar="URL",
                   help="send traces by OTLP/HTTP to URL, e.g. http://collector:4318 (default: no traces)")
    p.add_argument("--agent", default=None, metavar="SPEC",
                   help="the agent for each call: MODULE:ATTR or FILE.py:ATTR (default: the echo agent)")
    p.add_argument(
        "--media-engine",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="hand each call to the media engine after its handshake (the default; docs/media-engine.md); "
             "--no-media-engine keeps placed calls on aiortc",
    )
    p.add_argument(
        "--aiortc-audio-buffer",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="calls on aiortc: keep its audio jitter buffer (holds 4 frames, 80 ms, before the agent hears "
             "them); default: each frame goes to the agent as it arrives",
    )
    p.add_argument("--opus-complexity", type=int, choices=range(11), default=DEFAULT_COMPLEXITY, metavar="0-10",
                   help=f"the media engine's Opus encoder complexity (default {DEFAULT_COMPLEXITY})")
    p.add_argument("--drain-deadline", type=seconds, default=25.0, metavar="SECONDS",
                   help="on SIGTERM, time for the relay to move every call to another transceiver before the "
                        "rest end with reason drain-deadline (default 25; 0: end them at once)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-format", default=os.environ.get("SPLITRELAY_LOG_FORMAT", "text"), choices=list(FORMATS),
                   help="text, or json: one object a line with call_id/conn_id where a line concerns a call")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logs(f"transceiver-{args.id}", args.log_format, args.log_level)
    if args.log_level != "DEBUG":
        # aioice/aiortc log every check at INFO: too chatty for many calls.
        logging.getLogger("aioice").setLevel(logging.WARNING)
    try:
        agent_factory = load_agent_factory(args.agent)
    except AgentSpecError as exc:
        print(f"transceiver: {exc}", file=sys.stderr)
        return 2
    try:
        hint_key = pki.read_hint_key(args.hint_key_file, dict(os.environ))
    except ValueError as exc:
        print(f"transceiver: {exc}", file=sys.stderr)
        return 2
    config = TransceiverConfig(
        id=args.id,
        agent_factory=agent_factory,
        listen_host=args.listen[0],
        listen_port=args.listen[1],
        relay_urls=args.relay_url or [],
        capacity=args.capacity,
        bind_addrs=args.bind or ["127.0.0.1"],
        ice_port=args.ice_port,
        control_url=args.control_url,
        pki_dir=args.pki_dir,
        hint_key=hint_key,
        media_engine=args.media_engine,
        aiortc_audio_buffer=args.aiortc_audio_buffer,
        opus_complexity=args.opus_complexity,
        otlp_endpoint=args.otlp_endpoint,
        drain_deadline=args.drain_deadline,
        tune_gc=True,
    )
    try:
        runtime.run(run(config))
    except (OSError, ValueError, pki.PkiError) as exc:
        print(f"transceiver: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
