"""The "talk to the agent" page relayd serves at `/` when `signaling.page` is
on (off by default: a production relay serves an application's own page).

One plain HTML file, no build step, no third-party script: the browser's own
WebRTC places a call through `POST /v1/calls` of the same origin (with an
optional client token), plays the agent's audio back, sends data-channel
pings, and shows live statistics from `getStats()`: round trip, jitter, loss,
and the path the call took (UDP or TCP, IPv4 or IPv6). `window.splitrelay`
holds the same figures for tests that drive the page in Chromium.

Query parameters: `autostart=1` (call at once), `messages=N` (data-channel
pings, one per 200 ms), `token=...` (a client credential).
"""

PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>splitrelay: talk to the agent</title>
<style>
  body { font: 16px/1.4 system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; }
  button { font-size: 1.1rem; padding: .5rem 1.2rem; }
  table { border-collapse: collapse; margin-top: 1rem; }
  td { padding: .15rem .8rem .15rem 0; }
  td:first-child { color: #555; }
  #state { font-weight: bold; }
  #level { width: 12rem; height: .6rem; }
</style>
</head>
<body>
<h1>Talk to the agent</h1>
<p>The agent answers with what it hears (an echo agent stands in for the voice model).</p>
<p><button id="talk">Talk to the agent</button> <button id="hangup" disabled>Hang up</button>
   <input id="token" placeholder="client token (if required)" size="28"></p>
<table>
  <tr><td>state</td><td id="state">idle</td></tr>
  <tr><td>path</td><td id="path">-</td></tr>
  <tr><td>round trip</td><td id="rtt">-</td></tr>
  <tr><td>jitter</td><td id="jitter">-</td></tr>
  <tr><td>packets lost</td><td id="lost">-</td></tr>
  <tr><td>agent audio</td><td><meter id="level" min="0" max="0.5"></meter></td></tr>
  <tr><td>data channel</td><td id="dc">-</td></tr>
</table>
<audio id="remote" autoplay></audio>
<script>
"use strict";
const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const report = window.splitrelay = {
  state: "idle", error: null, path: null, rtt_ms: null, jitter_ms: null, lost: null,
  level: 0, peak_hz: null, dc_sent: 0, dc_echoed: 0, dc_rtt_ms: [], connected_ms: null, pairs: [],
};
let pc = null, callUrl = null, timer = null, auth = {};

function show(name, value) { $(name).textContent = value; }
function setState(s) { report.state = s; show("state", s); }

async function talk() {
  $("talk").disabled = true;
  setState("starting");
  const t0 = performance.now();
  try {
    const mic = await navigator.mediaDevices.getUserMedia({ audio: true });
    pc = new RTCPeerConnection({ iceServers: [] });
    mic.getTracks().forEach((t) => pc.addTrack(t, mic));
    const dc = pc.createDataChannel("agent");
    const sentAt = new Map();
    dc.onmessage = (e) => {
      if (sentAt.has(e.data)) {
        report.dc_rtt_ms.push(performance.now() - sentAt.get(e.data));
        sentAt.delete(e.data);
        report.dc_echoed += 1;
        show("dc", `${report.dc_echoed}/${report.dc_sent} echoed`);
      }
    };
    dc.onopen = () => {
      const n = Number(params.get("messages") || 3);
      let i = 0;
      const ping = setInterval(() => {
        if (i >= n || dc.readyState !== "open") { clearInterval(ping); return; }
        const tag = `ping-${i++}-${Math.random().toString(36).slice(2)}`;
        sentAt.set(tag, performance.now());
        dc.send(tag);
        report.dc_sent += 1;
      }, 200);
    };
    pc.ontrack = (e) => { $("remote").srcObject = e.streams[0] || new MediaStream([e.track]); listen(e.track); };
    pc.onconnectionstatechange = () => {
      setState(pc.connectionState);
      if (pc.connectionState === "connected" && report.connected_ms === null) {
        report.connected_ms = Math.round(performance.now() - t0);
      }
    };
    await pc.setLocalDescription(await pc.createOffer());
    const headers = { "Content-Type": "application/sdp" };
    const token = $("token").value || params.get("token");
    if (token) auth = { "Authorization": `Bearer ${token}` };
    Object.assign(headers, auth);
    const resp = await fetch("/v1/calls", { method: "POST", headers, body: pc.localDescription.sdp });
    const body = await resp.text();
    if (resp.status !== 201) {
      let detail = body.trim();
      try { detail = JSON.parse(body).detail || detail; } catch (e) { /* not a problem document */ }
      throw new Error(`signaling answered ${resp.status}: ${detail}`);
    }
    callUrl = new URL(resp.headers.get("Location"), location.href).href;
    await pc.setRemoteDescription({ type: "answer", sdp: body });
    $("hangup").disabled = false;
    timer = setInterval(stats, 1000);
  } catch (err) {
    report.error = String(err);
    setState("failed: " + err);
    $("talk").disabled = false;
  }
}

function listen(track) {
  // The agent's audio, as heard: its level and its strongest frequency.
  const ctx = new AudioContext();
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 4096;
  ctx.createMediaStreamSource(new MediaStream([track])).connect(analyser);
  const wave = new Float32Array(analyser.fftSize);
  const spectrum = new Float32Array(analyser.frequencyBinCount);
  setInterval(() => {
    analyser.getFloatTimeDomainData(wave);
    let sum = 0;
    for (const x of wave) sum += x * x;
    report.level = Math.sqrt(sum / wave.length);
    $("level").value = report.level;
    analyser.getFloatFrequencyData(spectrum);
    let best = 0;
    for (let i = 1; i < spectrum.length; i++) if (spectrum[i] > spectrum[best]) best = i;
    report.peak_hz = report.level > 0.001 ? Math.round(best * ctx.sampleRate / analyser.fftSize) : null;
  }, 250);
}

async function stats() {
  if (!pc) return;
  const all = await pc.getStats();
  let pair = null;
  all.forEach((s) => {
    if (s.type === "transport" && s.selectedCandidatePairId) pair = all.get(s.selectedCandidatePairId);
  });
  if (!pair) {
    all.forEach((s) => { if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") pair = s; });
  }
  if (pair) {
    const remote = all.get(pair.remoteCandidateId);
    if (remote) {
      const addr = remote.address || remote.ip || "";
      const family = addr.includes(":") ? "IPv6" : "IPv4";
      report.path = `${(remote.protocol || "?").toUpperCase()} ${family} to ${addr}:${remote.port}`;
      show("path", report.path);
    }
    if (pair.currentRoundTripTime !== undefined) {
      report.rtt_ms = Math.round(pair.currentRoundTripTime * 1000 * 10) / 10;
      show("rtt", `${report.rtt_ms} ms`);
    }
  }
  report.pairs = [];
  all.forEach((s) => {
    if (s.type !== "candidate-pair") return;
    const l = all.get(s.localCandidateId) || {}, r = all.get(s.remoteCandidateId) || {};
    const local = `${l.protocol}/${l.tcpType || "-"} ${l.address}:${l.port}`;
    report.pairs.push(`${local} -> ${r.protocol} ${r.address}:${r.port} ${s.state}`);
  });
  all.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio") {
      report.jitter_ms = Math.round((s.jitter || 0) * 1000 * 10) / 10;
      report.lost = s.packetsLost;
      show("jitter", `${report.jitter_ms} ms`);
      show("lost", `${report.lost}`);
    }
  });
}

async function hangup() {
  clearInterval(timer);
  if (callUrl) await fetch(callUrl, { method: "DELETE", headers: auth }).catch(() => {});
  if (pc) pc.close();
  pc = null; callUrl = null;
  setState("ended");
  $("hangup").disabled = true;
  $("talk").disabled = false;
}

$("talk").onclick = talk;
$("hangup").onclick = hangup;
window.splitrelayHangup = hangup;
if (params.get("autostart") === "1") talk();
</script>
</body>
</html>
"""
