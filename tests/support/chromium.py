"""Debian's Chromium, headless, in a lab namespace, driven over the DevTools
protocol (a websocket; no driver binary): it opens relayd's "talk to the
agent" page, whose microphone is a fake device playing a WAV file, and the
tests read `window.splitrelay` (manager/relay/page.py) as the call goes.

On failure `save_artifacts` keeps a screenshot of the page, the browser's
console and its own log under test-artifacts/<name>/."""

from __future__ import annotations

import array
import base64
import contextlib
import itertools
import json
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from manager.lab.netns import ns_popen
from tests.support.paths import ARTIFACTS
from tests.support.speech import write_wav
from tests.support.waiting import NotYet, eventually_async

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def tone_wav(path: Path, freq: float = 440.0, seconds: float = 10.0, rate: int = 48000) -> Path:
    """A mono 16-bit WAV of a sine tone (Chromium loops it as the microphone)."""
    samples = array.array("h", (int(12000 * math.sin(2 * math.pi * freq * i / rate)) for i in range(int(rate * seconds))))
    return write_wav(path, samples.tobytes(), rate)


class Chromium:
    """One headless Chromium in network namespace `ns` (see the module docstring)."""

    def __init__(self, ns: str, url: str, *, origin: str, port: int = 9222, mic: Path | None = None) -> None:
        """`mic`: the WAV the fake microphone loops (None: a 440 Hz tone)."""
        self.ns, self.url, self.origin, self.port, self.mic = ns, url, origin, port, mic
        self.dir = Path(tempfile.mkdtemp(prefix="chromium-"))
        self.log = self.dir / "chromium.log"
        self.proc: subprocess.Popen | None = None
        self.console: list[str] = []
        self._ids = itertools.count(1)

    def start(self) -> None:
        wav = self.mic or tone_wav(self.dir / "mic.wav")
        argv = [
            CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={self.dir / 'profile'}", f"--remote-debugging-port={self.port}",
            "--remote-allow-origins=*",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
            # The lab's page is plain http on a private address: let it use the microphone.
            f"--unsafely-treat-insecure-origin-as-secure={self.origin}",
            "--window-size=800,700", *os.environ.get("SPLITRELAY_CHROMIUM_FLAGS", "").split(), self.url,
        ]
        self.proc = ns_popen(self.ns, argv, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir / "profile", ignore_errors=True)

    # -- DevTools (run these in the namespace: its loopback holds the port) -------------------

    async def _page_ws(self, http: aiohttp.ClientSession, timeout: float = 20.0) -> str:
        async def page() -> str | None:
            async with http.get(f"http://127.0.0.1:{self.port}/json/list") as r:
                return next((t["webSocketDebuggerUrl"] for t in await r.json()
                             if t.get("type") == "page" and t.get("webSocketDebuggerUrl")), None)

        return await eventually_async(page, timeout, what=f"Chromium's DevTools page (log: {self.log})",
                                      interval=0.2)

    async def _call(self, ws: aiohttp.ClientWebSocketResponse, method: str, **params: Any) -> dict:
        msg_id = next(self._ids)
        await ws.send_json({"id": msg_id, "method": method, "params": params})
        while True:
            msg = await ws.receive_json(timeout=20)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._event(msg)

    def _event(self, msg: dict) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append(f"console.{params.get('type')}: {text}")
        elif method == "Runtime.exceptionThrown":
            self.console.append(f"exception: {params.get('exceptionDetails', {}).get('text')}")

    async def watch(self, until, timeout: float) -> tuple[dict, str]:
        """Poll `window.splitrelay` until `until(report)` holds or `timeout`;
        returns (the last report, a PNG screenshot as base64)."""
        async with aiohttp.ClientSession() as http:
            url = await self._page_ws(http)
            async with http.ws_connect(url, max_msg_size=0) as ws:
                await self._call(ws, "Runtime.enable")
                report: dict = {}

                async def reported() -> bool:
                    nonlocal report
                    res = await self._call(ws, "Runtime.evaluate", expression="JSON.stringify(window.splitrelay || null)",
                                           returnByValue=True)
                    value = res.get("result", {}).get("value")
                    report = json.loads(value) if value else {}
                    return bool(report) and until(report)

                # A timeout is not a failure here: the caller judges the last report (and keeps the screenshot).
                with contextlib.suppress(NotYet):
                    await eventually_async(reported, timeout, what="the page's report", interval=0.25)
                shot = (await self._call(ws, "Page.captureScreenshot", format="png")).get("data", "")
                await self._call(ws, "Runtime.evaluate", expression="window.splitrelayHangup && splitrelayHangup()",
                                 awaitPromise=True)
                return report, shot

    async def connect(self) -> None:
        """Keep one DevTools connection to the page open for `evaluate`."""
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(await self._page_ws(self._http), max_msg_size=0)
        await self._call(self._ws, "Runtime.enable")

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        res = await self._call(self._ws, "Runtime.evaluate", expression=expression, returnByValue=True,
                               awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails'].get('text')}")
        return res.get("result", {}).get("value")

    async def close(self) -> None:
        if getattr(self, "_ws", None) is not None:
            await self._ws.close()
            await self._http.close()

    def save_artifacts(self, name: str, report: dict, screenshot_b64: str) -> Path:
        out = ARTIFACTS / name
        out.mkdir(parents=True, exist_ok=True)
        if screenshot_b64:
            (out / "page.png").write_bytes(base64.b64decode(screenshot_b64))
        (out / "report.json").write_text(json.dumps(report, indent=1))
        (out / "console.log").write_text("\n".join(self.console) + "\n")
        if self.log.exists():
            shutil.copy(self.log, out / "chromium.log")
        return out
