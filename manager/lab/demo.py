"""`make demo`: a lab with relayd and two transceivers, one real WebRTC call
through the XDP relay, the figures that show where its packets went, and
a check that nothing is left behind."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyroute2 import netns

from manager.lab.client import client_call
from manager.lab.host_proxy import LocalProxy
from manager.lab.lifecycle import lab_down, lab_up
from manager.lab.model import SIGNALING_PORT
from manager.lab.netns import NetnsExecutor
from manager.lab.services import Services, lab_pin_dir
from manager.relay.config import DatapathConfig
from manager.relay.kernel.datapath import Datapath


def _slow_samples(svc) -> dict[str, float]:
    out: dict[str, float] = {}
    for (name, labels), v in svc.metrics().items():
        lab_ = dict(labels)
        if name == "splitrelay_slowpath_packets_total":
            out["packets_" + lab_["direction"]] = v
        elif name == "splitrelay_slowpath_events_total":
            out[lab_["event"]] = v
        elif name in ("splitrelay_flow_setup_seconds_sum", "splitrelay_flow_setup_seconds_count"):
            out[name.rsplit("_", 1)[1]] = v
    return out


def _check_host_path(proxy: LocalProxy) -> dict:
    """What a browser on this machine would do, done by aiortc from this
    machine's own namespace: fetch the page and place a call through it."""
    out: dict[str, Any] = {"url": proxy.url + "/"}
    try:
        with urllib.request.urlopen(proxy.url + "/", timeout=5) as r:
            out["page"] = "<title>splitrelay: talk to the agent</title>" in r.read().decode()
    except OSError as exc:
        out["page"], out["error"] = False, str(exc)
        return out
    rep = asyncio.run(client_call(proxy.url, duration=1.5, messages=2))
    out["call"] = bool(rep.connected and rep.error is None and rep.dc_echoed == rep.dc_sent)
    out["call_error"] = rep.error
    return out


def run_demo(duration: float, say: Callable[[str], None], hold: Callable[[str], None] | None = None) -> dict:
    """Lab + relayd + 2 transceivers, one real call, numbers; all torn down.
    The lab is connected to this machine and the page served on its loopback;
    `hold(url)` (if given) runs before the tear-down, while a browser here can
    talk to the agent."""
    prefix = f"demo{secrets.token_hex(2)}"
    result: dict[str, Any] = {"prefix": prefix}
    lab_ = svc = dp = proxy = None
    workdir = Path(tempfile.mkdtemp(prefix=f"splitrelay-{prefix}-"))
    try:
        say(f"creating lab {prefix}: client, relay and 2 transceiver namespaces")
        lab_ = lab_up(prefix, 2, host_link=True)
        svc = Services(lab_, workdir)
        say("starting relayd (loads XDP on the relay's veths) and 2 transceivers")
        t0 = time.monotonic()
        svc.start()
        result["services_up_s"] = round(time.monotonic() - t0, 3)
        dp = Datapath(DatapathConfig(**svc.config["datapath"]))
        dp.open_maps()
        fast0, slow0 = dp.counters(), _slow_samples(svc)
        say(f"placing a {duration:g} s call from the client namespace to {lab_.signaling_url}")
        with NetnsExecutor(lab_.client_ns) as ex:
            rep = ex.call(asyncio.run, client_call(lab_.signaling_url, duration=duration,
                                                   messages=max(1, int(duration * 2.5))))
        fast1, slow1 = dp.counters(), _slow_samples(svc)
        fast = {k: fast1[k][0] - fast0.get(k, (0, 0))[0] for k in fast1}
        slow = {k: slow1.get(k, 0) - slow0.get(k, 0) for k in slow1}
        result["call"] = rep.to_dict()
        fwd = sum(v for k, v in fast.items() if k.startswith("fwd_"))
        sp = int(slow.get("packets_in", 0) + slow.get("packets_out", 0))
        result["fastpath"] = {"forwarded": fwd, "by_reason": {k: v for k, v in fast.items() if v}}
        result["slowpath"] = {"packets": sp, "flows_installed": int(slow.get("flows_installed", 0)),
                              "setup_ms_mean": round(slow["sum"] / slow["count"] * 1000, 3)
                              if slow.get("count") else None}
        result["fast_share"] = round(fwd / (fwd + sp), 4) if fwd + sp else None
        result["tone_detected"] = rep.tone_ratio > 50
        say("serving the page on this machine's loopback; a call from this machine through it")
        proxy = LocalProxy((lab_.vip4, SIGNALING_PORT)).start()
        result["host"] = _check_host_path(proxy)
        result["ok"] = bool(rep.error is None and rep.connected and rep.dc_sent and rep.dc_echoed == rep.dc_sent
                            and result["tone_detected"] and result["host"].get("call"))
        if hold is not None:
            hold(result["host"]["url"])
    finally:
        if proxy is not None:
            proxy.stop()
        say("tearing down")
        if dp is not None:
            dp.close()
        if svc is not None:
            svc.stop(purge=True)
        if lab_ is not None:
            lab_down(lab_)
        shutil.rmtree(workdir, ignore_errors=True)
        # What is left is checked, not assumed.
        left_ns = [n for n in netns.listnetns() if n.startswith(f"{prefix}-")]
        pin_dir = lab_pin_dir(prefix)
        result["left_behind"] = left_ns + ([str(pin_dir)] if pin_dir.exists() else [])
    return result
