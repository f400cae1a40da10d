"""Upgrades that drop nothing: the previous release's relayd (its own code
and BPF program, from git) serves a call and an established kernel flow;
mid-call it is stopped, a relayd that does not know the pinned layout is
refused and leaves the old fast path forwarding, then this relayd takes
over across the real layout change (per-flow media accounting added) and
the UDP stream of 1,000 packets/s each way and the call lose nothing."""

from __future__ import annotations

import asyncio
import ctypes
import secrets
import signal
import socket
import time
from pathlib import Path

import pytest

from manager.lab.client import client_call
from manager.lab.lifecycle import lab as lab_ctx
from manager.lab.netns import NetnsExecutor
from manager.lab.services import Services
from manager.relay.config import DatapathConfig
from manager.relay.kernel import libbpf
from manager.relay.kernel.datapath import Datapath
from manager.relay.kernel.layouts import V1
from tests.support import previous_release
from tests.support.lab_calls import audio_flowing
from tests.support.udp_streams import TwoWayStream
from tests.support.waiting import eventually

# realtime: the checks count media against the wall clock.
pytestmark = [pytest.mark.netns, pytest.mark.realtime]

RATE = 1000
SECONDS = 12.0
UNKNOWN_LAYOUT = 0x0123456789ABCDEF


def _xdp_prog_id(lab, ifname: str) -> int | None:
    import json
    import subprocess
    out = subprocess.run(["ip", "-j", "-n", lab.relay_ns, "link", "show", "dev", ifname],
                         capture_output=True, text=True, check=True).stdout
    return (json.loads(out)[0].get("xdp") or {}).get("prog", {}).get("id")


def _set_layout(pin_dir: Path, value: int) -> None:
    with libbpf.PinnedMap(str(pin_dir / "layout"), ctypes.c_uint32, ctypes.c_uint64) as m:
        m.update(ctypes.c_uint32(0), ctypes.c_uint64(value))


def test_upgrade_across_a_layout_change_mid_call_loses_nothing(tmp_path):
    tree = previous_release.extract("v1", tmp_path / "release")
    with lab_ctx(prefix=f"up{secrets.token_hex(3)}") as lab:
        svc = Services(lab, workdir=tmp_path, relayd_env=previous_release.env(tree),
                       relayd_config=previous_release.config_for(tree))
        dp = None
        try:
            svc.start()  # the previous release's relayd, this checkout's transceivers
            cfg = svc.config["datapath"]
            pin_dir = Path(cfg["pin_dir"])
            tx2 = lab.transceivers[1]
            client, owner, flow_port = (lab.client.addr4, 41000), (tx2.addr4, 7000), 29999
            # An established media flow, installed by the release's own code.
            previous_release.install(tree, cfg, [{"conn_id": 0x51, "owner": {"addr4": owner[0], "port4": owner[1]},
                                                  "client": list(client), "vip": list(lab.vip()),
                                                  "flow_port": flow_port}], ns=lab.relay_ns)
            old_prog = _xdp_prog_id(lab, "pub0")
            c_sock = lab.socket("client", socket.AF_INET, bind=client)
            t_sock = lab.socket(tx2.ns, socket.AF_INET, bind=owner)
            n = int(RATE * SECONDS)
            stream = TwoWayStream(lab, (lab.client_ns, tx2.ns, lab.relay_ns), c_sock, t_sock, lab.vip(),
                                  (lab.internal4, flow_port), n, RATE)
            info: dict = {}

            async def upgrade(pc, rep):
                await audio_flowing(pc)
                info["t"] = time.monotonic()
                info["rc_old"] = await asyncio.to_thread(svc.stop_one, "relayd", signal.SIGTERM)
                svc.relayd_env = None  # from here on, this checkout's relayd
                # A relayd that cannot convert the pinned layout is refused; the old program forwards on.
                await asyncio.to_thread(_set_layout, pin_dir, UNKNOWN_LAYOUT)
                refused = svc.start_relayd()
                info["rc_refused"] = await asyncio.to_thread(refused.wait, 60)
                svc.procs.pop("relayd")
                info["prog_after_refusal"] = _xdp_prog_id(lab, "pub0")
                info["refusal_log"] = svc.log_path("relayd").read_text()
                # The pins as the release left them: this relayd takes over.
                await asyncio.to_thread(_set_layout, pin_dir, V1.hash)
                await asyncio.to_thread(svc.start_relayd)
                await asyncio.to_thread(svc.wait_signaling, 60)
                info["down_s"] = time.monotonic() - info["t"]

            stream.start()
            with NetnsExecutor(lab.client_ns) as ex:
                call = ex.call(asyncio.run, client_call(lab.signaling_url, duration=8.0, messages=10,
                                                         on_connected=upgrade))
            lost_up, lost_down = stream.finish()
            sockets, links = stream.drops()

            assert info.get("rc_old") == 0
            assert info["rc_refused"] not in (0, None)
            assert "which this relayd cannot convert" in info["refusal_log"]
            assert "Traceback" not in info["refusal_log"]
            assert info["prog_after_refusal"] == old_prog  # the old relay kept forwarding
            print(f"\nold relayd stopped to new relayd serving: {info['down_s']:.2f} s; UDP stream {n} packets each "
                  f"way, lost {lost_up} up / {lost_down} down; call: RTP sent {call.rtp_packets_sent}, received "
                  f"{call.rtp_packets_received}, lost {call.rtp_packets_lost}, data channel "
                  f"{call.dc_echoed}/{call.dc_sent}; UDP {sockets}; links {links}")
            dp = Datapath(DatapathConfig(**cfg))
            dp.open_maps()
            # The converted stats carry the old program's counts: what was not a forward, old and new.
            xdp = {k: v[0] for k, v in dp.counters().items() if v[0] and not k.startswith("fwd_")}
            assert lost_up == 0 and lost_down == 0, f"XDP other than forwards {xdp}; UDP {sockets}; links {links}"
            assert call.error is None, call.error
            assert "failed" not in call.connection_states and "disconnected" not in call.connection_states
            assert call.rtp_packets_lost == 0
            assert call.dc_echoed == call.dc_sent == 10

            # The new program runs, through the same pinned link, on the converted maps.
            log = svc.log_path("relayd").read_text()
            assert "took over the fast path from map layout v1 to v2" in log
            assert _xdp_prog_id(lab, "pub0") not in (None, old_prog)
            media = dp.flow_media(client, lab.vip())
            assert media is not None and media.up.received > 0 and media.down.received > 0
            assert media.up.packets >= n - media.up.received  # counts carried over, then counted on
            svc.wait_transceivers(2, 15)
            with NetnsExecutor(lab.client_ns) as ex:
                after = ex.call(asyncio.run, client_call(lab.signaling_url, duration=1.0, messages=3))
            assert after.error is None and after.connected and after.dc_echoed == 3
            eventually(lambda: not (pin_dir.parent / f"{pin_dir.name}_next").exists(), 1, what="staging gone")
            c_sock.close()
            t_sock.close()
        finally:
            if dp is not None:
                dp.close()
            svc.stop()
