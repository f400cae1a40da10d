"""Pipecat's prebuilt browser client (PyPI `pipecat-ai-small-webrtc-prebuilt`)
in front of the relay, as a deployer serves it.

The prebuilt page calls its own origin: `POST /start`, then its offer and
trickled candidates at `/sessions/{sessionId}/api/offer`. `PrebuiltFront`
serves the package's static files as installed and passes those paths on to
relayd unchanged (a reverse proxy on the page's origin), keeping every
exchange (method, path, JSON body, status) so a test can check the shapes
the client sent.

The page's own device set-up cannot run offline: Pipecat's SmallWebRTC
transport gets the microphone through `DailyMediaManager` (daily-js), which
loads Daily's call-machine bundle from Daily's CDN at run time (see
docs/pipecat.md). `PrebuiltPage` therefore drives the same bundle's
`SmallWebRTCTransport`, unmodified, from the prebuilt page, with the
`WavMediaManager` that bundle also ships (a plain getUserMedia microphone),
through the page's own endpoints and start parameters.

Run every method on a NetnsExecutor thread of the lab's client namespace.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.support.bot_page import RECORDER, BotPage
from tests.support.waiting import eventually_async

PACKAGE = "pipecat_ai_small_webrtc_prebuilt"
RELAYED = ("/start", "/api/offer", "/sessions/{session_id}/api/offer")


def prebuilt_dist() -> Path:
    """The prebuilt client's static files, as the package installed them."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{PACKAGE} is not installed: run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))) / "client" / "dist"


def transport_module(dist: Path) -> str:
    """The page-relative URL of the bundle that exports SmallWebRTCTransport."""
    for path in sorted((dist / "assets").glob("*.js")):
        if "as SmallWebRTCTransport" in path.read_text(errors="replace"):
            return f"./assets/{path.name}"
    raise RuntimeError(f"no SmallWebRTCTransport bundle under {dist / 'assets'}")


def page_config(dist: Path) -> dict[str, Any]:
    """The props the page's app is rendered with (its index bundle's last line):
    {"startBotParams": {"endpoint", "requestData"}, "transportType", "transportOptions"}."""
    for path in sorted((dist / "assets").glob("index-*.js")):
        found = re.search(r'\(\w+,(\{startBotParams:.*?\})\)\}\)\}\)', path.read_text(errors="replace"))
        if found:
            # A minified object literal of names, strings and booleans (!0, !1): as JSON.
            literal = re.sub(r'([{,])(\w+):', r'\1"\2":', found.group(1))
            return json.loads(literal.replace("!0", "true").replace("!1", "false"))
    raise RuntimeError(f"no startBotParams in {dist / 'assets'}")


class PrebuiltFront:
    """The prebuilt page's origin: its static files, and its signaling paths proxied to relayd."""

    def __init__(self, relay_url: str, dist: Path, host: str = "127.0.0.1", port: int = 8390) -> None:
        self.relay_url, self.dist, self.host, self.port = relay_url.rstrip("/"), dist, host, port
        self.url = f"http://{host}:{port}"
        self.exchanges: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        app = web.Application()
        for path in RELAYED:
            app.router.add_route("POST", path, self._relay)
            app.router.add_route("PATCH", path, self._relay)
        app.router.add_get("/", self._index)
        app.router.add_static("/", self.dist)
        self._http = aiohttp.ClientSession()
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()

    async def _index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(self.dist / "index.html")

    async def _relay(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "authorization")}
        assert self._http is not None
        async with self._http.request(request.method, self.relay_url + request.path_qs, data=body,
                                      headers=headers) as res:
            answer = await res.read()
            self.exchanges.append({"method": request.method, "path": request.path, "status": res.status,
                                   "request": _json(body), "response": _json(answer)})
            return web.Response(status=res.status, body=answer, content_type=res.content_type)


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw[:200].decode(errors="replace")


