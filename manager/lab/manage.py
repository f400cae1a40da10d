"""Labs left running by `relayctl lab up`: start one with its services, find
them, stop and remove them with everything they left (pinned maps, files)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

from manager.lab.lifecycle import lab_down, lab_up
from manager.lab.model import MAX_RELAYS, Lab
from manager.lab.netns import LabError
from manager.lab.reaper import proc_stat
from manager.lab.services import Services, lab_client_token, purge_pin_dir, relay_name, relayd_config
from manager.lab.state import list_labs, load_lab
from manager.protocol.addresses import fmt_ep

LAB_STATE_DIR = Path("/run/splitrelay")
SERVICES_FILE = "services.json"
STOP_TIMEOUT = 10.0


def lab_workdir(prefix: str) -> Path:
    """Config, logs and service pids of a lab started by `relayctl lab up`."""
    return LAB_STATE_DIR / f"lab-{prefix}"


def proc_start_time(pid: int) -> int | None:
    """Start time of a live process, None when gone or a zombie: with the pid
    it names the process, so a reused pid is never signalled."""
    st = proc_stat(pid)
    return None if st is None or st[0] == "Z" else st[1]


def lab_info(lab_, workdir: Path | None, services: dict | None) -> dict:
    wd = workdir or lab_workdir(lab_.prefix)
    cfg = relayd_config(lab_, wd)
    relays = []
    for r in range(1, lab_.relays + 1):
        rc = relayd_config(lab_, wd, relay=r)
        relays.append({"index": r, "namespace": lab_.relay_namespace(r), "signaling_url": lab_.relay_signaling_url(r),
                       "control_socket": rc["control_socket"], "pin_dir": rc["datapath"]["pin_dir"],
                       "internal_url": f"https://{rc['internal']['host']}:{rc['internal']['port']}",
                       "config_path": str(wd / f"{relay_name(r)}.toml") if services else None})
    fleet = {"relays": relays}
    if lab_.relays > 1:
        fleet.update(edge_namespace=lab_.edge_ns, redis_url=cfg["registry"]["url"])
    return {
        "prefix": lab_.prefix,
        "namespaces": {"client": lab_.client_ns, "relay": lab_.relay_ns, "transceivers": lab_.transceiver_ns},
        "signaling_url": lab_.signaling_url,
        "metrics_url": f"http://{lab_.internal4}:{cfg['metrics']['port']}/metrics",
        "vips": [fmt_ep(lab_.vip4, lab_.port), fmt_ep(lab_.vip6, lab_.port)],
        "control_socket": cfg["control_socket"],
        "pin_dir": cfg["datapath"]["pin_dir"],
        "config_path": str(workdir / "relayd.toml") if services else None,
        "workdir": str(workdir) if workdir else None,
        "services": {k: v["pid"] for k, v in (services or {}).items()},
        "created_at": lab_.created_at,
        # A token the lab's relayd accepts (null: client auth is off in this lab).
        "client_token": lab_client_token(workdir) if workdir and services else None,
        **fleet,  # relay 1 first; the single-relay fields above are relay 1's
    }


def start_lab(prefix: str | None, transceivers: int, *, services: bool = True, client_auth: str = "off",
              relays: int = 1, agent: str | None = None, say=lambda msg: None) -> dict:
    """Create a lab and (unless `services` is false) start relayd and the
    transceivers in it, detached: they outlive this process. Returns lab_info()."""
    say(f"creating namespaces and veths ({transceivers} transceivers"
        + (f", {relays} relays behind an edge router)" if relays > 1 else ")"))
    lab_ = lab_up(prefix, transceivers, relays)
    workdir = lab_workdir(lab_.prefix)
    recorded: dict = {}
    if services:
        svc = Services(lab_, workdir, detached=True, client_auth=client_auth, agent=agent)
        try:
            say(f"starting {'redis-server, ' if relays > 1 else ''}{relays} relayd and {transceivers} "
                f"transceivers (logs in {workdir})")
            svc.start()
            recorded = {name: {"pid": p.pid, "start_time": proc_start_time(p.pid)} for name, p in svc.procs.items()}
            (workdir / SERVICES_FILE).write_text(json.dumps({
                "services": recorded, "pin_dir": svc.config["datapath"]["pin_dir"],
                "control_socket": svc.config["control_socket"], "config_path": str(svc.config_path)}, indent=2))
        except BaseException:
            svc.stop(purge=True)
            lab_down(lab_)
            shutil.rmtree(workdir, ignore_errors=True)
            raise
    return lab_info(lab_, workdir, recorded)


def stop_lab_services(prefix: str) -> list[str]:
    """SIGTERM the services `lab up` recorded (transceivers first, then relayd)
    and wait for them; SIGKILL after STOP_TIMEOUT. Returns the names stopped."""
    path = lab_workdir(prefix) / SERVICES_FILE
    try:
        rec = json.loads(path.read_text())["services"]
    except (OSError, ValueError, KeyError):
        return []
    # Transceivers first, then the relays, Redis last (relays flush to it on the way out).
    rank = {n: (2 if n == "redis" else 1 if n.startswith("relayd") else 0) for n in rec}
    order = sorted(rec, key=lambda n: rank[n])
    stopped = []
    for name in order:
        pid, started = rec[name]["pid"], rec[name].get("start_time")
        if proc_start_time(pid) is None or proc_start_time(pid) != started:
            continue  # gone, a zombie, or the pid now names another process
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, STOP_TIMEOUT):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 2.0)
        stopped.append(name)
    return stopped


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
        if proc_start_time(pid) is None:  # gone or a zombie
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def take_lab_down(prefix: str) -> dict:
    """Everything of one lab: services, pinned state, namespaces, files."""
    plan = Lab.plan(prefix, 1)  # validates the prefix (it names paths)
    try:
        plan = Lab.plan(prefix, 1, load_lab(prefix).relays)
    except LabError:
        plan = Lab.plan(prefix, 1, MAX_RELAYS)  # no record: clean up after any fleet size
    stopped = stop_lab_services(prefix)
    pinned = False
    for r in range(1, plan.relays + 1):
        cfg = relayd_config(plan, lab_workdir(prefix), relay=r)
        pinned = purge_pin_dir(Path(cfg["datapath"]["pin_dir"])) or pinned
        Path(cfg["control_socket"]).unlink(missing_ok=True)
    removed = lab_down(prefix)
    shutil.rmtree(lab_workdir(prefix), ignore_errors=True)
    return {"prefix": prefix, "services_stopped": stopped, "pin_dir_removed": pinned, "namespaces_removed": removed}


def known_prefixes() -> tuple[list[str], list[str]]:
    """(all recorded labs, those started by `relayctl lab up`)."""
    labs = [lb.prefix for lb in list_labs()]
    ours = sorted(p.name.removeprefix("lab-") for p in LAB_STATE_DIR.glob("lab-*") if p.is_dir())
    return labs, ours


def list_lab_infos() -> list[dict]:
    """lab_info() of every recorded lab, with which services still run."""
    out = []
    for lb in list_labs():
        workdir = lab_workdir(lb.prefix)
        try:
            services = json.loads((workdir / SERVICES_FILE).read_text())["services"]
        except (OSError, ValueError, KeyError):
            services = None
        info = lab_info(lb, workdir if services else None, services)
        info["running"] = sorted(n for n, s in (services or {}).items()
                                 if proc_start_time(s["pid"]) == s.get("start_time"))
        info["exists"] = lb.exists()
        out.append(info)
    return out
