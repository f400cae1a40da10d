"""The "python" row of bench_peers: relayd's own slow path, in a process of its own.

    nsenter --net=/run/netns/NS python -m tests.bench.peers_slowpath --vip 10.10.1.1:3480 \
        --owner 10.10.2.2:5000 --pool 10.10.0.1

This is manager.relay.slowpath.SlowPath, the code relayd runs for every packet
XDP passes up, with its real flow sockets (the sk_lookup program and the raw
sender): an in-memory registry holds one active call owned by --owner. A
client's first STUN check naming the call's server ufrag opens a leg; every
later packet from that client tuple is forwarded to the owner by
SlowPath.on_client_packet → _to_owner (the leg stays unauthenticated because
the owner never answers, and the slow path forwards it all the same, which
is what relayd does with a leg's packets until its owner's answer hands the
flow to XDP). No datapath: relayd's no-XDP mode, so nothing but Python
forwards.

Prints one JSON line when ready ({"ready": true, "ufrag": …, "pid": …}), then
answers "stats" on stdin with a JSON line of the slow path's counters; "quit"
or end of input stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from manager.protocol.addresses import OwnerAddr
from manager.protocol.ufrag import encode_ufrag
from manager.relay.config import DatapathConfig
from manager.relay.kernel.flow_sockets import FlowSockets
from manager.relay.registry import Registry
from manager.relay.slowpath import SlowPath

HINT_KEY = bytes(range(32))


def _hostport(s: str) -> tuple[str, int]:
    host, port = s.rsplit(":", 1)
    return host, int(port)


async def serve(vip: tuple[str, int], owner: tuple[str, int], pool: str, ports: tuple[int, int]) -> None:
    registry = Registry(heartbeat_timeout=1e9)
    registry.register_transceiver(1, "http://127.0.0.1:1", 10)
    conn = registry.allocate_conn_id()
    ufrag = encode_ufrag(HINT_KEY, 1, conn)
    registry.add_call(conn_id=conn, transceiver_id=1, client_ufrag="cli1", server_ufrag=ufrag)
    registry.activate(conn, OwnerAddr(addr4=owner[0], port4=owner[1]))
    fs = FlowSockets(DatapathConfig(internal_addr4=pool, internal_addr_count=1,
                                    flow_port_min=ports[0], flow_port_max=ports[1]))
    fs.open()
    # Legs stay pending (the owner is a counter that never answers): keep them for the run.
    sp = SlowPath(registry, None, fs, hint_key=HINT_KEY, vips=[vip], pending_timeout=3600.0, idle_timeout=3600.0,
                  source_rate=0, budget_rate=0)  # forwarding is measured here, not admission
    await sp.start()
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def command() -> None:
        line = sys.stdin.readline()
        cmd = line.strip()
        if cmd == "stats":
            print(json.dumps(dict(sp.stats)), flush=True)
        elif (not line or cmd == "quit") and not done.done():
            done.set_result(None)

    loop.add_reader(sys.stdin.fileno(), command)
    print(json.dumps({"ready": True, "ufrag": ufrag, "pid": os.getpid()}), flush=True)
    try:
        await done
    finally:
        loop.remove_reader(sys.stdin.fileno())
        await sp.stop()
        fs.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.peers_slowpath", description=__doc__.split("\n\n")[0])
    ap.add_argument("--vip", required=True, help="public address:port the slow path listens on")
    ap.add_argument("--owner", required=True, help="the call's owner address:port")
    ap.add_argument("--pool", required=True, help="internal address flows are sent from")
    ap.add_argument("--ports", default="20000-20099", help="flow port range")
    args = ap.parse_args(argv)
    lo, hi = (int(x) for x in args.ports.split("-"))
    asyncio.run(serve(_hostport(args.vip), _hostport(args.owner), args.pool, (lo, hi)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
