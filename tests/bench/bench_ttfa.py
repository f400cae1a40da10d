"""Time to first audio: from the offer's POST to the first echoed audio frame
at the client, in the lab (relayd with XDP, the echo agent on a transceiver).

    sudo .venv/bin/python -m tests.bench.bench_ttfa [--calls 20] [--clients aiortc chromium] [--json]

Two clients, one after the other, each placing N calls in a row (one at a
time, so each call's figure is its own):

- aiortc (what a Python client does: `RTCPeerConnection`, a tone track and a
  data channel, the offer POSTed once aiortc's setLocalDescription returns);
- Chromium (headless, in the client namespace, on relayd's page, with its
  fake microphone playing a tone): the page's own way, the offer POSTed right
  after setLocalDescription, before Chromium has gathered (the relay learns
  its address from its first check).

Each call is cut into phases, all timed at the client on one clock:

    offer     createOffer + setLocalDescription (before the POST; not in the total)
    answer    POST sent → 201 with the answer read
    ice       → ICE connected (the first check pair succeeded, both ways)
    dtls      → DTLS connected (the peer connection "connected")
    audio     → the first echoed frame: the first received frame carrying sound
              (aiortc: a decoded frame above silence; Chromium: an encoded
              frame bigger than Opus's silence, seen by an insertable stream)

total = answer + ice + dtls + audio, p50 and p99 over the calls. Prints figures;
asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import tempfile
import time
from array import array
from pathlib import Path

PHASES = ("answer", "ice", "dtls", "audio")
SOUND = 200  # peak |sample| above which a decoded frame carries the echo (the tone's is 8000; silence 0)
# Calls start this far apart: relayd admits 2 calls/s from one address
# (limits.create_rate), the rest would be refused with 429.
PACE_S = 0.55
OPUS_SILENCE_BYTES = 12  # an encoded frame above this carries sound (libopus codes 20 ms of silence in a few)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    v = sorted(values)
    return {"p50": round(statistics.median(v), 1), "p99": round(v[min(len(v) - 1, int(len(v) * 0.99))], 1),
            "max": round(v[-1], 1)}


def summarise(calls: list[dict]) -> dict:
    ok = [c for c in calls if c.get("error") is None]
    out = {"calls": len(calls), "ok": len(ok), "errors": sorted({c["error"] for c in calls if c.get("error")})}
    out["total_ms"] = percentiles([c["total_ms"] for c in ok])
    out["offer_ms"] = percentiles([c["offer_ms"] for c in ok])
    out["phases_ms"] = {p: percentiles([c["phases_ms"][p] for c in ok]) for p in PHASES}
    if any("heard_ms" in c for c in ok):  # aiortc: its own jitter buffer and decoder after the arrival
        out["heard_ms"] = percentiles([c["heard_ms"] for c in ok])
        out["total_heard_ms"] = percentiles([c["total_ms"] + c["heard_ms"] for c in ok])
    return out


def phases(marks: dict) -> dict:
    """Per-call figures from the marks (ms on the client's clock)."""
    order = ["post", *PHASES]
    return {"offer_ms": round(marks["post"] - marks["offer"], 1),
            "phases_ms": {p: round(marks[p] - marks[order[i]], 1) for i, p in enumerate(order[1:])},
            "total_ms": round(marks["audio"] - marks["post"], 1)}


# --- the aiortc client --------------------------------------------------------------------------

async def aiortc_call(url: str, timeout: float = 10.0) -> dict:
    """One call from aiortc, timed (run it in the client namespace)."""
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    from manager.lab.client import make_tone_track

    now = lambda: time.monotonic() * 1000  # noqa: E731
    marks: dict[str, float] = {}
    heard = asyncio.Event()
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))

    @pc.on("iceconnectionstatechange")
    def _ice() -> None:
        # aiortc's ICE transport is "completed" once aioice's connect() returned
        # (a pair nominated), before DTLS starts.
        if pc.iceConnectionState == "completed" and "ice" not in marks:
            marks["ice"] = now()

    @pc.on("connectionstatechange")
    def _conn() -> None:
        if pc.connectionState == "connected" and "dtls" not in marks:
            marks["dtls"] = now()

    tasks: set[asyncio.Task] = set()

    @pc.on("track")
    def _track(track) -> None:
        async def pull() -> None:
            while not heard.is_set():
                frame = await track.recv()
                if max(map(abs, array("h", bytes(frame.planes[0]))), default=0) > SOUND:
                    marks["heard"] = now()
                    heard.set()
        t = asyncio.get_running_loop().create_task(pull())
        tasks.add(t)

    pc.addTrack(make_tone_track())
    pc.createDataChannel("agent")
    for receiver in (t.receiver for t in pc.getTransceivers()):
        # The echo's arrival: its first RTP packet carrying sound, before
        # aiortc's jitter buffer (where Chromium's insertable stream sees it).
        handle = receiver._handle_rtp_packet

        async def arrived(packet, arrival_time_ms, handle=handle) -> None:
            marks.setdefault("rtp", now())
            if len(packet.payload) > OPUS_SILENCE_BYTES:
                marks.setdefault("audio", now())
            await handle(packet, arrival_time_ms)

        receiver._handle_rtp_packet = arrived
    marks["offer"] = now()
    await pc.setLocalDescription(await pc.createOffer())
    call_url = None
    res: dict = {"error": None}
    async with aiohttp.ClientSession() as http:
        try:
            marks["post"] = now()
            async with http.post(url + "/v1/calls", data=pc.localDescription.sdp,
                                 headers={"Content-Type": "application/sdp"}) as resp:
                body = await resp.text()
                if resp.status != 201:
                    return {"error": f"signaling answered {resp.status}"}
                call_url = str(resp.url.join(aiohttp.client.URL(resp.headers["Location"])))
            marks["answer"] = now()
            await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
            await asyncio.wait_for(heard.wait(), timeout)
            res.update(phases(marks))
            res["heard_ms"] = round(marks["heard"] - marks["audio"], 1)  # aiortc's jitter buffer and decoder
            res["first_rtp_ms"] = round(marks["rtp"] - marks["dtls"], 1)  # any RTP back (the agent's silence)
        except TimeoutError:
            res["error"] = f"no echoed audio within {timeout:g} s (reached {sorted(marks, key=marks.get)[-1]})"
        finally:
            for t in tasks:
                t.cancel()
            if call_url:
                async with http.delete(call_url) as resp:
                    await resp.read()
            await pc.close()
    return res


