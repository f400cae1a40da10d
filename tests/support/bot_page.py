"""Chromium on relayd's "talk to the agent" page, talking to a Pipecat bot
(examples/pipecat_bot.py) and recording what it hears.

The page is left as it is; a probe, evaluated before the call starts, wraps
the browser's own APIs:

- the microphone (a fake device looping a WAV of speech) without voice
  processing, so the bot hears the file's speech;
- the remote audio track, recorded as 48 kHz s16 chunks stamped with
  ``performance.now()`` (Web Audio, as the page's own meter listens);
- the data channel: a ``{"type": "state"}`` message every 300 ms; the
  bot's last answer (its turn count and conversation) is kept, and the turn
  counts it answered, in order (a bot that lost its state would count again
  from 0), each with the page's time it was first answered.

`RECORDER` (the probe less its start of the call) works on any page whose
call is an RTCPeerConnection (tests/support/pipecat_prebuilt.py uses it);
`answered` waits for the bot's next turn whose reply the browser heard.

Run every method on a NetnsExecutor thread of the lab's client namespace.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

from tests.support.chromium import Chromium
from tests.support.interop_clients import BrowserClient
from tests.support.paths import REPO
from tests.support.speech import RATE, spectral_centroid, voiced
from tests.support.waiting import eventually_async

BOT = f"{REPO / 'examples' / 'pipecat_bot.py'}:make_pipeline"
SENTENCE = "hello there how are you today"  # no comma: one utterance (one turn) a loop, for the VAD
PITCH = (1.25, 1.75)  # the reply's spectral centroid against the sentence's (the bot plays it 1.5x higher)
PAUSE_S = 2.5  # silence after the sentence in each loop of the microphone: the VAD's stop, then the reply
TURN_TIMEOUT = 25.0  # a turn is one loop (~5 s); the first also waits for the call to connect
# A turn's reply, as the browser hears it: the bot answers the data channel after it has
# pushed the reply's audio (paced to real time), so the page sees the turn about when the
# reply ends. The window: from well before that to after it; the replies before and after
# it are more than 3 s away (one a loop).
REPLY_LEAD_S = 2.0
REPLY_WINDOW_S = 3.0

# The recorder: what the browser hears, and the bot's answers (any page with an RTCPeerConnection).
RECORDER = """(() => {
  const bot = window.bot = {replies: 0, last: null, turns: [], turn_at: {}, chunks: []};
  const md = navigator.mediaDevices, original = md.getUserMedia.bind(md);
  md.getUserMedia = () => original({audio: {echoCancellation: false, noiseSuppression: false,
                                            autoGainControl: false}});
  const Original = window.RTCPeerConnection;
  window.RTCPeerConnection = function (config) {
    const pc = new Original(config);
    bot.pc = pc;
    pc.addEventListener("track", (e) => record(e.track));
    const create = pc.createDataChannel.bind(pc);
    pc.createDataChannel = (label, options) => {
      const dc = create(label, options);
      dc.addEventListener("message", (e) => {
        let m = null;
        try { m = JSON.parse(e.data); } catch (_) { return; }
        if (m && m.turns !== undefined) {
          bot.last = m;
          bot.replies += 1;
          if (bot.turns[bot.turns.length - 1] !== m.turns) {
            bot.turns.push(m.turns);
            bot.turn_at[m.turns] = performance.now();
          }
        }
      });
      dc.addEventListener("open", () => {
        const ask = setInterval(() => {
          if (dc.readyState !== "open") { clearInterval(ask); return; }
          dc.send(JSON.stringify({type: "state"}));
        }, 300);
      });
      return dc;
    };
    return pc;
  };
  function record(track) {
    const ctx = new AudioContext({sampleRate: 48000});
    const node = ctx.createScriptProcessor(4096, 1, 1);
    node.onaudioprocess = (e) => {
      const x = e.inputBuffer.getChannelData(0), pcm = new Int16Array(x.length);
      for (let i = 0; i < x.length; i++) pcm[i] = Math.max(-32768, Math.min(32767, Math.round(x[i] * 32767)));
      bot.chunks.push([performance.now(), pcm]);
      if (bot.chunks.length > 1200) bot.chunks.shift();  // the last ~100 s
    };
    ctx.createMediaStreamSource(new MediaStream([track])).connect(node);
    node.connect(ctx.destination);  // a script processor runs only when connected
  }
  bot.heard = (since) => {
    const parts = bot.chunks.filter((c) => c[0] >= since).map((c) => c[1]);
    const all = new Int16Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) { all.set(p, at); at += p.length; }
    const bytes = new Uint8Array(all.buffer);
    let s = "";
    for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    return btoa(s);
  };
})();
"""
PROBE = RECORDER + 'document.getElementById("talk").click(); true'  # relayd's page: start its call


class BotPage(BrowserClient):
    """One Chromium call to the bot (see the module docstring)."""

    probe = PROBE

    def __init__(self, ns: str, url: str, mic: Path) -> None:
        super().__init__(Chromium(ns, f"{url}/", origin=url, mic=mic))
        self.report: dict = {}

    async def now(self) -> float:
        """The page's clock (ms), to mark a moment of the call."""
        return await self.browser.evaluate("performance.now()")

    async def state(self) -> dict:
        """The page's report (window.splitrelay), the bot's last answer under "bot",
        the turn counts answered so far under "turns", and when each was first
        answered under "turn_at" ({turn: page time in ms})."""
        raw = await self.browser.evaluate("JSON.stringify({...window.splitrelay, bot: window.bot.last, "
                                          "turns: window.bot.turns, turn_at: window.bot.turn_at})")
        self.report = json.loads(raw)
        if self.report.get("error"):
            raise AssertionError(f"the page failed: {self.report['error']}")
        return self.report

    async def heard(self, since_ms: float) -> np.ndarray:
        """What the browser heard of the bot since the page's time ``since_ms`` (48 kHz s16)."""
        b64 = await self.browser.evaluate(f"window.bot.heard({since_ms})")
        return np.frombuffer(base64.b64decode(b64), dtype=np.int16)

    def save_artifacts(self, name: str) -> Path:
        return self.browser.save_artifacts(name, self.report, "")


