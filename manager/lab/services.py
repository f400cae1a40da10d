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
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from manager.lab.topology import Lab, NetnsExecutor
from manager.lab.topology import lab as lab_ctx


class ServicesError(RuntimeError):
    """A lab service did not start; the message says which and why."""


def lab_pin_dir(prefix: str) -> Path:
    """Where a lab's relayd pins its program and maps."""
    return Path(f"/sys/fs/bpf/splitrelay-{prefix}")


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


def relayd_config(lab: Lab, hint_key: str, *, metrics_port: int = 9100, idle_timeout: float = 30.0) -> dict:
    """relayd's configuration for a lab (as the TOML file would hold it)."""
    return {
        "hint_key": hint_key,
        "control_socket": f"/run/splitrelay/{lab.prefix}-relayd.sock",
        "datapath": {
            "pin_dir": str(lab_pin_dir(lab.prefix)),
            "interfaces": [lab.public_ifname, *lab.internal_ifnames],
            "vips": [{"addr": lab.vip4, "port": lab.port}, {"addr": lab.vip6, "port": lab.port}],
            "internal_addr4": lab.internal4,
            "internal_addr6": lab.internal6,
            "max_flows": 65536, "max_reverse": 65536, "max_owners": 16384,
        },
        "signaling": {"host": "0.0.0.0", "port": 8080},
        "slowpath": {"idle_timeout": idle_timeout},
        "metrics": {"host": "0.0.0.0", "port": metrics_port},
    }


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
    # Processes outlive the caller (relayctl lab up): own session, so no
    # terminal signal reaches them, and stdin closed.
    detached: bool = False
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def config(self) -> dict:
        return relayd_config(self.lab, self.hint_key, idle_timeout=self.idle_timeout)

    @property
    def config_path(self) -> Path:
        return self.workdir / "relayd.toml"

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(to_toml(self.config))
        self.start_relayd()
        self.wait_signaling(timeout)
        for k in range(1, len(self.lab.transceivers) + 1):
            self.start_transceiver(k)
        self.wait_transceivers(len(self.lab.transceivers), timeout)

    def _spawn(self, name: str, ns: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(self.log_path(name), "ab") as log:  # the child keeps its own copy of the fd
            proc = self.lab.popen(ns, [sys.executable, *argv], stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, cwd=self.workdir, env=env,
                                  start_new_session=self.detached)
        self.procs[name] = proc
        return proc

    def start_relayd(self, *extra_args: str) -> subprocess.Popen:
        return self._spawn("relayd", self.lab.relay_ns, ["-m", "cli.relayd", "-c", str(self.config_path), *extra_args])

    def start_transceiver(self, k: int) -> subprocess.Popen:
        ep = self.lab.transceivers[k - 1]
        return self._spawn(f"tx{k}", ep.ns, [
            "-m", "manager.transceiver", "--id", str(k), "--listen", f"{ep.addr4}:8700",
            "--relay-url", f"http://{ep.relay_addr4}:8080", "--bind", ep.addr4, "--bind", ep.addr6,
            "--capacity", str(self.capacity),
        ])

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = self.log_path(name).read_text(errors="replace")[-2000:]
                raise ServicesError(f"{name} exited with {proc.returncode}:\n{tail}")

    def api(self, path: str, timeout: float = 2.0):
        """GET the relay's signaling API from the client namespace."""
        def get():
            with urllib.request.urlopen(self.lab.signaling_url + path, timeout=timeout) as r:
                return json.loads(r.read())
        with NetnsExecutor(self.lab.client_ns) as ex:
            return ex.call(get)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """relayd's Prometheus samples, scraped over HTTP from the client
        namespace and parsed with prometheus_client's parser."""
        def get() -> str:
            url = f"http://{self.lab.vip4}:{self.config['metrics']['port']}/metrics"
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read().decode()
        with NetnsExecutor(self.lab.client_ns) as ex:
            text = ex.call(get)
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def wait_signaling(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                self.api("/v1/transceivers", timeout=0.5)
                return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise ServicesError(f"relayd signaling not up after {timeout:.0f}s "
                                        f"(log: {self.log_path('relayd')})") from None
                time.sleep(0.1)

    def wait_transceivers(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            ts = self.api("/v1/transceivers")["transceivers"]
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
        for name in [n for n in self.procs if n != "relayd"] + ["relayd"]:
            self.stop_one(name)
        if purge:
            purge_pin_dir(lab_pin_dir(self.lab.prefix))

    def __enter__(self) -> Services:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def running_lab(prefix: str, workdir: Path, transceivers: int = 2) -> Iterator[tuple[Lab, Services]]:
    """A lab with relayd and its transceivers running; all of it is torn
    down on exit, pinned state included."""
    with lab_ctx(prefix=prefix, transceivers=transceivers) as lab:
        svc = Services(lab, workdir=workdir)
        try:
            svc.start()
            yield lab, svc
        finally:
            svc.stop()
