"""Hooks into aioice's Connection, reached through aiortc's ICE gatherer and transport."""

from __future__ import annotations

from collections.abc import Callable

from aioice.candidate import Candidate
from aioice.ice import CandidatePair, Connection, StunProtocol
from aiortc.rtcicetransport import RTCIceGatherer, RTCIceTransport

# -- ICE (aioice Connection, reached through aiortc) ---------------------------------------


def ice_connection(gatherer: RTCIceGatherer) -> Connection:
    """The aioice Connection behind a gatherer: aiortc keeps it in `_connection`."""
    return gatherer._connection


def transport_connection(ice: RTCIceTransport) -> Connection:
    """The aioice Connection behind an ICE transport (`RTCIceTransport._connection`)."""
    return ice._connection


def set_local_ufrag(connection: Connection, ufrag: str) -> None:
    """Use `ufrag` as the local ICE ufrag. aioice sets it at construction and
    exposes it read-only (`local_username` reads `_local_username`). aiortc
    creates the Connection in setRemoteDescription and reads the ufrag back
    only in setLocalDescription, so replacing it in between makes aiortc and
    aioice use it for the answer, for checking USERNAMEs and for our checks."""
    connection._local_username = ufrag


def share_host_candidates(
    connection: Connection,
    provider: Callable[[Connection, int], list[tuple[StunProtocol, Candidate]]],
) -> None:
    """Give the Connection host candidates on sockets we own instead of binding
    its own. aioice's gather_candidates() awaits the per-instance
    get_component_candidates(component, addresses, timeout) for host
    candidates and pairs checks over the protocols in `_protocols`; the
    replacement asks `provider(connection, component)` for (protocol,
    candidate) pairs on our sockets and registers each protocol there."""

    async def shared(component: int, addresses: list[str], timeout: int = 5) -> list[Candidate]:
        out = []
        for protocol, candidate in provider(connection, component):
            protocol.local_candidate = candidate
            connection._protocols.append(protocol)
            out.append(candidate)
        return out

    connection.get_component_candidates = shared  # type: ignore[method-assign]


def on_consent_expired(connection: Connection, callback: Callable[[], None]) -> None:
    """Call `callback` when RFC 7675 consent expires. aioice's connect() starts
    `self.query_consent()` as a task; it returns only when consent expired
    (it is cancelled on close), so a per-instance wrapper tells a vanished
    client from a hang-up."""
    original = connection.query_consent

    async def query_consent() -> None:
        await original()
        callback()

    connection.query_consent = query_consent  # type: ignore[method-assign]


def nominated_pair(connection: Connection) -> CandidatePair | None:
    """The nominated pair of component 1 (aiortc uses rtcp-mux: one component).
    aioice keeps it in `_nominated`, with no public accessor."""
    return connection._nominated.get(1)


def repoint_pair(connection: Connection, old: tuple[str, int], new: tuple[str, int]) -> bool:
    """Send the call's media, consent checks and DTLS to `new` instead of
    `old` (the client's path now runs through another relay's flow source).
    aioice sends to its nominated pair's remote candidate and has no way to
    change it: swap the candidate for a copy at the new address. False if the
    nominated pair is not at `old`."""
    pair = connection._nominated.get(1)
    if pair is None or pair.remote_addr != old:
        return False
    c = pair.remote_candidate
    pair.remote_candidate = Candidate(
        foundation=c.foundation, component=c.component, transport=c.transport, priority=c.priority,
        host=new[0], port=new[1], type=c.type, related_address=c.related_address,
        related_port=c.related_port, tcptype=c.tcptype, generation=c.generation)
    return True


def tie_breaker(connection: Connection) -> int:
    """The ICE tie-breaker (RFC 8445 7.3.1.1), aioice's `_tie_breaker`."""
    return connection._tie_breaker
