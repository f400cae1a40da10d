"""The relay's slow path: the userspace side of the public port (core.py has
the overview). One concept per module:

    legs.py          a client tuple of a call (Leg), the callables it is given
    flow_sources.py  the (pool address, port) sources a leg sends from
    admission.py     a new tuple's first packet: admitted or refused
    core.py          SlowPath: sockets, packets both ways, installing flows
    stream_legs.py   ICE-TCP connections as stream legs
    failover.py      the fleet: publishing legs, taking over, ownership moves
    rebinding.py     NAT rebinding: a leg's media from a new tuple
    expiry.py        pending legs, idle flows, evicted legs, the housekeeper
"""

from manager.relay.slowpath.core import PUBLIC_RCVBUF, SlowPath, _udp_socket
from manager.relay.slowpath.expiry import public_queue_bytes
from manager.relay.slowpath.flow_sources import FlowSources
from manager.relay.slowpath.legs import MAX_REBIND_CHECKS, Leg, LegDirectory

__all__ = ["MAX_REBIND_CHECKS", "PUBLIC_RCVBUF", "FlowSources", "Leg", "LegDirectory", "SlowPath", "_udp_socket",
           "public_queue_bytes"]
