"""redis-server for tests: its own unix socket and directory, no TCP port."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import redis

from manager.relay.config import RegistryConfig
from tests.support.waiting import Hopeless, eventually

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """redis-server on a unix socket in a test directory (no TCP port)."""

    def __init__(self, root: Path, password: str | None = None) -> None:
        self.root = root
        self.sock = root / "redis.sock"
        self.password = password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    def start(self) -> None:
        (self.root / "data").mkdir(exist_ok=True)
        argv = [REDIS, "--port", "0", "--unixsocket", str(self.sock), "--unixsocketperm", "700",
                "--dir", str(self.root / "data"), "--save", "", "--appendonly", "no"]
        if self.password:
            argv += ["--requirepass", self.password]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        def answers() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise Hopeless("redis-server exited")
            return redis.Redis(unix_socket_path=str(self.sock), password=self.password).ping()

        eventually(answers, 10, what="redis-server to answer")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # an outage, not a clean shutdown
            self.proc.wait()
        self.proc = None

    def raw(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.sock), password=self.password, decode_responses=True)


def password_server(tmp_path: Path):
    """A password-protected redis-server for one test (the netns layer's `server` fixture)."""
    s = RedisServer(tmp_path, password="fleet-test-password")
    s.start()
    try:
        yield s
    finally:
        s.stop()


def registry_config(server: RedisServer, tmp_path: Path, **kw) -> RegistryConfig:
    """A fleet registry config for `server`, its password in a 0600 file."""
    pw = tmp_path / "redis.password"
    if not pw.exists():
        fd = os.open(pw, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, f"{server.password}\n".encode())
        os.close(fd)
    return RegistryConfig(backend="redis", url=server.url, password_file=pw, ttl=10, timeout=0.5, **kw)