# The prebuilt page's connect flow, with the page's own PipecatClient class (taken from the
# client the page's React tree holds: the bundle does not export it) over the transport its
# bundle ships (SmallWebRTCTransport with WavMediaManager) and the page's own transportOptions
# and startBotParams, step for step as the page's connect handler runs it: initDevices (on
# mount), startBot (POST the start body), the answer's iceConfig to the transport, then
# connect(), which sends RTVI's client-ready and resolves on the bot's bot-ready.
# `window.pipecat` reports: the transport's states, the RTVI events the client's callbacks saw,
# bot-ready's data (`ready`), the bot's server-messages and its answer to a client request.
DRIVER = """(async () => {
  const report = window.pipecat = {error: null, states: [], rtvi: [], ready: null, messages: [], answer: null};
  try {
    const {SmallWebRTCTransport, WavMediaManager} = await import(%(module)s);
    const page = %(page)s;
    const PipecatClient = (await pageClient()).constructor;
    const transport = report.transport = new SmallWebRTCTransport({
      ...page.transportOptions, mediaManager: new WavMediaManager()});
    const seen = (name) => () => report.rtvi.push(name);
    const client = report.client = new PipecatClient({enableMic: true, enableCam: false, transport, callbacks: {
      onTrackStarted: play, onTransportStateChanged: (s) => report.states.push(s), onBotReady: seen("bot-ready"),
      onBotStartedSpeaking: seen("bot-started-speaking"), onBotStoppedSpeaking: seen("bot-stopped-speaking"),
      onServerMessage: (data) => report.messages.push(data),
      onMessageError: (m) => report.rtvi.push(`message-error ${JSON.stringify(m.data)}`),
      onError: (m) => report.rtvi.push(`error ${JSON.stringify(m.data)}`)}});
    await client.initDevices();
    const started = await client.startBot({requestData: {}, ...page.startBotParams});
    if (started && typeof started === "object" && "iceConfig" in started)
      transport.iceServers = started.iceConfig.iceServers;
    report.ready = await client.connect(started);
  } catch (e) {
    report.error = String(e && e.stack || e);
  }

  // The PipecatClient the page made (its provider's `client` prop), found on its React tree.
  async function pageClient() {
    for (let tries = 0; tries < 200; tries++) {
      const root = document.getElementById("root");
      const key = Object.keys(root).find((k) => k.startsWith("__reactContainer$"));
      const stack = key ? [root[key]] : [];
      while (stack.length) {
        const fiber = stack.pop();
        if (!fiber) continue;
        const client = fiber.memoizedProps && fiber.memoizedProps.client;
        if (client && typeof client.startBotAndConnect === "function") return client;
        stack.push(fiber.child, fiber.sibling);
      }
      await new Promise((r) => setTimeout(r, 100));  // pacing: the page makes its client on mount
    }
    throw new Error("no PipecatClient on the prebuilt page's React tree");
  }
  // The bot's audio plays in an <audio> element, as the page's PipecatClientAudio plays it
  // (Chromium hands Web Audio a remote track's samples only while a media element plays it).
  function play(track) {
    if (track.kind !== "audio") return;
    const audio = document.createElement("audio");
    audio.autoplay = true;
    audio.srcObject = new MediaStream([track]);
    document.body.appendChild(audio);
  }
})();
true"""


class PrebuiltPage(BotPage):
    """Chromium on the prebuilt page (served by a PrebuiltFront), talking to the bot."""

    def __init__(self, ns: str, front: PrebuiltFront, mic: Path) -> None:
        super().__init__(ns, front.url, mic)
        self.config = page_config(front.dist)
        self.probe = RECORDER + DRIVER % {"module": json.dumps(transport_module(front.dist)),
                                          "page": json.dumps(self.config)}

    async def start(self) -> None:
        self.browser.start()
        await self.browser.connect()

        async def loaded() -> bool:
            return await self.browser.evaluate("document.readyState === 'complete' && "
                                               "!!document.querySelector('#root > *')")

        await eventually_async(loaded, 20, what="the prebuilt page to load", interval=0.2)
        await self.browser.evaluate(self.probe)

    async def state(self) -> dict:
        """As BotPage.state: "state" is the peer connection's, "transport" the Pipecat transport's."""
        raw = await self.browser.evaluate(
            "JSON.stringify({state: window.bot.pc ? window.bot.pc.connectionState : 'new', "
            "transport: window.pipecat.transport && window.pipecat.transport.state, "
            "error: window.pipecat.error, rtvi: window.pipecat.rtvi, ready: window.pipecat.ready, "
            "states: window.pipecat.states, messages: window.pipecat.messages, "
            "bot: window.bot.last, turns: window.bot.turns, turn_at: window.bot.turn_at})")
        self.report = json.loads(raw)
        if self.report.get("error"):
            raise AssertionError(f"the page failed: {self.report['error']}")
        return self.report

    async def ready(self) -> dict | None:
        """bot-ready's data once the client's connect() has resolved with it; None before."""
        return (await self.state())["ready"]

    async def request(self, type_: str, data=None) -> dict:
        """The bot's answer to an RTVI client request (PipecatClient.sendClientRequest)."""
        return await self.browser.evaluate(
            f"window.pipecat.client.sendClientRequest({json.dumps(type_)}, {json.dumps(data)})")

    async def stop(self) -> None:
        try:
            await self.browser.evaluate("window.pipecat.client && window.pipecat.client.disconnect()")
        except Exception:  # the page may be gone already; BotPage.stop ends the browser either way
            pass
        await super().stop()
