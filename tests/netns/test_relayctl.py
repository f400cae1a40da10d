"""relayctl against a live lab: relayd + 2 transceivers in namespaces, one real
call held open while the commands run.

Every --json answer is checked against an independent source: the pinned maps
through bpftool (raw bytes decoded here) or the Datapath API, interfaces
through `ip -j link`, calls through the signaling API, metrics through a real
scrape. Commands run in-process through click's CliRunner and as
`python -m cli.relayctl` subprocesses. Errors must be one line, exit != 0,
and never a traceback.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.relayctl import main
from manager.lab.client import client_call
from manager.lab.lifecycle import lab as lab_ctx
from manager.lab.netns import NetnsExecutor
from manager.lab.services import Services
from manager.protocol.addresses import OwnerAddr
from manager.relay.config import DatapathConfig, RelaydConfig, load_config
from manager.relay.control_client import ControlClient, ControlError
from manager.relay.kernel.datapath import Datapath
from manager.relay.kernel.structs import STAT_NAMES, flow_key
from tests.support.paths import REPO
from tests.support.waiting import eventually

pytestmark = pytest.mark.netns

DOCS = REPO / "docs"


# --- helpers ---------------------------------------------------------------------------------

# The lab's start-up wait on a slower machine (make vm-test sets it under
# emulation): the only SPLITRELAY_* setting these runs take from the caller,
# and what they add to their own time limits.
START_TIMEOUT = "SPLITRELAY_LAB_START_TIMEOUT"
START_SLACK = float(os.environ.get(START_TIMEOUT, "0"))


def _clean_env() -> dict[str, str]:
    # The caller's SPLITRELAY_* settings must not steer these runs.
    return {k: v for k, v in os.environ.items() if not k.startswith("SPLITRELAY") or k == START_TIMEOUT}


def relayctl(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.relayctl", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout + START_SLACK, env=_clean_env(), **kw)


def invoke(*args: str):
    """relayctl in-process (CliRunner); stdout and stderr kept apart."""
    env = {k: None for k in os.environ if k.startswith("SPLITRELAY")}
    return CliRunner().invoke(main, list(args), env=env)


def ok_json(result) -> dict:
    out = result.stdout
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return json.loads(out)


def assert_one_line_error(res: subprocess.CompletedProcess, *fragments: str) -> str:
    assert res.returncode != 0, res
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1, err
    for f in fragments:
        assert f in err, err
    return err


def decode_flow_entry(entry: dict) -> tuple[str, int, str, int, int, int]:
    """(client addr, client port, vip addr, vip port, conn_id, flow_port) from
    bpftool's raw bytes of a flows4 or flows6 entry, by the C layout (struct
    flow_key4 or flow_key, and flow_info)."""
    k = bytes(int(b, 16) for b in entry["key"])
    v = bytes(int(b, 16) for b in entry["value"])
    if len(k) == 12:  # struct flow_key4: saddr, daddr, sport, dport as in the packet
        client, vip, ports = str(ipaddress.ip_address(k[0:4])), str(ipaddress.ip_address(k[4:8])), (k[8:10], k[10:12])
    else:
        n = 4 if k[0] == socket.AF_INET else 16
        client, vip, ports = str(ipaddress.ip_address(k[8:8 + n])), str(ipaddress.ip_address(k[24:24 + n])), (k[2:4],
                                                                                                             k[4:6])
    return (client, int.from_bytes(ports[0], "big"), vip, int.from_bytes(ports[1], "big"),
            int.from_bytes(v[0:4], "little"), int.from_bytes(v[4:6], "big"))


def pid_gone(pid: int) -> bool:
    """Exited (a zombie counts: the CLI that started it has gone, init reaps)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def fmt(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def plant_idle_flow(dp: Datapath, conn_id: int, client: tuple[str, int], vip: tuple[str, int],
                    flow_port: int, owner: tuple[str, int], age_s: float) -> None:
    """A kernel flow as the slow path installs one, last seen age_s ago."""
    dp.set_owner(conn_id, OwnerAddr(addr4=owner[0], port4=owner[1]))
    dp.add_flow(client, vip, conn_id, flow_port)
    key = flow_key(client, vip)
    info = dp.maps.flows.lookup(key)
    info.last_seen_ns = max(1, time.monotonic_ns() - int(age_s * 1e9))
    dp.maps.flows.update(key, info)


@contextlib.contextmanager
def held_call(lab, timeout: float = 20.0):
    """A real call from the client namespace, held open (connected) until the
    block ends; yields the client's CallReport (call_url set). No data-channel
    pings: the call may be ended from outside while held."""
    connected, release, box = threading.Event(), threading.Event(), {}

    async def hold(pc, rep) -> None:
        box["rep"] = rep
        connected.set()
        await asyncio.to_thread(release.wait, 120)

    def place():
        with NetnsExecutor(lab.client_ns) as ex:
            return ex.call(asyncio.run, client_call(lab.signaling_url, duration=0.5, messages=0, on_connected=hold))

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(place)
        try:
            deadline = time.monotonic() + timeout
            while not connected.wait(0.1):
                if fut.done():
                    raise AssertionError(f"call did not connect: {fut.result()}")
                if time.monotonic() > deadline:
                    raise AssertionError("call did not connect in time")
            yield box["rep"]
        finally:
            release.set()
            fut.result(timeout=60)


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A lab with relayd (idle timeout long enough that its own housekeeping
    never races the tests) and 2 transceivers; the pinned maps opened here."""
    with lab_ctx(prefix=f"rc{secrets.token_hex(3)}") as lab:
        svc = Services(lab, workdir=tmp_path_factory.mktemp("relayctl"), idle_timeout=300.0)
        dp = None
        try:
            svc.start()
            dp = Datapath(DatapathConfig(**svc.config["datapath"]))
            dp.open_maps()
            yield lab, svc, dp
        finally:
            if dp is not None:
                dp.close()
            svc.stop()


@pytest.fixture(scope="module")
def live(env):
    """One call held open for the module; waits until media flows both ways
    through its kernel flow. Yields (call_id, conn_id, transceiver id)."""
    lab, svc, dp = env
    CALL_STARTED[:] = [time.monotonic()]
    with held_call(lab) as rep:
        call_id = rep.call_url.rsplit("/", 1)[1]
        call = svc.call(call_id)
        eventually(lambda: any(f.conn_id == call["conn_id"] and f.packets_in > 5 and f.packets_out > 5
                               for f in dp.flows()), timeout=10.0 + START_SLACK, what="media on the call's kernel flow")
        yield call_id, call["conn_id"], call["transceiver_id"]


CALL_STARTED = [0.0]  # when the module's call was placed (monotonic)


def cfg_args(svc: Services) -> list[str]:
    return ["--config", str(svc.config_path)]


# --- docs ---------------------------------------------------------------------------------------

def _model_paths(model: type, prefix: str = "") -> set[str]:
    from pydantic import BaseModel

    out = set()
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and getattr(ann, "__origin__", None) is None and issubclass(ann, BaseModel):
            out |= _model_paths(ann, f"{prefix}{name}.")
        else:
            out.add(prefix + name)
    return out


def test_example_config_loads_and_sets_every_field(tmp_path):
    # The files it names, as an operator makes them (mode 0600).
    example = (DOCS / "relayd.example.toml").read_text()
    for name, text in (("hint.key", "ab" * 32), ("api-keys", "k1\n"), ("token.key", "cd" * 32)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o600)
        example = example.replace(f"/etc/splitrelay/{name}", str(tmp_path / name))
    path = tmp_path / "relayd.toml"
    path.write_text(example)
    cfg = load_config(path, environ={})
    assert cfg.datapath.vips and cfg.detach_on_exit is False
    data = tomllib.loads(path.read_text())
    present = set()

    def walk(d: dict, prefix: str = "") -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                present.add(prefix + k)

    walk(data)
    # hint_key is the alternative to hint_key_file (exactly one is given), in a comment.
    assert _model_paths(RelaydConfig) - present == {"hint_key"}, "fields the example does not document"
    assert "#   hint_key = " in example
    # Each setting is explained by a comment right above it (or its block).
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_0-9]+\s*=", line):
            # Up through the settings of the same block to its comment.
            j = i - 1
            while j >= 0 and lines[j].strip() and not lines[j].startswith(("#", "[")):
                j -= 1
            assert j >= 0 and lines[j].startswith("#"), f"no comment above: {line}"


def test_systemd_unit():
    text = (DOCS / "splitrelay-relayd.service").read_text()
    kv: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            kv.setdefault(k.strip(), []).append(v.strip())
    assert kv["Type"] == ["simple"]
    assert kv["KillSignal"] == ["SIGTERM"]
    assert kv["Restart"] == ["on-failure"]
    assert kv["LimitMEMLOCK"] == ["infinity"]
    # The unit grants exactly what the DaemonSet grants (the image test runs relayd with that set).
    daemonset = (REPO / "deploy" / "base" / "relay-daemonset.yaml").read_text()
    granted = re.search(r"add: \[([A-Z_, ]+)\]", daemonset).group(1)
    wanted = {f"CAP_{c.strip()}" for c in granted.split(",")}
    assert "CAP_SYS_ADMIN" not in wanted
    assert set(kv["AmbientCapabilities"][0].split()) == wanted
    assert set(kv["CapabilityBoundingSet"][0].split()) == wanted
    # Mounting bpffs is the one step that needs more, and only it runs privileged.
    assert all(v.startswith("+") for v in kv["ExecStartPre"] if "mount" in v)
    exe = kv["ExecStart"][0].split()
    assert exe[0].endswith("/.venv/bin/relayd") and "--config" in exe
    assert 'relayd = "cli.relayd:main"' in (REPO / "pyproject.toml").read_text()


def test_grafana_dashboard_uses_real_metric_names(env, live):
    lab, svc, dp = env
    dash = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    referenced = {m for e in exprs for m in re.findall(r"\bsplitrelay_[a-z0-9_]+", e)}
    scraped = {name for name, _ in svc.metrics()}
    assert referenced and referenced <= scraped, f"not in a real scrape: {sorted(referenced - scraped)}"
    text = " ".join(exprs)
    for needed in ("splitrelay_fastpath_packets_total", 'verdict="drop"', "splitrelay_slowpath_packets_total",
                   "splitrelay_flows", "splitrelay_calls", "splitrelay_transceivers",
                   "splitrelay_slowpath_queue_bytes"):
        assert needed in text, needed
    assert re.search(r"histogram_quantile\(0\.99, .*splitrelay_flow_setup_seconds_bucket", text)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


# --- relayd through the control socket ------------------------------------------------------------

def test_status_matches_ip_link_and_config(env, live):
    lab, svc, dp = env
    st = ok_json(invoke(*cfg_args(svc), "status", "--json"))
    assert st["pid"] == svc.procs["relayd"].pid  # nsenter execs relayd: same pid
    assert st["pin_dir"] == svc.config["datapath"]["pin_dir"]
    assert st["control_socket"] == svc.config["control_socket"]
    vips = svc.config["datapath"]["vips"]
    assert [(v["addr"], v["port"]) for v in st["vips"]] == [(v["addr"], v["port"]) for v in vips]
    assert st["uptime_s"] > 0 and st["adopted"] is False
    names = [i["name"] for i in st["interfaces"]]
    assert names == svc.config["datapath"]["interfaces"]
    for i in st["interfaces"]:
        link = json.loads(subprocess.run(["ip", "-j", "-n", lab.relay_ns, "link", "show", "dev", i["name"]],
                                         capture_output=True, text=True, check=True).stdout)[0]
        assert i["prog_id"] == link["xdp"]["prog"]["id"] and i["attached"]
        assert i["xdp_mode"] == {1: "native", 2: "generic"}[link["xdp"]["mode"]]
    c = st["counts"]
    assert c["calls"] == len(svc.calls()) >= 1
    assert c["flows"] == len(dp.flows()) >= 1
    assert c["transceivers"] == c["transceivers_healthy"] == 2
    # The control socket is root's only.
    assert os.stat(st["control_socket"]).st_mode & 0o777 == 0o600


def test_sessions_match_signaling_and_kernel(env, live):
    lab, svc, dp = env
    call_id, conn_id, tx = live
    data = ok_json(invoke(*cfg_args(svc), "sessions", "--json"))
    s = {x["call_id"]: x for x in data["sessions"]}[call_id]
    assert s["conn_id"] == conn_id and s["transceiver"] == tx and s["state"] == "active"
    assert s["owner"] == svc.call(call_id)["owner"]
    kernel = {(fmt(*f.client), fmt(*f.vip)): f for f in dp.flows() if f.conn_id == conn_id}
    installed = [leg for leg in s["legs"] if leg["installed"]]
    assert {(leg["client"], leg["vip"]) for leg in installed} == set(kernel)
    for leg in installed:
        f = kernel[(leg["client"], leg["vip"])]
        assert leg["flow_port"] == f.flow_port == leg["kernel"]["flow_port"]
        assert 0 < leg["kernel"]["packets_in"] <= f.packets_in  # the kernel was read after relayctl
        assert leg["setup_ms"] is None or 0 < leg["setup_ms"] < 5000


def test_flows_json_matches_bpftool(env, live):
    lab, svc, dp = env
    call_id, conn_id, _ = live
    pin = svc.config["datapath"]["pin_dir"]
    res = relayctl("--pin-dir", pin, "flows", "--json")
    assert res.returncode == 0, res.stderr
    flows = json.loads(res.stdout)["flows"]
    dump = [e for name in ("flows4", "flows6") for e in json.loads(subprocess.run(
        ["bpftool", "-j", "map", "dump", "pinned", f"{pin}/{name}"], capture_output=True, text=True, check=True).stdout)]
    theirs = {(fmt(c, cp), fmt(v, vp), cid, port) for c, cp, v, vp, cid, port in map(decode_flow_entry, dump)}
    ours = {(f["client"], f["vip"], f["conn_id"], f["flow_port"]) for f in flows}
    assert ours == theirs and any(f["conn_id"] == conn_id for f in flows)
    owner = dp.get_owner(conn_id)
    mine = [f for f in flows if f["conn_id"] == conn_id]
    for f in mine:
        assert f["owner"]["addr4"] == owner[0].addr4 and f["owner_generation"] == owner[1]
    # The pair ICE chose carries media both ways (another leg of the call may
    # have taken only checks).
    assert any(f["packets_in"] > 0 and f["packets_out"] > 0 for f in mine)


def test_stats_json_fast_and_slow(env, live):
    lab, svc, dp = env
    before = dp.counters()
    data = ok_json(invoke(*cfg_args(svc), "stats", "--json"))
    after = dp.counters()
    rows = {r["name"]: r for r in data["fastpath"]["counters"]}
    assert list(rows) == STAT_NAMES
    for name, r in rows.items():
        assert before[name][0] <= r["packets"] <= after[name][0], name
        assert r["verdict"] in ("forward", "pass", "drop")
    assert rows["fwd_in_rtp"]["packets"] > 0 and rows["fwd_in_rtp"]["class"] == "rtp"
    assert data["relayd_running"] is True and data["relayd_error"] is None
    slow = data["slowpath"]
    scraped = svc.metrics()
    assert slow["events"]["flows_installed"] == scraped[("splitrelay_slowpath_events_total",
                                                         (("event", "flows_installed"),))] >= 1
    assert slow["flow_setup"]["count"] == scraped[("splitrelay_flow_setup_seconds_count", ())]
    # The live call's next hops (client side and owner) are kept resolved.
    assert data["next_hops"]["managed"] >= 1 and data["next_hops"]["failed"] == 0


def test_tables_as_subprocess(env, live):
    lab, svc, dp = env
    call_id, conn_id, _ = live
    res = relayctl(*cfg_args(svc), "sessions")
    assert res.returncode == 0, res.stderr
    header, *rows = res.stdout.splitlines()
    assert header.split()[:5] == ["CALL_ID", "CONN_ID", "TX", "STATE", "OWNER"]
    assert any(r.split()[:2] == [call_id, str(conn_id)] for r in rows)
    res = relayctl(*cfg_args(svc), "transceivers")
    assert res.returncode == 0 and len(res.stdout.splitlines()) == 3, res.stdout
    res = relayctl(*cfg_args(svc), "stats")
    assert res.returncode == 0 and re.search(r"^forward\s+in_rtp\s+rtp\s+[1-9]", res.stdout, re.M), res.stdout
    res = relayctl(*cfg_args(svc), "status")
    assert res.returncode == 0 and re.search(r"^pub0\s+native\s+\d+\s+yes", res.stdout, re.M), res.stdout


def test_expire_through_relayd_removes_only_idle_flows(env, live):
    lab, svc, dp = env
    _, conn_id, _ = live
    ghost = 0x7E57_0001
    client = ("10.10.1.99", 40001)
    try:
        # Idle for longer than the module's call has existed: only the planted
        # flow can be that idle, however slowly the module ran.
        idle = int(time.monotonic() - CALL_STARTED[0]) + 60
        plant_idle_flow(dp, ghost, client, lab.vip(), 59990, (lab.transceivers[0].addr4, 7000), age_s=idle + 60)
        data = ok_json(invoke(*cfg_args(svc), "expire", "--idle", str(idle), "--json"))
        assert data["via"] == "relayd" and data["idle_s"] == idle
        assert [(f["client"], f["conn_id"]) for f in data["flows"]] == [(fmt(*client), ghost)]
        assert dp.get_flow(client, lab.vip()) is None
        assert any(f.conn_id == conn_id for f in dp.flows()), "the live call's flow was expired"
        assert invoke(*cfg_args(svc), "expire", "--idle", "-1").exit_code != 0
        # The API itself refuses bad bodies and unknown paths with a status and one line.
        api = ControlClient(svc.config["control_socket"])
        for method, path, body, status in (("POST", "/expire", {"idle_s": "soon"}, 400),
                                           ("POST", "/expire", {"idle": 1}, 400),
                                           ("GET", "/nope", None, 404)):
            with pytest.raises(ControlError) as info:
                api.request(method, path, body)
            assert info.value.status == status and "\n" not in str(info.value)
    finally:
        dp.remove_flow(client, lab.vip())
        dp.remove_owner(ghost)


def test_calls_show_a_live_calls_figures(env, live):
    lab, svc, dp = env
    call_id, conn_id, tx = live
    shown = ok_json(invoke(*cfg_args(svc), "calls", "show", call_id, "--json"))
    rec = shown["record"]
    assert shown["state"] == "active" and rec["call_id"] == call_id and rec["transceivers"] == [tx]
    flow = next(f for f in dp.flows() if f.conn_id == conn_id)  # the kernel's own count, read after
    assert 5 < rec["client_relay"]["uplink"]["packets"] <= flow.packets_in
    assert 5 < rec["client_relay"]["downlink"]["packets"] <= flow.packets_out
    assert rec["client"]["family"] in ("ipv4", "ipv6") and rec["client"]["transport"] == "udp"
    assert 0 < rec["connect_ms"] < 10_000 and 0 < rec["first_audio_ms"] < 10_000
    res = relayctl(*cfg_args(svc), "calls", "show", str(conn_id))  # by connection id, as text
    assert res.returncode == 0 and "client-relay: up" in res.stdout and call_id in res.stdout, res
    assert_one_line_error(relayctl(*cfg_args(svc), "calls", "show", "nosuchcall"), "unknown call", "nosuchcall")
    assert_one_line_error(relayctl(*cfg_args(svc), "calls", "records", "--since", "ten minutes"),
                          "--since 'ten minutes'", "10m")


def test_end_session_and_unknown_session(env):
    lab, svc, dp = env
    CALL_STARTED[:] = [time.monotonic()]
    with held_call(lab) as rep:
        call_id = rep.call_url.rsplit("/", 1)[1]
        conn_id = svc.call(call_id)["conn_id"]
        eventually(lambda: any(f.conn_id == conn_id for f in dp.flows()), 10, what="the call's kernel flow")
        data = ok_json(invoke(*cfg_args(svc), "end", call_id, "--json"))
        assert data["ended"]["call_id"] == call_id and data["ended"]["ended_reason"] == "operator"
        # Kernel entries go with the call; the signaling API forgets it.
        assert not any(f.conn_id == conn_id for f in dp.flows())
        assert dp.get_owner(conn_id) is None
        assert call_id not in {c["call_id"] for c in svc.calls()}
        res = relayctl(*cfg_args(svc), "end", call_id)
        assert_one_line_error(res, "unknown session", call_id)
    # Its record: written once, with the operator's end and the kernel's counts of its flow.

    def recorded() -> list[dict]:
        found = ok_json(invoke(*cfg_args(svc), "calls", "records", "--since", "10m", "--json"))
        return [r for r in found if r["call_id"] == call_id]

    eventually(recorded, 10, what="the call's record")
    (rec,) = recorded()
    assert rec["end_reason"] == "operator" and rec["conn_id"] == conn_id
    assert rec["client_relay"]["uplink"]["packets"] > 0 and rec["ended_at"] >= rec["created_at"]


# --- errors ------------------------------------------------------------------------------------------

def test_relayd_not_running_is_one_line():
    path = Path(f"/run/splitrelay/rctest-{secrets.token_hex(4)}.sock")
    for cmd in ("status", "sessions", "transceivers"):
        assert_one_line_error(relayctl("--socket", str(path), cmd), "relayd is not running", str(path))
    # A stale socket file (relayd killed): nobody listens on it.
    path.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(path))
        s.close()
        assert_one_line_error(relayctl("--socket", str(path), "status"), "relayd is not running", "refuses")
    finally:
        s.close()
        path.unlink(missing_ok=True)


def test_no_maps_pinned_is_clear():
    pin = f"/sys/fs/bpf/splitrelay-rctest{secrets.token_hex(3)}"
    for cmd in ("flows", "stats"):
        assert_one_line_error(relayctl("--pin-dir", pin, cmd), "no pinned map", pin)
    assert_one_line_error(relayctl("--pin-dir", "/tmp/nope", "flows"), "/sys/fs/bpf")


def test_invalid_config_names_the_field(tmp_path):
    good = (DOCS / "relayd.example.toml").read_text()
    bad = tmp_path / "relayd.toml"
    bad.write_text(good.replace("port = 8080", "port = 70000"))
    err = assert_one_line_error(relayctl("--config", str(bad), "status"), "invalid configuration", "signaling.port")
    assert "70000" in err
    res = subprocess.run([sys.executable, "-m", "cli.relayctl", "flows"], cwd=REPO, capture_output=True, text=True,
                         env={**_clean_env(), "SPLITRELAY_CONFIG": str(bad)}, timeout=60)
    assert_one_line_error(res, "signaling.port")


def test_not_root_is_one_line(env):
    lab, svc, dp = env

    for args, fragment in ((["--pin-dir", svc.config["datapath"]["pin_dir"], "flows"], "needs root"),
                           (["lab", "up"], "needs root"),
                           (["--socket", svc.config["control_socket"], "status"], "permission denied")):
        assert_one_line_error(relayctl(*args, user=65534, group=65534, extra_groups=[]), fragment)


# --- lab and demo -----------------------------------------------------------------------------------

def test_lab_up_survives_the_cli_then_down_leaves_nothing():
    prefix = f"rl{secrets.token_hex(3)}"
    info = None
    dp = None
    try:
        res = relayctl("lab", "up", "--prefix", prefix, "--transceivers", "1", "--json", timeout=120)
        assert res.returncode == 0, res.stderr
        info = json.loads(res.stdout)
        assert info["prefix"] == prefix and info["namespaces"]["client"] == f"{prefix}-client"
        assert info["signaling_url"].startswith("http://10.10.1.1:")
        assert info["client_token"] is None  # the lab's default: client auth off
        present = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True).stdout
        assert {n["name"] for n in json.loads(present or "[]")} >= {f"{prefix}-{r}" for r in ("client", "relay", "tx1")}
        # The CLI has exited; its services still run and answer.
        st = ok_json(invoke("--lab", prefix, "status", "--json"))
        assert st["pid"] == info["services"]["relayd"] and st["counts"]["transceivers_healthy"] == 1
        assert st["control_socket"] == info["control_socket"]
        assert prefix in {x["prefix"] for x in ok_json(invoke("lab", "list", "--json"))["labs"]}
        prog_id = st["interfaces"][0]["prog_id"]

        # relayd down: map commands keep working, relayd commands fail cleanly.
        os.kill(info["services"]["relayd"], signal.SIGTERM)
        eventually(lambda: pid_gone(info["services"]["relayd"]), 10, what="relayd to exit")
        assert not Path(info["control_socket"]).exists()  # relayd removed its socket
        assert_one_line_error(relayctl("--config", info["config_path"], "status"), "relayd is not running")
        dp = Datapath(DatapathConfig(pin_dir=info["pin_dir"]))
        dp.open_maps()
        client, vip = ("10.10.1.2", 40002), ("10.10.1.1", 3478)
        plant_idle_flow(dp, 0x7E57_0002, client, vip, 59991, ("10.10.2.2", 7000), age_s=120)
        flows = ok_json(invoke("--lab", prefix, "flows", "--json"))["flows"]
        assert [(f["client"], f["conn_id"]) for f in flows] == [(fmt(*client), 0x7E57_0002)]
        stats = ok_json(invoke("--lab", prefix, "stats", "--json"))
        assert stats["relayd_running"] is False and "not running" in stats["relayd_error"]
        assert stats["slowpath"] is None and len(stats["fastpath"]["counters"]) == len(STAT_NAMES)
        text = relayctl("--lab", prefix, "stats")
        assert text.returncode == 0 and "relayd not running" in text.stdout
        exp = ok_json(invoke("--lab", prefix, "expire", "--idle", "60", "--json"))
        assert exp["via"] == "maps" and [f["conn_id"] for f in exp["flows"]] == [0x7E57_0002]
        assert exp["owners_removed"] == [0x7E57_0002] and dp.get_owner(0x7E57_0002) is None
        dp.close()
        dp = None

        down = relayctl("lab", "down", prefix, "--json", timeout=120)
        assert down.returncode == 0, down.stderr
        (r,) = json.loads(down.stdout)["labs"]
        assert r["pin_dir_removed"] and set(r["services_stopped"]) == {"tx1"}  # relayd was already gone
        info_left = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True).stdout
        assert not [n for n in json.loads(info_left or "[]") if n["name"].startswith(f"{prefix}-")]
        assert not Path(info["pin_dir"]).exists() and not Path(info["workdir"]).exists()
        assert not Path(f"/run/splitrelay/lab-{prefix}.json").exists()
        assert all(pid_gone(pid) for pid in info["services"].values())
        # The program is gone from the kernel (nothing attached or pinned holds it).
        eventually(lambda: subprocess.run(["bpftool", "prog", "show", "id", str(prog_id)],
                                          capture_output=True).returncode != 0, 10, what="the XDP program to be freed")
    finally:
        if dp is not None:
            dp.close()
        if any(Path(f"/run/splitrelay/lab-{prefix}{s}").exists() for s in ("", ".json")):
            relayctl("lab", "down", prefix, timeout=120)


def test_demo_json_places_a_call_and_cleans_up():
    res = relayctl("demo", "--duration", "2", "--json", timeout=120)
    assert "Traceback" not in res.stderr, res.stderr
    r = json.loads(res.stdout)
    assert res.returncode == 0, (r, res.stderr)
    assert r["ok"] and r["call"]["connected"] and r["call"]["error"] is None
    assert r["tone_detected"] and r["call"]["dc_echoed"] == r["call"]["dc_sent"] > 0
    assert r["fastpath"]["forwarded"] > r["slowpath"]["packets"] > 0
    assert r["slowpath"]["flows_installed"] >= 1
    # The page on this machine's loopback, and a call from this machine through it (the host link).
    assert r["host"]["page"] and r["host"]["call"], r["host"]
    assert r["host"]["url"].startswith("http://127.0.0.1:")
    assert r["left_behind"] == []
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{r['prefix']}-" not in names
    links = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True).stdout
    assert f'"{r["prefix"]}-h"' not in links  # the host end of the link went with the lab
    assert not Path(f"/sys/fs/bpf/splitrelay-{r['prefix']}").exists()
