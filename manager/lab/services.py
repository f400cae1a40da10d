"""Run the split relay in a namespace lab and place real WebRTC calls.

Shared by `make demo` (relayctl demo), `relayctl lab up` and the end-to-end
tests: Services starts relayd in the relay namespace and the transceivers in
theirs; client_call() is a standard aiortc client that only adds the HTTP
POST/DELETE of the signaling convention.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from manager import pki
from manager.lab.host_link import HOST_IFNAME
from manager.lab.lifecycle import lab as lab_ctx
from manager.lab.model import Lab
from manager.lab.netns import NetnsExecutor
from manager.protocol.addresses import OwnerAddr
from manager.protocol.client_auth import mint_token
from manager.protocol.keyring import parse_ring
from manager.relay.config import DatapathConfig
from manager.relay.control_client import ControlClient, ControlError
from manager.relay.kernel.datapath import Datapath


class ServicesError(RuntimeError):
    """A lab service did not start; the message says which and why."""


def lab_pin_dir(prefix: str, relay: int = 1) -> Path:
    """Where a lab's relayd (relay N of a fleet lab) pins its program and maps."""
    return Path(f"/sys/fs/bpf/splitrelay-{prefix}" + ("" if relay == 1 else f"-r{relay}"))


def relay_name(relay: int) -> str:
    """Service (and log) name of relay N: relayd, relayd2, ..."""
    return "relayd" if relay == 1 else f"relayd{relay}"


REDIS_SERVER = "/usr/bin/redis-server"


