"""Calls in a lab: run a client call and check that a bystander call is untouched."""

from __future__ import annotations

import asyncio
import contextlib

from manager.lab.client import client_call
from manager.lab.netns import NetnsExecutor
from manager.lab.routing import route_vip, vip_route
from tests.support.waiting import eventually_async


def run_call(lab, **kw):
    with NetnsExecutor(lab.client_ns) as ex:
        return ex.call(asyncio.run, client_call(lab.signaling_url, **kw))


async def rtp_received(pc) -> int:
    """RTP packets the client's peer connection has received so far."""
    stats = await pc.getStats()
    return sum(s.packetsReceived for s in stats.values() if s.type == "inbound-rtp")


async def audio_flowing(pc, packets: int = 25, timeout: float = 10.0) -> int:
    """Until the client has received `packets` RTP packets (the agent's
    echo: audio has made the round trip); returns how many it has."""
    async def received() -> int:
        n = await rtp_received(pc)
        return n if n >= packets else 0

    return await eventually_async(received, timeout, what=f"{packets} RTP packets back at the client")


async def migrate_away(svc, ctl, rep) -> tuple[dict, int, dict]:
    """Move the client's call to the other of two transceivers through relayd's
    control socket: (the call before, the target, the migration's result)."""
    call = await asyncio.to_thread(svc.call, rep.call_url.rsplit("/", 1)[1])
    target = 2 if call["transceiver_id"] == 1 else 1
    res = await asyncio.to_thread(ctl.request, "POST", f"/sessions/{call['call_id']}/migrate", {"to": target})
    return call, target, res


def kernel_ssrc(svc, relay: int) -> int:
    """The SSRC relay N's kernel saw on the (one) call's client leg; 0: none yet."""
    return next((leg["kernel"]["ssrc"] for s in svc.control_of(relay).sessions()["sessions"]
                 for leg in s["legs"] if leg["kernel"] and leg["kernel"]["ssrc"]), 0)


def ssrc_indexed(svc, relay: int, ssrc: int) -> bool:
    """Relay N's kernel indexes `ssrc` (learnt from the fleet: its media from
    an unknown tuple reaches relay N's slow path)."""
    dp = svc.open_datapath(relay)
    try:
        return dp.ssrc_flow(bytes(8) + ssrc.to_bytes(4, "big")) is not None
    finally:
        dp.close()


async def ssrc_published(svc, to: int = 2) -> int:
    """Until relay 1 has published the call's SSRC and relay `to` indexed it."""
    ssrc = await eventually_async(lambda: asyncio.to_thread(kernel_ssrc, svc, 1), 10,
                                  what="relay 1's kernel to see the call's SSRC")
    await eventually_async(lambda: asyncio.to_thread(ssrc_indexed, svc, to, ssrc), 10,
                           what=f"relay {to} to index SSRC {ssrc:#x} from the fleet")
    return ssrc


def assert_untouched(rep) -> None:
    """No renegotiation, no ICE restart, never left connected."""
    assert rep.error is None, rep.error
    assert rep.connection_states == ["connecting", "connected", "closed"], rep.connection_states
    first_done = min(i for i, s in enumerate(rep.ice_states) if s in ("completed", "connected"))
    assert all(s in ("completed", "connected") for s in rep.ice_states[first_done:-1]), rep.ice_states
    assert rep.signaling_states == ["have-local-offer", "stable", "closed"], rep.signaling_states


@contextlib.contextmanager
def vip_at_relay_1(lab):
    """A fleet lab's test starts, and leaves, with the VIP routed to relay 1."""
    route_vip(lab, 1)
    assert vip_route(lab) == 1
    try:
        yield
    finally:
        route_vip(lab, 1)
