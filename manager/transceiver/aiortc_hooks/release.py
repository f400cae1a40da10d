"""aiortc's objects of a call, let go by reference counting once it is closed.

A peer connection is a web of reference cycles: the connection and its
transceivers, senders and receivers point at each other, the DTLS
transport's router at the receivers, every event emitter at listener
closures that name their emitter, the ICE connection at its protocols and
back. Closing it breaks none of them, so each call aiortc set up leaves a
few hundred objects (about 450) that only the cyclic collector frees, and
the collector's passes, each a pause every call waits through, grow with
the calls. :func:`release_peer_connection` empties the instance
dictionaries of that call's own aiortc and aioice objects (never a shared
one: the codecs' parameters, the certificate's class, the shared socket's
objects are not in :data:`PER_CALL`), after their tasks ended, so every one
of them is freed by reference counting as soon as its last holder lets go.
Only pyOpenSSL's verification helper (below) is reached by name.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import types

from aioice.ice import Connection, StunProtocol
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtcdatachannel import RTCDataChannel
from aiortc.rtcdtlstransport import RTCDtlsTransport, RtpRouter
from aiortc.rtcicetransport import RTCIceGatherer, RTCIceTransport
from aiortc.rtcpeerconnection import RTCPeerConnection
from aiortc.rtcrtpreceiver import RemoteStreamTrack, RTCRtpReceiver, TimestampMapper
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.rtcrtptransceiver import RTCRtpTransceiver
from aiortc.rtcsctptransport import RTCSctpTransport

#: The classes whose instances belong to one peer connection alone.
PER_CALL: tuple[type, ...] = (
    RTCPeerConnection, RTCRtpTransceiver, RTCRtpSender, RTCRtpReceiver, RemoteStreamTrack, TimestampMapper,
    JitterBuffer, RTCDtlsTransport, RtpRouter, RTCIceTransport, RTCIceGatherer, Connection, StunProtocol,
    RTCSctpTransport, RTCDataChannel,
)
#: Containers walked through (what a per-call object holds its parts in).
_CONTAINERS = (dict, list, tuple, set, frozenset, collections.deque, types.MethodType, types.CellType)
#: Seconds a closed call's own tasks get to finish (they were cancelled by close()).
TASKS_TIMEOUT = 5.0


def per_call_objects(pc: RTCPeerConnection) -> tuple[list[object], list[asyncio.Future]]:
    """The per-call aiortc/aioice objects reachable from `pc` through their
    attributes, containers, bound methods and closures, and the tasks and
    futures they hold. Nothing else is entered: not our own objects (the
    shared socket, the agent), not modules or classes."""
    found: dict[int, object] = {}
    futures: dict[int, asyncio.Future] = {}
    seen: set[int] = set()
    todo: list[object] = [pc]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, asyncio.Future):
            futures[id(obj)] = obj
            continue
        if isinstance(obj, PER_CALL):
            found[id(obj)] = obj
            todo.append(vars(obj))
        elif isinstance(obj, types.FunctionType):
            todo.extend(obj.__closure__ or ())
        elif isinstance(obj, _CONTAINERS):
            todo.extend(gc.get_referents(obj))
    return list(found.values()), list(futures.values())


async def release_peer_connection(pc: RTCPeerConnection) -> int:
    """Let a closed peer connection's objects go by reference counting: wait
    (at most TASKS_TIMEOUT) for the tasks they hold, then empty their
    instance dictionaries. Returns how many objects were emptied. Call it
    only once nothing will use `pc` or its parts again."""
    objects, futures = per_call_objects(pc)
    pending = [f for f in futures if not f.done()]
    if pending:
        await asyncio.wait(pending, timeout=TASKS_TIMEOUT)
    for obj in objects:
        if isinstance(obj, RTCDtlsTransport):
            _release_verify_helper(obj)
        vars(obj).clear()
    return len(objects)


def _release_verify_helper(dtls: RTCDtlsTransport) -> None:
    """pyOpenSSL's certificate-verification helper (`_ssl._verify_helper`,
    set by the `set_verify` of aiortc's context) holds a C callback whose
    closure holds the helper: a cycle of its own. Emptied once the
    connection is closed (nothing verifies a certificate any more), the
    connection and context free it by reference counting."""
    ssl = dtls._ssl
    helper = getattr(ssl, "_verify_helper", None) if ssl is not None else None
    if helper is not None:
        vars(helper).clear()
