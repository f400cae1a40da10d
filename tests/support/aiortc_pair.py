"""Two aiortc peers connected over loopback."""

from __future__ import annotations

import asyncio
import inspect

from aiortc import RTCConfiguration, RTCPeerConnection

from tests.support.waiting import eventually_async


async def _established(inspect_them):
    """Two aiortc peers with an open data channel: `inspect_them(answerer's
    RTCSctpTransport, its channel)` runs while they are connected."""
    a, b = RTCPeerConnection(RTCConfiguration(iceServers=[])), RTCPeerConnection(RTCConfiguration(iceServers=[]))
    opened: asyncio.Queue = asyncio.Queue()
    b.on("datachannel", opened.put_nowait)
    try:
        channel = a.createDataChannel("chat")
        await a.setLocalDescription(await a.createOffer())
        await b.setRemoteDescription(a.localDescription)
        await b.setLocalDescription(await b.createAnswer())
        await a.setRemoteDescription(b.localDescription)
        theirs = await asyncio.wait_for(opened.get(), 10)
        await eventually_async(lambda: channel.readyState == "open", 10, what="the offerer's channel open")
        result = inspect_them(b.sctp, theirs)
        return await result if inspect.isawaitable(result) else result
    finally:
        await a.close()
        await b.close()