async def paced(n: int, one) -> list[dict]:
    """`n` calls of `one()`, in a row, started PACE_S apart."""
    out: list[dict] = []
    start = time.monotonic()
    for _ in range(n):
        await asyncio.sleep(max(0.0, start - time.monotonic()))  # pacing: relayd's creation rate
        start = time.monotonic() + PACE_S
        out.append(await one())
    return out


async def aiortc_calls(url: str, n: int) -> list[dict]:
    return await paced(n, lambda: aiortc_call(url))


# --- Chromium -----------------------------------------------------------------------------------

# One call from the page's origin, as the page places it (POST right after
# setLocalDescription), timed with performance.now(); resolves to the marks.
CHROMIUM_CALL = """(async () => {
  const mic = window.__ttfaMic || (window.__ttfaMic = await navigator.mediaDevices.getUserMedia({audio: true}));
  const marks = {}, now = () => performance.now();
  const pc = new RTCPeerConnection({iceServers: [], encodedInsertableStreams: true});
  let heard;
  const done = new Promise((resolve) => { heard = resolve; });
  pc.oniceconnectionstatechange = () => {
    if ((pc.iceConnectionState === "connected" || pc.iceConnectionState === "completed") && !marks.ice) marks.ice = now();
  };
  pc.onconnectionstatechange = () => { if (pc.connectionState === "connected" && !marks.dtls) marks.dtls = now(); };
  mic.getTracks().forEach((t) => pc.addTrack(t, mic));
  pc.createDataChannel("agent");
  pc.ontrack = (e) => {
    const {readable, writable} = e.receiver.createEncodedStreams();
    readable.pipeThrough(new TransformStream({transform(frame, ctl) {
      if (!marks.audio && frame.data.byteLength > %(silence)d) { marks.audio = now(); heard(); }
      ctl.enqueue(frame);
    }})).pipeTo(writable);
  };
  for (const s of pc.getSenders()) {
    const {readable, writable} = s.createEncodedStreams();
    readable.pipeTo(writable);
  }
  marks.offer = now();
  await pc.setLocalDescription(await pc.createOffer());
  marks.post = now();
  const resp = await fetch("/v1/calls", {method: "POST", headers: {"Content-Type": "application/sdp"},
                                         body: pc.localDescription.sdp});
  const body = await resp.text();
  if (resp.status !== 201) { pc.close(); return {error: `signaling answered ${resp.status}`}; }
  marks.answer = now();
  const callUrl = new URL(resp.headers.get("Location"), location.href).href;
  await pc.setRemoteDescription({type: "answer", sdp: body});
  const timeout = new Promise((resolve) => setTimeout(() => resolve("timeout"), %(timeout_ms)d));
  const how = await Promise.race([done, timeout]);
  pc.close();
  await fetch(callUrl, {method: "DELETE"}).catch(() => {});
  return how === "timeout" ? {error: "no echoed audio in time", marks} : {marks};
})()"""


