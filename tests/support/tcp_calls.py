"""ICE-TCP calls through a lab: UDP blocked at the client, a relayd restart mid-call."""

from __future__ import annotations

import asyncio
import contextlib
import signal

from manager.lab.client import client_call
from manager.lab.ice_tcp import TcpAdapter
from manager.lab.netns import NetnsExecutor
from manager.lab.services import LAB_TCP_PORT
from tests.support.lab_calls import audio_flowing
from tests.support.waiting import eventually_async

BLOCK_UDP = """
table inet splitrelay_test_block {{
  chain out {{
    type filter hook output priority 0; policy accept;
    ip daddr {vip4} udp dport {port} counter drop
    ip6 daddr {vip6} udp dport {port} counter drop
  }}
}}
"""


@contextlib.contextmanager
def udp_blocked(lab):
    """The client namespace sends no UDP to the VIPs' port: its calls take ICE-TCP."""
    lab.run(lab.client_ns, ["nft", "-f", "-"],
            input=BLOCK_UDP.format(vip4=lab.vip4, vip6=lab.vip6, port=lab.port), check=True)
    try:
        yield
    finally:
        lab.run(lab.client_ns, ["nft", "delete", "table", "inet", "splitrelay_test_block"], check=True)


def restart_during_tcp_call(lab, svc, *, signaling_url=None, timeout: float = 20.0):
    """A TCP call during which relayd (relay 1) restarts; the client's
    adapter opens a new connection, check first, as a browser's active
    candidate does, and the call goes on once that connection carries media
    or the relay closes it too. Returns (report, connections the relay closed)."""
    info = {}

    async def restart(pc, rep):
        await audio_flowing(pc)
        rep.mark("restart")
        info["rc"] = await asyncio.to_thread(svc.stop_one, "relayd", signal.SIGTERM)
        await asyncio.to_thread(svc.start_relayd)
        await asyncio.to_thread(svc.wait_signaling, 30)
        rep.mark("restarted")
        adapter, before = info["adapter"], info["adapter"].frames_in
        # The client's next consent check (~5 s) opens the new connection; it
        # carries the call on, or the relay closes it too (a second one lost).
        await eventually_async(lambda: (adapter.connections_lost >= 1 and adapter.frames_in - before >= 100)
                               or adapter.connections_lost >= 2, timeout,
                               what="the client's new TCP connection to carry 100 frames or be closed")

    async def call():
        adapter = info["adapter"] = await TcpAdapter.start((lab.vip4, LAB_TCP_PORT))
        try:
            rep = await client_call(signaling_url or lab.signaling_url, rewrite_answer=adapter.rewrite_answer,
                                    duration=2.0, messages=4, on_connected=restart)
            return rep, adapter.connections_lost
        finally:
            adapter.close()

    with NetnsExecutor(lab.client_ns) as ex:
        rep, lost = ex.call(asyncio.run, call())
    assert info["rc"] == 0
    return rep, lost
