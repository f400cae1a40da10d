"""One network handover in a running lab: Chromium in the client namespace
places a call by WHIP, its addresses move, it restarts ICE by PATCH (RFC 9725
section 4.3.2) and the call goes on. Shared by tests/e2e/test_ice_handover.py
(one handover, its assertions) and tests/bench/bench_handover.py (N of them,
the gaps' spread).

The audio gap is measured on the wire: the longest time without the echo's
RTP reaching the client's interface at an address it holds, from the move on.
The connectivity checks are timed on the wire too, at the client (sent), at
the relay's public interface (what XDP passed up) and at the owner: where a
restart's first check is late or lost shows there."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field

from aioice import stun

from manager.lab.capture import WireClock, is_rtp, longest_gap
from manager.lab.netns import NetnsExecutor, ns_run
from manager.protocol.udpip import Datagram
from tests.support.chromium import Chromium
from tests.support.waiting import eventually_async

# Place a call by WHIP from the page; window.call keeps what the restart needs.
PLACE = """(async () => {
  const mic = await navigator.mediaDevices.getUserMedia({audio: true});
  const pc = new RTCPeerConnection();
  pc.addTransceiver(mic.getAudioTracks()[0], {direction: "sendrecv"});
  await pc.setLocalDescription(await pc.createOffer());
  const resp = await fetch("/v1/calls", {method: "POST", headers: {"Content-Type": "application/sdp"},
                                         body: pc.localDescription.sdp});
  if (resp.status !== 201) return `POST answered ${resp.status}: ${await resp.text()}`;
  window.call = {pc, location: resp.headers.get("Location"), etag: resp.headers.get("ETag")};
  await pc.setRemoteDescription({type: "answer", sdp: await resp.text()});
  return "placed";
})()"""

# The browser has noticed its new network once a fresh peer connection
# gathers a host candidate there (Chromium re-reads the interfaces on its own
# schedule, up to seconds after a change): what an application reacting to
# a network change event would see. Returns the ms it took, -1 never.
NOTICED = """(async () => {
  const want = %s, t0 = performance.now();
  while (performance.now() - t0 < 10000) {
    const pc = new RTCPeerConnection(), seen = [];
    pc.createDataChannel("probe");
    pc.onicecandidate = e => { if (e.candidate && e.candidate.address) seen.push(e.candidate.address); };
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise(done => { pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && done();
                                setTimeout(done, 1000); });
    pc.close();
    if (seen.some(a => want.includes(a))) return performance.now() - t0;
    await new Promise(done => setTimeout(done, 20));  // pacing: the next look at the interfaces
  }
  return -1;
})()"""

# RFC 9725 section 4.3.2, as a browser that changed networks does it.
RESTART = """(async () => {
  const {pc} = window.call;
  const t0 = performance.now(), gathered = window.call.gathered = [];
  // When Chromium gathers the restart's candidates (the checks need them).
  pc.onicecandidate = e => gathered.push([Math.round(performance.now() - t0),
                                          e.candidate ? `${e.candidate.protocol} ${e.candidate.address}` : "end"]);
  pc.restartIce();
  const offer = await pc.createOffer({iceRestart: true});
  await pc.setLocalDescription(offer);
  const mine = s => [s.match(/a=ice-ufrag:(.*)\\r\\n/)[1], s.match(/a=ice-pwd:(.*)\\r\\n/)[1]];
  const [ufrag, pwd] = mine(offer.sdp);
  const resp = await fetch(window.call.location, {method: "PATCH", body: `a=ice-ufrag:${ufrag}\\r\\na=ice-pwd:${pwd}\\r\\n`,
    headers: {"Content-Type": "application/trickle-ice-sdpfrag", "If-Match": "*"}});
  const t1 = performance.now();
  const frag = await resp.text();
  if (resp.status !== 200) return JSON.stringify({status: resp.status, body: frag});
  const etag = resp.headers.get("ETag");
  const [newUfrag, newPwd] = mine(frag);
  const candidates = (frag.match(/^a=candidate:.*$/gm) || []).map(c => c + "\\r\\n").join("");
  let sdp = pc.remoteDescription.sdp.replace(/a=candidate:.*\\r\\n/g, "")
    .replace(/a=ice-ufrag:.*\\r\\n/g, `a=ice-ufrag:${newUfrag}\\r\\n`)
    .replace(/a=ice-pwd:.*\\r\\n/g, `a=ice-pwd:${newPwd}\\r\\n${candidates}`);
  await pc.setRemoteDescription({type: "answer", sdp});
  if (window.call.trace) {  // which candidate pairs Chromium pings, and when (getStats every 10 ms)
    const pings = window.call.pings = [], sent = {};
    let first = true;  // the first look is the baseline: the pairs known then, their requests so far
    (async () => {
      while (performance.now() - t0 < 700) {
        const stats = await pc.getStats(), at = Math.round(performance.now() - t0);
        stats.forEach(p => {
          if (p.type !== "candidate-pair" || (sent[p.id] || 0) === p.requestsSent) return;
          const l = stats.get(p.localCandidateId), r = stats.get(p.remoteCandidateId);
          if (!first || !p.requestsSent)
            pings.push([at, `${l.protocol} ${l.address}>${r.address}`, p.requestsSent - (sent[p.id] || 0), p.state]);
          else pings.push([at, `baseline ${l.protocol} ${l.address}>${r.address}`, p.requestsSent, p.state]);
          sent[p.id] = p.requestsSent;
        });
        first = false;
        await new Promise(done => setTimeout(done, 10));  // pacing: the next look at the pairs
      }
    })();
  }
  const before = window.call.etag;
  window.call.etag = etag;
  return JSON.stringify({status: 200, etag, before, patch_ms: t1 - t0, applied_ms: performance.now() - t0,
                         ufrag: newUfrag, candidates: (frag.match(/^a=candidate:/gm) || []).length});
})()"""

STATE = """(async () => {
  const {pc} = window.call;
  let received = 0, ssrc = null, sent_ssrc = null;
  const stats = await pc.getStats();
  stats.forEach(s => {
    if (s.type === "inbound-rtp") { received = s.packetsReceived; ssrc = s.ssrc; }
    if (s.type === "outbound-rtp") sent_ssrc = s.ssrc;
  });
  const fp = s => (s.match(/a=fingerprint:.*/) || [null])[0];
  return JSON.stringify({state: pc.connectionState, ice: pc.iceConnectionState, signaling: pc.signalingState,
                         received, ssrc, sent_ssrc, fingerprint: fp(pc.remoteDescription.sdp),
                         codecs: (pc.remoteDescription.sdp.match(/a=rtpmap:.*/g) || []).join(",")});
})()"""

WINDOW_S = 3.0  # the gaps are looked for in this long after restartIce()


def move_client(lab, new4: str, new6: str, old4: str, old6: str) -> None:
    """The client's network changes: its addresses go, new ones come, routes follow."""
    c, ns = lab.client, lab.client_ns
    for argv in (["ip", "addr", "del", f"{old4}/{c.prefixlen4}", "dev", c.ifname],
                 ["ip", "-6", "addr", "del", f"{old6}/{c.prefixlen6}", "dev", c.ifname],
                 ["ip", "addr", "add", f"{new4}/{c.prefixlen4}", "dev", c.ifname],
                 ["ip", "-6", "addr", "add", f"{new6}/{c.prefixlen6}", "dev", c.ifname, "nodad"],
                 ["ip", "route", "replace", "default", "via", c.relay_addr4, "dev", c.ifname],
                 ["ip", "-6", "route", "replace", "default", "via", c.relay_addr6, "dev", c.ifname]):
        ns_run(ns, argv)


