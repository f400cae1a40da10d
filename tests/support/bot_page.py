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

Run every method on a NetnsExecutor thread of the lab's client namespace.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

from tests.support.chromium import Chromium
from tests.support.interop_clients import BrowserClient

PROBE = """(() => {
  const bot = window.bot = {replies: 0, last: null, turns: [], turn_at: {}, chunks: []};
  const md = navigator.mediaDevices, original = md.getUserMedia.bind(md);
  md.getUserMedia = () => original({audio: {echoCancellation: false, noiseSuppression: false,
                                            autoGainControl: false}});
  const Original = window.RTCPeerConnection;
  window.RTCPeerConnection = function (config) {
    const pc = new Original(config);
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
  document.getElementById("talk").click();
  return true;
})()"""


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