async def reply_heard(page: BotPage, at_ms: float) -> tuple[np.ndarray] | None:
    """(the voiced audio the browser heard around the turn the page saw at
    `at_ms`,) once that reply's window is recorded; None before that."""
    heard = await page.heard(at_ms - REPLY_LEAD_S * 1000)
    if len(heard) < REPLY_WINDOW_S * RATE:
        return None
    return (voiced(heard[: int(REPLY_WINDOW_S * RATE)]),)


async def answered(page: BotPage, said: np.ndarray, since_ms: float) -> dict:
    """The first turn the bot completed after the page's time `since_ms`
    whose reply the browser heard (60% of the sentence's voice, 1.5x faster);
    the bot's state and the reply's figures. One turn with a shorter reply is
    skipped: the bot heard part of an utterance (the first loop of the
    microphone starts before the call connects; a move may cut one)."""
    expected_s = len(voiced(said)) / RATE / 1.5
    short: list[tuple[int, float]] = []
    while True:
        async def new_turn():
            report = await page.state()
            done = {t for t, _ in short}
            turns = [int(t) for t, at in report["turn_at"].items()
                     if int(t) > 0 and at >= since_ms and int(t) not in done]
            return (report, min(turns)) if turns and report["state"] == "connected" else None

        report, turn = await eventually_async(new_turn, TURN_TIMEOUT, what="a turn of the bot", interval=0.3)
        at = report["turn_at"][str(turn)]
        (reply,) = await eventually_async(lambda at=at: reply_heard(page, at), REPLY_WINDOW_S + 5,
                                          what=f"turn {turn}'s reply recorded", interval=0.3)
        if len(reply) / RATE >= 0.6 * expected_s:
            break
        short.append((turn, round(len(reply) / RATE, 2)))
        assert len(short) < 2, f"replies shorter than {0.6 * expected_s:.2f} s (turn, seconds heard): {short}"
    report = await page.state()
    bot = report["bot"]
    context = bot["context"]
    # The context is the bot's whole conversation: two messages a turn, from turn 1.
    assert len(context) == 2 * bot["turns"] and context[0]["content"].startswith("turn 1:"), bot
    return {"turn": turn, "turns": bot["turns"], "context": context, "path": report.get("path"),
            "counted": report["turns"], "short": short,
            "ratio": round(spectral_centroid(reply) / spectral_centroid(voiced(said)), 2),
            "reply_s": round(len(reply) / RATE, 2)}