def purge_pin_dir(pin_dir: Path) -> bool:
    """Unpin a program and its maps (bpffs objects are files); True if
    anything was there."""
    if not pin_dir.exists():
        return False
    for p in sorted(pin_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if p.is_dir() and not p.is_symlink():
            p.rmdir()
        else:
            p.unlink(missing_ok=True)
    pin_dir.rmdir()
    return True


INTERNAL_PORT = 8443
CONTROL_PORT = 8700
LAB_PREFIXES = ["10.10.0.0/16", "fd00:10::/32"]  # every lab address (manager.lab.model)


# Not 443: Chrome refuses a remote candidate on a port below 1024 at a private
# address (libwebrtc's VerifyCandidate), and the lab's VIPs are private.
LAB_TCP_PORT = 4443
# A TCP proxy in front of ICE-TCP, trusted for its PROXY protocol header: an
# address the client namespace holds when a test routes it (tests/netns).
LAB_TCP_PROXY = "fd00:64:64:99::1"


def relayd_config(lab: Lab, workdir: Path, *, metrics_port: int = 9100, idle_timeout: float = 30.0,
                  client_auth: str = "off", relay: int = 1) -> dict:
    """relayd's configuration for a lab (as the TOML file would hold it);
    `relay`: which relay of a fleet lab."""
    auth: dict = {"mode": client_auth}
    if client_auth == "tokens":
        auth["token_key_file"] = str(workdir / "token.key")
    elif client_auth == "api_keys":
        auth["api_keys_file"] = str(workdir / "api.keys")
    internal4 = lab.relay_internal(relay, socket.AF_INET)
    internal6 = lab.relay_internal(relay, socket.AF_INET6)
    cfg = {
        "hint_key_file": str(workdir / "hint.key"),
        "control_socket": f"/run/splitrelay/{lab.prefix}-{relay_name(relay)}.sock",
        "datapath": {
            "pin_dir": str(lab_pin_dir(lab.prefix, relay)),
            "interfaces": [lab.public_ifname, *([HOST_IFNAME] if lab.host_link else []), *lab.internal_ifnames],
            "public_interfaces": [lab.public_ifname, *([HOST_IFNAME] if lab.host_link else [])],
            "vips": [{"addr": lab.vip4, "port": lab.port}, {"addr": lab.vip6, "port": lab.port}],
            "internal_addr4": internal4,
            "internal_addr6": internal6,
            "internal_addr_count": lab.internal_count,
            # The plan: 2 addresses x 20,000 ports x 2 families = 80,000 flows.
            "flow_port_min": 10000, "flow_port_max": 29999,  # outside the ephemeral range
            "max_flows": 81920, "max_flows6": 81920, "max_reverse": 81920, "max_owners": 16384,
        },
        # Both VIPs (clients with only IPv6 too); a fleet's relays listen on
        # every address: on the VIP when the edge routes it to them, and on
        # their own public address.
        "signaling": {"host": lab.vip4, "extra_hosts": [lab.vip6], "port": 8080, "page": True} if lab.relays == 1
                     else {"host": "0.0.0.0", "extra_hosts": ["::"], "port": 8080, "page": True},
        "internal": {"host": internal4, "port": INTERNAL_PORT, "pki_dir": str(workdir / "pki"),
                     "prefixes": LAB_PREFIXES},
        "slowpath": {"idle_timeout": idle_timeout},
        # ICE-TCP on both VIPs; the lab's client is one source, so the per-source
        # cap is small enough for a test to reach, the handshake short to wait for.
        "tcp": {"port": LAB_TCP_PORT, "max_per_source": 4, "handshake_timeout": 2.0,
                "trusted_proxies": [LAB_TCP_PROXY]},
        "metrics": {"port": metrics_port},  # on the internal address
        "records": {"path": str(workdir / f"records-{relay_name(relay)}.jsonl")},
        "client_auth": auth,
    }
    if lab.relays > 1:
        cfg["registry"] = {"backend": "redis", "url": f"unix://{workdir / 'redis.sock'}",
                           "relay_id": f"relay{relay}", "ttl": 10.0, "timeout": 0.5}
    return cfg


def lab_client_token(workdir: Path, ttl: float = 3600.0) -> str | None:
    """A client token the lab's relayd accepts, or None when its client auth is off."""
    path = workdir / "token.key"
    if not path.exists():
        return None
    ring = parse_ring(pki.read_secret_file(path).decode(), min_length=32, what=str(path))
    return mint_token(ring, ttl=ttl, subject="lab")


def write_secret(path: Path, text: str) -> None:
    """A file only its owner can read, from its first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def prepare_secrets(lab: Lab, workdir: Path, hint_key: str) -> None:
    """The lab's PKI (CA, relayd, transceiver-1..N) and hint key, as an
    operator would make them with `relayctl pki` (idempotent). Transceiver
    certificates also name their addresses, so tools can reach a control
    API by URL (relayd checks the name, transceiver-N.splitrelay.internal)."""
    workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    d = workdir / "pki"
    pki.init_ca(d)
    if not (d / "relayd.pem").exists():
        pki.issue(d, pki.relayd_name())
    for k, ep in enumerate(lab.transceivers, start=1):
        if not (d / f"transceiver-{k}.pem").exists():
            pki.issue(d, pki.transceiver_name(k), ip_addresses=(ep.addr4, ep.addr6))
    write_secret(workdir / "hint.key", hint_key + "\n")


def to_toml(data: dict, prefix: str = "") -> str:
    """Enough TOML for relayd_config(): scalars, lists of scalars/tables."""
    lines, tables = [], []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in tables:
        out += f"\n[{prefix}{k}]\n" + to_toml(v, f"{prefix}{k}.")
    return out


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(str(v))


@dataclass
class Services:
    """relayd and the transceivers, running as processes inside a lab."""

    lab: Lab
    workdir: Path
    hint_key: str = field(default_factory=lambda: secrets.token_hex(32))
    capacity: int = 50
    idle_timeout: float = 30.0
    client_auth: str = "off"  # the lab's default; "tokens" / "api_keys": relayd wants a client credential
    agent: str | None = None  # the transceivers' --agent SPEC (None: the echo agent)
    otlp_endpoint: str | None = None  # traces of relayd and the transceivers go there (None: off)
    drain_deadline: float | None = None  # the transceivers' --drain-deadline (None: their default)
    transceiver_args: tuple[str, ...] = ()  # more options for every transceiver
    # Processes outlive the caller (relayctl lab up): own session, so no
    # terminal signal reaches them, and stdin closed.
    detached: bool = False
    # How a component runs: None, this Python inside its namespace; else a
    # function (name, namespace, module argv) -> a host command that runs it
    # there (tests/netns/test_image.py: each component in a container).
    launcher: Callable[[str, str, list[str]], list[str]] | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    # Extra environment of relayd (tests/netns/test_upgrade.py: a previous release's code),
    # and what its config file is trimmed to (that release's keys).
    relayd_env: dict[str, str] | None = None
    relayd_config: Callable[[dict], dict] | None = None

    @property
    def config(self) -> dict:
        return self.config_of(1)

    def config_of(self, relay: int) -> dict:
        cfg = relayd_config(self.lab, self.workdir, idle_timeout=self.idle_timeout, client_auth=self.client_auth,
                            relay=relay)
        if self.otlp_endpoint:
            cfg["telemetry"] = {"otlp_endpoint": self.otlp_endpoint}
        return self.relayd_config(cfg) if self.relayd_config is not None else cfg

    @property
    def config_path(self) -> Path:
        return self.config_path_of(1)

    def config_path_of(self, relay: int) -> Path:
        return self.workdir / f"{relay_name(relay)}.toml"

    # --- the fleet's Redis (labs of 2+ relays) ----------------------------------------

    @property
    def redis_socket(self) -> Path:
        return self.workdir / "redis.sock"

    def start_redis(self, timeout: float = 10.0) -> subprocess.Popen:
        """A redis-server of our own: a unix socket in the lab's directory (every
        namespace reaches it through the file system), no TCP port, no persistence."""
        data = self.workdir / "redis"
        data.mkdir(exist_ok=True, mode=0o700)
        self.redis_socket.unlink(missing_ok=True)
        with open(self.log_path("redis"), "ab") as log:
            proc = subprocess.Popen([REDIS_SERVER, "--port", "0", "--unixsocket", str(self.redis_socket),
                                     "--unixsocketperm", "700", "--dir", str(data), "--save", "",
                                     "--appendonly", "no"], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=self.detached)
        self.procs["redis"] = proc
        deadline = time.monotonic() + timeout
        while not _redis_answers(self.redis_socket):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ServicesError(f"redis-server did not start (log: {self.log_path('redis')})")
            time.sleep(0.02)
        return proc

    def stop_redis(self) -> None:
        """Kill it (an outage, not a clean stop)."""
        self.stop_one("redis", signal.SIGKILL)

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def start(self, timeout: float | None = None) -> None:
        # SPLITRELAY_LAB_START_TIMEOUT: a slower machine's (an emulated VM's) start-up time.
        timeout = timeout if timeout is not None else float(os.environ.get("SPLITRELAY_LAB_START_TIMEOUT", "30"))
        prepare_secrets(self.lab, self.workdir, self.hint_key)
        if self.client_auth == "tokens" and not (self.workdir / "token.key").exists():
            write_secret(self.workdir / "token.key", secrets.token_hex(32) + "\n")
        if self.client_auth == "api_keys" and not (self.workdir / "api.keys").exists():
            write_secret(self.workdir / "api.keys", secrets.token_hex(16) + "\n")
        if self.lab.relays > 1:
            self.start_redis()
        for r in range(1, self.lab.relays + 1):
            write_secret(self.config_path_of(r), to_toml(self.config_of(r)))
            self.start_relayd(relay=r)
        for r in range(1, self.lab.relays + 1):
            self.wait_signaling(timeout, relay=r)
        for k in range(1, len(self.lab.transceivers) + 1):
            self.start_transceiver(k)
        for r in range(1, self.lab.relays + 1):
            self.wait_transceivers(len(self.lab.transceivers), timeout, relay=r)

    def _spawn(self, name: str, ns: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(self.log_path(name), "ab") as log:  # the child keeps its own copy of the fd
            io = {"stdin": subprocess.DEVNULL, "stdout": log, "stderr": subprocess.STDOUT, "cwd": self.workdir,
                  "env": env, "start_new_session": self.detached}
            if self.launcher is None:
                proc = self.lab.popen(ns, [sys.executable, *argv], **io)
            else:
                proc = subprocess.Popen(self.launcher(name, self.lab.ns(ns), argv), **io)
        self.procs[name] = proc
        return proc

    def start_relayd(self, *extra_args: str, relay: int = 1) -> subprocess.Popen:
        return self._spawn(relay_name(relay), self.lab.relay_namespace(relay),
                           ["-m", "cli.relayd", "-c", str(self.config_path_of(relay)), *extra_args],
                           env=self.relayd_env)

    def start_transceiver(self, k: int) -> subprocess.Popen:
        ep = self.lab.transceivers[k - 1]
        return self._spawn(f"tx{k}", ep.ns, [
            "-m", "manager.transceiver", "--id", str(k), "--listen", f"{ep.addr4}:{CONTROL_PORT}",
            *(a for r in range(1, self.lab.relays + 1)
              for a in ("--relay-url", f"https://{self.lab.relay_internal(r)}:{INTERNAL_PORT}")),
            "--bind", ep.addr4, "--bind", ep.addr6,
            "--capacity", str(self.capacity), "--pki-dir", str(self.workdir / "pki"),
            "--hint-key-file", str(self.workdir / "hint.key"),
            *(("--agent", self.agent) if self.agent else ()),
            *(("--otlp-endpoint", self.otlp_endpoint) if self.otlp_endpoint else ()),
            *(("--drain-deadline", str(self.drain_deadline)) if self.drain_deadline is not None else ()),
            *self.transceiver_args,
        ])

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = self.log_path(name).read_text(errors="replace")[-2000:]
                raise ServicesError(f"{name} exited with {proc.returncode}:\n{tail}")

    @property
    def control(self) -> ControlClient:
        """relayd's control socket (the operator's view: calls, transceivers)."""
        return self.control_of(1)

    def control_of(self, relay: int) -> ControlClient:
        # relayctl's own timeout: a migration asked of a relay on a loaded
        # machine (export, import, the kernel's flip) can take seconds.
        return ControlClient(self.config_of(relay)["control_socket"])

    def open_datapath(self, relay: int) -> Datapath:
        """Relay N's pinned maps, opened without relayd (close it after use)."""
        dp = Datapath(DatapathConfig(pin_dir=self.config_of(relay)["datapath"]["pin_dir"]))
        dp.open_maps()
        return dp

    def kernel_owner(self, relay: int, conn_id: int) -> OwnerAddr | None:
        """The owner entry in relay N's pinned maps, read without relayd."""
        dp = self.open_datapath(relay)
        try:
            found = dp.get_owner(conn_id)
            return None if found is None else found[0]
        finally:
            dp.close()

    def transceiver_api(self, k: int, path: str, *, method: str = "GET", timeout: float = 2.0) -> dict | None:
        """Transceiver k's control API as relayd reaches it (mutual TLS with
        relayd's certificate), from the relay namespace; None on 404."""
        ctx = pki.client_context(pki.paths(self.workdir / "pki", pki.RELAYD))
        url = f"https://{self.lab.transceivers[k - 1].addr4}:{CONTROL_PORT}{path}"

        def get() -> dict | None:
            req = urllib.request.Request(url, method=method)
            try:
                with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
                    body = r.read()
                    return json.loads(body) if body.strip() else {}
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return None
                raise
        with NetnsExecutor(self.lab.relay_ns) as ex:
            return ex.call(get)

    def calls(self) -> list[dict]:
        """The registry's calls: call_id, conn_id, transceiver_id, owner, state."""
        return [{"call_id": s["call_id"], "conn_id": s["conn_id"], "transceiver_id": s["transceiver"],
                 "owner": s["owner"], "state": s["state"]} for s in self.control.sessions()["sessions"]]

    def call(self, call_id: str) -> dict:
        return next(c for c in self.calls() if c["call_id"] == call_id)

    def transceivers(self) -> list[dict]:
        return self.control.transceivers()["transceivers"]

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """relayd's Prometheus samples, scraped over HTTP on the internal
        address (from the relay namespace) and parsed with prometheus_client."""
        def get() -> str:
            url = f"http://{self.lab.internal4}:{self.config['metrics']['port']}/metrics"
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read().decode()
        with NetnsExecutor(self.lab.relay_ns) as ex:
            text = ex.call(get)
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def wait_signaling(self, timeout: float, relay: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                self.control_of(relay).transceivers()
                return
            except ControlError:
                if time.monotonic() > deadline:
                    raise ServicesError(f"relayd signaling not up after {timeout:.0f}s "
                                        f"(log: {self.log_path('relayd')})") from None
                time.sleep(0.1)

    def wait_transceivers(self, n: int, timeout: float, relay: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            ts = self.control_of(relay).transceivers()["transceivers"]
            if sum(1 for t in ts if t["healthy"]) >= n:
                return
            if time.monotonic() > deadline:
                raise ServicesError(f"only {len(ts)} of {n} transceivers registered after {timeout:.0f}s")
            time.sleep(0.1)

    def stop_one(self, name: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def stop(self, *, purge: bool = True) -> None:
        """Stop every service; with purge, also remove the lab's pinned
        datapath state (the namespaces' XDP attachments go with the lab)."""
        relays = [relay_name(r) for r in range(1, self.lab.relays + 1)]
        for name in [n for n in self.procs if n not in (*relays, "redis")] + relays + ["redis"]:
            self.stop_one(name)
        if purge:
            for r in range(1, self.lab.relays + 1):
                purge_pin_dir(lab_pin_dir(self.lab.prefix, r))

    def __enter__(self) -> Services:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _redis_answers(path: Path) -> bool:
    """PING over the unix socket (RESP), without a client library."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            s.connect(str(path))
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def running_lab(prefix: str, workdir: Path, transceivers: int = 2, relays: int = 1, client_auth: str = "off",
                agent: str | None = None, transceiver_args: tuple[str, ...] = ()) -> Iterator[tuple[Lab, Services]]:
    """A lab with relayd(s) and the transceivers running (and Redis for a
    fleet); all of it is torn down on exit, pinned state included.
    `agent`: the transceivers' --agent SPEC (None: the echo agent)."""
    with lab_ctx(prefix=prefix, transceivers=transceivers, relays=relays) as lab:
        svc = Services(lab, workdir=workdir, client_auth=client_auth, agent=agent, transceiver_args=transceiver_args)
        try:
            svc.start()
            yield lab, svc
        finally:
            svc.stop()
