"""A client tuple of a call as the slow path holds it (a leg), and the
callables and fleet view the slow path is given."""

from __future__ import annotations

import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from manager.protocol.addresses import family_of
from manager.relay.kernel.structs import flow_key
from manager.relay.slowpath.stream_media import StreamMedia

MAX_PENDING_TXIDS = 32
# Packets of one leg's client held for the owner to authenticate at once (a
# NAT rebinding): the first one proves it; the rest only wait for the answer.
MAX_REBIND_CHECKS = 4

# The owner's check of a held packet: (connection id, SRTP packet) → authentic?
Addr = tuple[str, int]
# (conn_id, packet, path): does the owner take this packet as the call's media?
# With path = (old source, new source) it also re-points the call's replies.
MediaCheck = Callable[..., Awaitable[bool]]
Repoint = Callable[[int, Addr | None, Addr], Awaitable[bool]]


class LegDirectory(Protocol):
    """The fleet's view of client tuples (manager.relay.fleet.RedisFleet)."""

    def publish_leg(self, conn_id: int, client: Addr, vip: Addr, source: Addr, ssrc: int = 0) -> None: ...
    def withdraw_leg(self, conn_id: int, client: Addr, vip: Addr) -> None: ...
    def remote_leg(self, client: Addr, vip: Addr): ...
    def others_serve(self, conn_id: int) -> bool: ...
    def replaced(self, client: Addr, vip: Addr, relay: str) -> None: ...


@dataclass
class Leg:
    """One client tuple of a call, as seen on the public address."""

    client: tuple[str, int]
    vip: tuple[str, int]
    conn_id: int
    flow_port: int
    flow_addr: int = 0  # index into the family's pool of internal addresses
    first_seen: float = field(default_factory=time.monotonic)
    installed_at: float | None = None
    # When the housekeeper first found the kernel without this installed
    # tuple (evicted from the LRU); None while the kernel holds it.
    missing_since: float | None = None
    # Binding request transaction ids forwarded to the owner for this tuple.
    txids: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    # Media checks of a new client tuple under way (NAT rebinding).
    rebind_checks: int = 0
    ssrc: int = 0  # first RTP SSRC the kernel saw, once published to the fleet
    # A stream leg (ICE-TCP): how the owner's packets reach the client, and how
    # the slow path closes the connection (call ended, never authenticated).
    stream: Callable[[bytes], None] | None = None
    close_stream: Callable[[str], None] | None = None
    # The relay ⇄ transceiver round trip of the check that installed the leg.
    owner_rtt_ms: float | None = None
    # A stream leg's media counts (the bridge carries it, not XDP).
    media: StreamMedia | None = None
    last_seen: float = field(default_factory=time.monotonic)
    # When the slow path last put this tuple into the kernel again (evicted,
    # rebound): an expiry walk begun before then judged an older entry.
    reinstalled_at: float = 0.0
    # The flows-map key of (client, vip), kept until either changes (a rebinding).
    _key_for: tuple | None = field(default=None, repr=False, compare=False)
    _key_bytes: bytes = field(default=b"", repr=False, compare=False)

    @property
    def kernel_key(self) -> bytes:
        """This tuple's flows-map key, as the housekeeper's walk reports it."""
        tup = (self.client, self.vip)
        if self._key_for != tup:
            self._key_bytes, self._key_for = bytes(flow_key(*tup)), tup
        return self._key_bytes

    @property
    def family(self) -> int:
        return family_of(self.client[0])

    @property
    def source(self) -> tuple[int, int]:
        """The flow source as the datapath takes it: (flow port, pool index)."""
        return self.flow_port, self.flow_addr

    @property
    def transport(self) -> str:
        return "udp" if self.stream is None else "tcp"

    def to_dict(self) -> dict:
        return {"client": list(self.client), "vip": list(self.vip), "transport": self.transport,
                "conn_id": self.conn_id,
                "flow_port": self.flow_port, "flow_addr": self.flow_addr, "installed": self.installed_at is not None,
                "setup_ms": round((self.installed_at - self.first_seen) * 1000, 3) if self.installed_at else None}

