"""New Chromium calls through a lab on demand, timed as the page sees them.

Chromium is started and relayd's page loaded ahead (a browser's start-up is
not the call's), then each `call()` clicks "talk" and reads, from the page's
own clock: the offer's POST to the RTCPeerConnection reaching `connected`,
the click to `connected` (microphone included), and whether the agent's echo
came back (its tone heard, a data-channel ping echoed). The benchmarks place
these calls into a running flood.

    caller = BrowserCaller(lab); caller.start()
    result = caller.call()   # a dict, see BrowserCaller.call
    caller.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from manager.lab.netns import NetnsExecutor
from tests.support.chromium import Chromium
from tests.support.interop_clients import PROBE, BrowserClient
from tests.support.waiting import Hopeless, NotYet, eventually_async

# Notes the moment the page POSTs its offer (the page's own clock), and clears
# the previous call's figures so the page reports this call's.
TIMING = """(() => {
  const r = window.splitrelay;
  Object.assign(r, {connected_ms: null, error: null, dc_sent: 0, dc_echoed: 0, peak_hz: null, level: 0,
                    path: null, post_ms: null, click_ms: performance.now()});
  if (!window.splitrelayTimed) {
    const f = window.fetch;
    window.fetch = (url, opts) => {
      if (opts && opts.method === "POST" && r.post_ms === null) r.post_ms = performance.now();
      return f(url, opts);
    };
    window.splitrelayTimed = true;
  }
  return true;
})()"""
CLICK = "document.getElementById('talk').click(), true"


class BrowserCaller:
    """One headless Chromium on relayd's page in the lab's client namespace,
    driven from an event loop on a thread of that namespace."""

    def __init__(self, lab, messages: int = 2) -> None:
        url = lab.signaling_url
        self.client = BrowserClient(Chromium(lab.client_ns, f"{url}/?messages={messages}", origin=url))
        self.client.probe = "true"  # load the page only: each call() starts its call
        self._probed = False
        self._ex = NetnsExecutor(lab.client_ns)
        self._loop = asyncio.new_event_loop()
        self._ex.submit(self._loop.run_forever)

    def _run(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> None:
        self._run(self.client.start(), 60)

    def call(self, connect_timeout: float = 15.0, media_timeout: float = 10.0) -> dict:
        """Place one call, wait for `connected` and for the echo, hang up.
        post_to_connected_s: the offer's POST to `connected`; page_to_connected_s:
        the click (getUserMedia, offer) to `connected`; echo_ok: the agent's
        echo carried the sent tone and a ping came back (echo_after_s: the click to
        that); path: as the page names it; None where not reached."""
        return self._run(self._call(connect_timeout, media_timeout), connect_timeout + media_timeout + 20)

    async def _call(self, connect_timeout: float, media_timeout: float) -> dict:
        b = self.client.browser
        await b.evaluate(TIMING)
        await b.evaluate(CLICK if self._probed else PROBE)
        self._probed = True
        t0 = time.monotonic()
        out: dict = {"post_to_connected_s": None, "page_to_connected_s": None, "echo_ok": False,
                     "echo_after_s": None, "path": None, "error": None}
        try:
            async def connected() -> bool:
                r = await self.client.status()
                if r.error:
                    raise Hopeless(r.error)  # the page gave up: no use waiting
                return r.connected and self.client.last.get("connected_ms") is not None
            await eventually_async(connected, connect_timeout, what="the browser call connected", interval=0.05)
            page = self.client.last
            at = page["click_ms"] + page["connected_ms"]  # the page's t0 is the click's handler
            out["page_to_connected_s"] = round(page["connected_ms"] / 1000, 3)
            out["post_to_connected_s"] = round((at - page["post_ms"]) / 1000, 3)

            async def echoed() -> bool:
                r = await self.client.status()
                return r.tone_ok and r.dc_echoed >= 1
            await eventually_async(echoed, media_timeout, what="the agent's echo at the browser", interval=0.1)
            out["echo_ok"], out["echo_after_s"] = True, round(time.monotonic() - t0, 2)
            # The path the call took (UDP or TCP), from the page's stats, read once a second.
            with contextlib.suppress(NotYet):
                await eventually_async(self._path, 3, what="the call's path", interval=0.2)
        except (NotYet, Hopeless) as e:
            out["error"] = str(e)
        finally:
            out["path"] = self.client.last.get("path")
            await b.evaluate("window.splitrelayHangup && splitrelayHangup()")
        return out

    async def _path(self) -> str | None:
        await self.client.status()
        return self.client.last.get("path")

    def stop(self) -> None:
        try:
            self._run(self.client.stop(), 30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._ex.shutdown()

