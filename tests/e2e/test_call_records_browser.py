"""A Chromium call's record locates its loss on the right hop.

Chromium (relayd's page, a looped tone as its microphone) calls the echo
agent through the lab (relayd with XDP, one transceiver) while nftables drops
the client's RTP at random on both hops of the uplink:

- 3 % in the client's namespace, as it leaves its interface for the VIP
  (client → relay; the netdev egress hook: a drop in the output hook fails
  the send with EPERM, and Chromium sends the packet again, so the relay saw
  no gap where nftables counted a drop);
- 1 % in the transceiver's namespace, as it enters its interface from the
  relay (relay → transceiver: XDP forwards it past the relay's netfilter).

Each rule counts what it saw and what it dropped. The record has the
client → relay loss from the kernel's per-flow sequence accounting, the whole
path's from the transceiver's RTCP figures, and puts the rest of the path's
loss on the relay → transceiver hop (manager/relay/record_build.py): each
hop's loss in the record is held to within 1 percentage point of what its
rule dropped of what it saw. The record has the path's round-trip time, from
Chromium's receiver reports citing the media engine's sender reports.

nftables' ``numgen random`` is the same random drop as iptables' ``statistic``
match (nftables is installed for the NAT tests; iptables has no egress hook).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import pytest

from manager.lab.netns import NetnsExecutor
from manager.lab.services import running_lab
from manager.relay.call_records import read_file
from tests.support.chromium import Chromium
from tests.support.interop_clients import BrowserClient
from tests.support.waiting import eventually, eventually_async

# realtime: the call runs against the wall clock.
pytestmark = [pytest.mark.netns, pytest.mark.realtime, pytest.mark.browser]

LOSS_TABLE = "splitrelay_test_loss"
CLIENT_DROP = 30  # per mille of the client's RTP dropped on its way to the relay
RELAY_DROP = 10  # per mille of the relay's RTP dropped on its way into the transceiver
PACKETS = 900  # RTP packets the transceiver's rule sees before the call ends: ~18 s of audio at 50 pps

# RTP (version 2, a dynamic payload type: the Opus; RTCP's types are 200-207) of
# the UDP a rule's `match` names.
RTP = "@th,64,2 2 @th,73,7 96-127"


def drop_rtp(lab, ns: str, hook: str, match: str, per_mille: int) -> None:
    """Count the RTP `match` selects at the `hook` ("ingress" or "egress") of
    namespace `ns`'s eth0, and drop that share of it."""
    ruleset = f"""table netdev {LOSS_TABLE} {{
  chain {hook} {{
    type filter hook {hook} device "eth0" priority 0; policy accept;
    {match} {RTP} counter
    {match} {RTP} numgen random mod 1000 < {per_mille} counter drop
  }}
}}
"""
    lab.run(ns, ["nft", "-f", "-"], input=ruleset)


def counted(lab, ns: str) -> tuple[int, int]:
    """(packets seen, packets dropped) by the rules of `drop_rtp` in `ns`."""
    out = json.loads(lab.run(ns, ["nft", "-j", "list", "table", "netdev", LOSS_TABLE]).stdout)
    seen, dropped = (next(e["counter"]["packets"] for e in x["rule"]["expr"] if "counter" in e)
                     for x in out["nftables"] if "rule" in x)
    return seen, dropped


async def chromium_call(lab, url: str, tx_ns: str) -> None:
    """A Chromium call (run on the client namespace's thread) that lasts until the
    transceiver's rule has seen PACKETS of its RTP, then hangs up."""
    client = BrowserClient(Chromium(lab.client_ns, f"{url}/?messages=3", origin=url))
    await client.start()
    try:
        async def connected() -> bool:
            r = await client.status()
            assert r.error is None, r.error
            return r.connected and r.dc_echoed >= 1
        await eventually_async(connected, 30, what="Chromium connected with its pings echoed")
        await eventually_async(lambda: counted(lab, tx_ns)[0] >= PACKETS, 40,
                               what=f"{PACKETS} RTP packets at the transceiver")
    finally:
        await client.stop()  # the page hangs up: DELETE of the call, the record is written


def test_loss_on_each_hop_is_located_in_the_record(tmp_path: Path) -> None:
    with running_lab(f"cb{secrets.token_hex(3)}", tmp_path, transceivers=1) as (lab, svc):
        records = Path(svc.config["records"]["path"])
        tx_ns = lab.transceivers[0].ns
        assert lab.client.ifname == lab.transceivers[0].ifname == "eth0"
        drop_rtp(lab, lab.client_ns, "egress", f"udp dport {lab.port}", CLIENT_DROP)
        drop_rtp(lab, tx_ns, "ingress", "meta l4proto udp", RELAY_DROP)
        with NetnsExecutor(lab.client_ns) as ex:
            ex.call(asyncio.run, chromium_call(lab, lab.signaling_url, tx_ns))
        (rec,) = eventually(lambda: list(read_file(records)), 20, what="the call's record")
        sent, lost_client = counted(lab, lab.client_ns)
        arrived, lost_relay = counted(lab, tx_ns)
        client_hop, relay_hop = lost_client / sent, lost_relay / arrived
        path = 1 - (1 - client_hop) * (1 - relay_hop)
        print(f"\nclient → relay: RTP {sent}, dropped {lost_client} ({client_hop:.2%}); "
              f"relay → transceiver: RTP {arrived}, dropped {lost_relay} ({relay_hop:.2%}); "
              f"path {path:.2%}\n"
              f"record: client_relay uplink {rec.client_relay.uplink}\n"
              f"        relay_transceiver uplink {rec.relay_transceiver.uplink}\n"
              f"        path uplink {rec.path.uplink}; RTT {rec.path.rtt_ms} ms; MOS {rec.mos}")
        assert rec.end_reason == "client-hangup"
        # Nothing else lost them (a few may be in flight, or sent after the flow was removed, at the hang-up).
        assert 0 <= sent - lost_client - arrived <= 10, (sent, lost_client, arrived)
        assert 0.01 < client_hop < 0.06 and 0 < relay_hop < 0.03  # what nftables did
        assert abs(rec.client_relay.uplink.loss_fraction - client_hop) <= 0.01, rec.client_relay.uplink
        assert abs(rec.relay_transceiver.uplink.loss_fraction - relay_hop) <= 0.01, rec.relay_transceiver.uplink
        assert abs(rec.path.uplink.loss_fraction - path) <= 0.01, rec.path.uplink
        # The call ran on the media engine: Chromium's reports cite its sender reports.
        assert rec.path.rtt_ms is not None and 0 < rec.path.rtt_ms < 500, rec.path