async def chromium_calls(ns: str, url: str, n: int, timeout: float = 10.0) -> list[dict]:
    from tests.support.chromium import Chromium
    from tests.support.waiting import eventually_async

    browser = Chromium(ns, url + "/", origin=url)
    browser.start()
    out = []
    try:
        await browser.connect()

        async def loaded() -> bool:
            return await browser.evaluate(f"location.href.startsWith({url!r}) && document.readyState === 'complete'")

        await eventually_async(loaded, 20, what="relayd's page loaded in Chromium")
        js = CHROMIUM_CALL % {"silence": OPUS_SILENCE_BYTES, "timeout_ms": int(timeout * 1000)}

        async def one() -> dict:
            r = await browser.evaluate(js)
            return {"error": r["error"]} if r.get("error") else {"error": None, **phases(r["marks"])}

        out = await paced(n, one)
    finally:
        await browser.close()
        browser.stop()
    return out


# --- the run ------------------------------------------------------------------------------------

# The lab as it was (aiortc's audio jitter buffer on the transceiver) and as it is.
VARIANTS = {"before": ("--aiortc-audio-buffer",), "after": ()}


def run(calls: int = 20, clients: tuple[str, ...] = ("aiortc", "chromium"), warmup: int = 1,
        variants: dict[str, tuple[str, ...]] = VARIANTS) -> dict:
    """Each variant (transceiver options) in a lab of its own, one after the
    other in this run; each client's calls in a row."""
    from manager.lab.netns import NetnsExecutor
    from manager.lab.services import running_lab

    res: dict = {"calls_per_client": calls, "variants": {}}
    for variant, args in variants.items():
        out = res["variants"][variant] = {"transceiver_args": list(args), "clients": {}}
        with tempfile.TemporaryDirectory() as tmp, \
                running_lab(f"tf{secrets.token_hex(3)}", Path(tmp), transceivers=1, transceiver_args=args) as (lab, _), \
                NetnsExecutor(lab.client_ns) as ex:
            for client in clients:
                print(f"bench_ttfa: {variant}: {calls} calls from {client}", file=sys.stderr, flush=True)
                t0 = time.monotonic()
                if client == "aiortc":
                    per_call = ex.call(asyncio.run, aiortc_calls(lab.signaling_url, calls + warmup))
                else:
                    per_call = ex.call(asyncio.run, chromium_calls(lab.client_ns, lab.signaling_url, calls + warmup))
                # The first call warms what only a first call pays (imports, the page, codecs).
                out["clients"][client] = {**summarise(per_call[warmup:]), "per_call": per_call[warmup:],
                                          "wall_s": round(time.monotonic() - t0, 1)}
    return res


def table(res: dict) -> str:
    head = f"{'client':<16}{'calls':>7}{'total p50':>11}{'p99':>8}" + "".join(f"{p + ' p50':>12}{'p99':>8}" for p in PHASES)
    lines = [head, "-" * len(head)]
    for variant, name, c in ((v, n, c) for v, r in res["variants"].items() for n, c in r["clients"].items()):
        row = f"{variant + ' ' + name:<16}{c['ok']:>4}/{c['calls']:<2}{_ms(c['total_ms']['p50']):>11}{_ms(c['total_ms']['p99']):>8}"
        row += "".join(f"{_ms(c['phases_ms'][p]['p50']):>12}{_ms(c['phases_ms'][p]['p99']):>8}" for p in PHASES)
        lines.append(row)
        if c["errors"]:
            lines.append(f"  errors: {'; '.join(c['errors'])}")
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def main(argv: list[str] | None = None) -> int:
    import os

    from tests.bench.provenance import run_info

    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m tests.bench.bench_ttfa", description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=20, help="calls per client (default 20)")
    ap.add_argument("--clients", nargs="+", choices=("aiortc", "chromium"), default=["aiortc", "chromium"])
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    ap.add_argument("--save", type=Path, help="also write the JSON here (docs/bench-ttfa.json: make bench-report)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_ttfa: needs root (the lab's namespaces, XDP); run it as root", file=sys.stderr)
        return 2
    res = run(args.calls, tuple(args.clients))
    res["run"] = run_info("tests.bench.bench_ttfa", argv)
    if args.save:
        args.save.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2) if args.json else table(res))
    return 0 if all(c["ok"] == c["calls"] for r in res["variants"].values() for c in r["clients"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