def session_of(svc) -> dict:
    (session,) = svc.control.sessions()["sessions"]
    return session


def host_of(endpoint: str) -> str:
    """The address of "addr:port" or "[addr6]:port"."""
    return endpoint[1:endpoint.index("]")] if endpoint.startswith("[") else endpoint.rsplit(":", 1)[0]


def is_stun(d: Datagram) -> bool:
    return len(d.payload) >= 20 and d.payload[0] < 2 and d.payload[4:8] == b"\x21\x12\xa4\x42"


def check_username(d: Datagram) -> str | None:
    """The USERNAME of a Binding request, None for anything else."""
    try:
        msg = stun.parse_message(d.payload)
    except ValueError:
        return None
    if msg.message_method != stun.Method.BINDING or msg.message_class != stun.Class.REQUEST:
        return None
    return msg.attributes.get("USERNAME")


def flat_numbers(tree: object, prefix: str = "") -> dict[str, float]:
    """Every number in a nested dict, by its dotted path (relayd's /stats)."""
    if isinstance(tree, dict):
        out: dict[str, float] = {}
        for k, v in tree.items():
            out.update(flat_numbers(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list):  # the fast path's counters: rows named by their counter
        return {k: v for row in tree if isinstance(row, dict) and "name" in row
                for k, v in flat_numbers({x: y for x, y in row.items() if x != "name"},
                                         f"{prefix}{row['name']}.").items()}
    if isinstance(tree, int | float) and not isinstance(tree, bool):
        return {prefix[:-1]: tree}
    return {}


@dataclass
class Handover:
    """What one handover showed: the page's answers, the relay's and the
    owner's views before and after, and the wire's figures (ms)."""

    session: dict
    info_before: dict
    before: dict
    after: dict
    restart: dict
    moved: list[dict]
    noticed_ms: float
    figures: dict[str, float] = field(default_factory=dict)
    checks: dict[str, float | int | None] = field(default_factory=dict)
    stats_delta: dict[str, float] = field(default_factory=dict)


async def _if(value, predicate):
    got = await value
    return got if predicate(got) else None


def run_handover(lab, svc, old: tuple[str, str], new: tuple[str, str], *, trace: bool = False) -> Handover:
    """Place a call from the client's addresses `old`, move them to `new`
    mid-call, restart ICE and wait for the echo on the new path; the call is
    left up (the caller ends it). Chromium runs for this handover only.
    `trace`: record which candidate pairs Chromium pings after the restart
    (restart["pings"]: ms, pair, new requests, state; it polls getStats)."""
    browser = Chromium(lab.client_ns, f"{lab.signaling_url}/", origin=lab.signaling_url)
    to_client = WireClock(lab.client_ns, lab.client.ifname, lambda d: d.src[1] == lab.port and is_rtp(d))
    client_stun = WireClock(lab.client_ns, lab.client.ifname, is_stun, outgoing=True)
    relay_stun = WireClock(lab.relay_ns, lab.client.relay_ifname, is_stun)
    owner_stun = [WireClock(tx.ns, tx.ifname, is_stun) for tx in lab.transceivers]
    to_owner = [WireClock(tx.ns, tx.ifname, is_rtp) for tx in lab.transceivers]
    seen: dict = {}

    async def drive() -> None:
        await browser.connect()
        try:
            await eventually_async(lambda: browser.evaluate(f"location.origin === {json.dumps(browser.origin)} && "
                                                            "document.readyState === 'complete'"), 20,
                                   what="the relay's page loaded", interval=0.2)
            placed = await browser.evaluate(PLACE)
            assert placed == "placed", placed

            async def state() -> dict:
                return json.loads(await browser.evaluate(STATE))

            seen["before"] = await eventually_async(
                lambda: _if(state(), lambda s: s["state"] == "connected" and s["received"] > 100), 20,
                what="the call connected and 100 echoed packets received", interval=0.25)
            session = seen["session"] = session_of(svc)
            seen["info_before"] = svc.transceiver_api(session["transceiver"], f"/calls/{session['conn_id']}")
            seen["stats_before"] = flat_numbers(svc.control.stats())
            seen["t"] = time.monotonic()
            await asyncio.to_thread(move_client, lab, *new, *old)
            seen["noticed_ms"] = await browser.evaluate(NOTICED % json.dumps(list(new)))
            assert seen["noticed_ms"] >= 0, "Chromium never gathered on its new addresses"
            if trace:
                await browser.evaluate("window.call.trace = true")
            seen["t_restart"] = time.monotonic()
            seen["restart"] = json.loads(await browser.evaluate(RESTART))
            assert seen["restart"]["status"] == 200, seen["restart"]
            received = seen["before"]["received"]

            def moved() -> list[dict] | None:
                legs = [leg for leg in session_of(svc)["legs"] if host_of(leg["client"]) in new]
                return legs if any(leg["kernel"] and leg["kernel"]["packets_in"] > 0 for leg in legs) else None

            seen["moved"] = await eventually_async(lambda: asyncio.to_thread(moved), 15,
                                                   what="XDP forwarding the client at its new address", interval=0.1)
            seen["after"] = await eventually_async(
                lambda: _if(state(), lambda s: s["received"] > received + 100), 15,
                what="100 more echoed packets", interval=0.1)
            # pacing: the rest of the window on the new path, for the gap's figures
            await asyncio.sleep(max(0.0, seen["t_restart"] + WINDOW_S - time.monotonic()))
            seen["stats_after"] = flat_numbers(svc.control.stats())
            seen["restart"]["gathered"] = await browser.evaluate("window.call.gathered")
            seen["restart"]["pings"] = await browser.evaluate("window.call.pings || null")
        finally:
            await browser.close()

    browser.start()
    try:
        with contextlib.ExitStack() as clocks:
            for clock in (to_client, client_stun, relay_stun, *owner_stun, *to_owner):
                clocks.enter_context(clock)
            with NetnsExecutor(lab.client_ns) as ex:
                ex.call(asyncio.run, asyncio.wait_for(drive(), 90))
    finally:
        browser.stop()

    out = Handover(session=seen["session"], info_before=seen["info_before"], before=seen["before"],
                   after=seen["after"], restart=seen["restart"], moved=seen["moved"], noticed_ms=seen["noticed_ms"])
    t, t_restart = seen["t"], seen["t_restart"]
    # Echoed audio reaches the client only at an address it holds: nothing from
    # the move until the new path. From restartIce() on, the gap is the
    # restart's own (the browser noticing its new network is not).
    delivered = [at for at, d in to_client.arrivals if d.dst[0] in new or at < t]
    end = t_restart + WINDOW_S
    out.figures = {
        "restart_gap_to_client_ms": longest_gap([t_restart] + [at for at in delivered if at >= t_restart],
                                                t_restart, end),
        "restart_gap_to_owner_ms": longest_gap(sorted(x for c in to_owner for x in c.times), t_restart, end),
        "move_gap_to_client_ms": longest_gap(delivered, t, end),
        "noticed_ms": round(seen["noticed_ms"]),
        "patch_ms": round(seen["restart"]["patch_ms"], 1)}
    out.checks = _checks_timeline(seen["restart"]["ufrag"], t_restart, client_stun, relay_stun, owner_stun)
    before, after = seen["stats_before"], seen["stats_after"]
    out.stats_delta = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    return out


def _checks_timeline(ufrag: str, t0: float, client: WireClock, relay: WireClock, owners: list[WireClock]) -> dict:
    """The restart's checks (USERNAME with the new server ufrag), ms after
    restartIce(): the first sent by the client, passed by XDP up to the relay's
    stack, reaching the owner, and the first success back at the client."""
    def new_checks(arrivals, keep=lambda i: True) -> list[tuple[float, Datagram]]:
        return [(at, d) for i, (at, d) in enumerate(arrivals)
                if at >= t0 and keep(i) and (check_username(d) or "").startswith(f"{ufrag}:")]

    def ms(at: float | None) -> float | None:
        return None if at is None else round((at - t0) * 1000, 1)

    sent = new_checks(client.arrivals, lambda i: i in client.sent)
    at_relay = new_checks(relay.arrivals)
    at_owner = sorted(x for c in owners for x in new_checks(c.arrivals))
    txids = {d.payload[8:20] for _, d in sent}
    answered = [at for i, (at, d) in enumerate(client.arrivals)
                if at >= t0 and i not in client.sent and d.payload[:2] == b"\x01\x01" and d.payload[8:20] in txids]
    first_owner = at_owner[0][1].payload[8:20] if at_owner else None
    return {"first_sent_ms": ms(sent[0][0] if sent else None),
            "first_at_relay_ms": ms(at_relay[0][0] if at_relay else None),
            "first_at_owner_ms": ms(at_owner[0][0] if at_owner else None),
            "first_answered_ms": ms(answered[0] if answered else None),
            "sent_before_owner": sum(1 for at, _ in sent if not at_owner or at < at_owner[0][0]),
            "first_owner_check_is_first_sent": bool(sent) and sent[0][1].payload[8:20] == first_owner,
            "sent": [(ms(at), f"{d.src[0]}:{d.src[1]}>{d.dst[0]}:{d.dst[1]}") for at, d in sent[:12]]}
