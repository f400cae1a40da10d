"""Debian's Firefox ESR, headless, in a lab namespace, driven over WebDriver
BiDi (a websocket on --remote-debugging-port; no driver binary), beside
tests/support/chromium.py. Its microphone is Firefox's fake device (a tone),
switched on with user.js prefs, and the page is allowed to use it over plain
http on the lab's private address.

On failure `save_artifacts` keeps the page's report and Firefox's log under
test-artifacts/<name>/."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from manager.lab.netns import ns_popen
from tests.support.paths import ARTIFACTS

FIREFOX = shutil.which("firefox-esr") or "/usr/bin/firefox-esr"
PULSEAUDIO = shutil.which("pulseaudio") or "/usr/bin/pulseaudio"

PREFS = {
    "media.navigator.streams.fake": True,  # the fake microphone: a tone
    "media.navigator.permission.disabled": True,  # no prompt
    "media.devices.insecure.enabled": True,  # getUserMedia on http://10.10.1.1
    "media.getusermedia.insecure.enabled": True,
    "media.autoplay.default": 0,  # the page's AudioContext runs without a gesture
    "media.autoplay.block-webaudio": False,
    "browser.shell.checkDefaultBrowser": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "app.update.disabledForTesting": True,
    "remote.prefs.recommended": True,
}


def version() -> str:
    out = subprocess.run([FIREFOX, "--version"], capture_output=True, text=True, timeout=30).stdout
    return out.strip()


class Firefox:
    """One headless Firefox ESR in network namespace `ns` (see the module docstring)."""

    def __init__(self, ns: str, url: str, *, port: int = 9333) -> None:
        self.ns, self.url, self.port = ns, url, port
        self.dir = Path(tempfile.mkdtemp(prefix="firefox-"))
        self.log = self.dir / "firefox.log"
        self.proc: subprocess.Popen | None = None
        self.pulse: subprocess.Popen | None = None
        self._ids = itertools.count(1)
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._context: str | None = None

    def start(self) -> None:
        profile = self.dir / "profile"
        profile.mkdir()
        (profile / "user.js").write_text(
            "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in PREFS.items()))
        # Web Audio (the page's level meters) runs only with an audio output
        # to clock it, and the machine has no sound card: a PulseAudio of its
        # own with a null sink is one.
        sock = self.dir / "pulse.sock"
        self.pulse = subprocess.Popen(
            [PULSEAUDIO, "--daemonize=no", "--exit-idle-time=-1", "--disable-shm", "--use-pid-file=no", "-n",
             "--load=module-null-sink", f"--load=module-native-protocol-unix socket={sock} auth-anonymous=1"],
            env={"HOME": str(self.dir), "XDG_RUNTIME_DIR": str(self.dir), "PATH": "/usr/bin:/bin"},
            stdout=(self.dir / "pulse.log").open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not sock.exists():
            if self.pulse.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PulseAudio did not start: {(self.dir / 'pulse.log').read_text()[-500:]}")
            time.sleep(0.05)  # pacing: polling for the socket file
        argv = [FIREFOX, "--headless", "--no-remote", "--profile", str(profile),
                f"--remote-debugging-port={self.port}", self.url]
        self.proc = ns_popen(self.ns, argv, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
                             env={"HOME": str(self.dir), "PATH": "/usr/bin:/bin", "MOZ_HEADLESS": "1",
                                  "PULSE_SERVER": f"unix:{sock}", "XDG_RUNTIME_DIR": str(self.dir)})

    def stop(self) -> None:
        for proc in (self.proc, self.pulse):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(self.dir / "profile", ignore_errors=True)

    # -- WebDriver BiDi (run these in the namespace: its loopback holds the port) ---------------

    async def connect(self, timeout: float = 30.0) -> None:
        """Open the BiDi session and find the page's browsing context."""
        self._http = aiohttp.ClientSession()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._ws = await self._http.ws_connect(f"ws://127.0.0.1:{self.port}/session", max_msg_size=0)
                break
            except (aiohttp.ClientError, OSError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Firefox's remote agent did not come up (log: {self.log})") from None
                await asyncio.sleep(0.3)  # pacing the reconnect while Firefox starts
        await self._call("session.new", capabilities={})
        while self._context is None:
            tree = await self._call("browsingContext.getTree")
            contexts = [c for c in tree.get("contexts", []) if c.get("url", "").startswith("http")]
            if contexts:
                self._context = contexts[0]["context"]
            elif time.monotonic() > deadline:
                raise TimeoutError(f"Firefox did not open {self.url}")
            else:
                await asyncio.sleep(0.3)  # pacing the poll of the browsing contexts

    async def _call(self, method: str, **params: Any) -> dict:
        assert self._ws is not None
        msg_id = next(self._ids)
        await self._ws.send_json({"id": msg_id, "method": method, "params": params})
        while True:
            msg = await self._ws.receive_json(timeout=20)
            if msg.get("id") == msg_id:
                if msg.get("type") == "error":
                    raise RuntimeError(f"{method}: {msg.get('error')}: {msg.get('message')}")
                return msg.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited; JSON-like values)."""
        res = await self._call("script.evaluate", expression=expression, awaitPromise=True,
                               target={"context": self._context})
        if res.get("type") == "exception":
            raise RuntimeError(f"page script failed: {res.get('exceptionDetails', {}).get('text')}")
        return res.get("result", {}).get("value")

    async def close(self) -> None:
        if self._ws is not None:
            try:
                await self._call("session.end")
            except (RuntimeError, aiohttp.ClientError, TimeoutError):
                pass
            await self._ws.close()
        if self._http is not None:
            await self._http.close()

    def save_artifacts(self, name: str, report: dict) -> Path:
        out = ARTIFACTS / name
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1))
        if self.log.exists():
            shutil.copy(self.log, out / "firefox.log")
        return out
