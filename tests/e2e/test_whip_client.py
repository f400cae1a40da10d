"""WHIP (RFC 9725) with a client no one here wrote: whip-whep's WHIPClient
(the RFC author's browser client, from npm by scripts/setup.sh, unmodified)
in the lab's Chromium, against relayd with XDP and a real transceiver.

It publishes the microphone (a fake device playing a tone) by POST, trickles
its candidates by PATCH with If-Match set to the ETag of the 201, hears the
echo agent, asks for an ICE restart (200 with the answer fragment), and ends
the call by DELETE.

whip-whep 1.2.0 (the latest) inserts the answer fragment's candidates into
the remote description as `candidates.join()` (whip.js line 368), which
joins them with commas, so Chromium refuses an answer with more than one
candidate; the relay gives all of its own, as the 201's answer did
(docs/http-api.md says why not one). The call goes on all the same: the
transceiver keeps the old credentials until a check with the new ones comes
(RFC 8445 section 9).
tests/e2e/test_ice_handover.py restarts ICE through the RFC 9725 flow driven
from the page."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import pytest

from manager.lab.netns import NetnsExecutor
from manager.lab.services import running_lab
from tests.support.chromium import Chromium
from tests.support.paths import REPO
from tests.support.waiting import eventually_async

pytestmark = [pytest.mark.netns, pytest.mark.browser, pytest.mark.realtime]

WHIP_JS = REPO / ".cache/npm/whip-whep-1.2.0/whip.js"

# The client module loaded from a blob URL (same origin as the relay's page,
# so the fetches it makes are same-origin), every fetch it makes logged.
PUBLISH = """(async () => {
  const url = URL.createObjectURL(new Blob([%s], {type: "text/javascript"}));
  const {WHIPClient} = await import(url);
  const log = [];
  const original = window.fetch.bind(window);
  window.fetch = async (input, init = {}) => {
    const resp = await original(input, init);
    const headers = init.headers || {};
    log.push({method: init.method || "GET", url: String(input), status: resp.status,
              etag: resp.headers.get("etag"), location: resp.headers.get("location"),
              link: resp.headers.get("link"), if_match: headers["If-Match"] || null,
              body: init.method === "PATCH" ? init.body : null});
    return resp;
  };
  const mic = await navigator.mediaDevices.getUserMedia({audio: true});
  const pc = new RTCPeerConnection();
  pc.addTransceiver(mic.getAudioTracks()[0], {direction: "sendrecv"});
  const client = new WHIPClient();
  window.whip = {pc, client, log};
  await client.publish(pc, location.origin + "/v1/calls");
  return true;
})()"""

STATE = """(async () => {
  const {pc, log} = window.whip;
  let received = 0;
  (await pc.getStats()).forEach(s => { if (s.type === "inbound-rtp") received = s.packetsReceived; });
  return JSON.stringify({state: pc.connectionState, received, log});
})()"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with running_lab(f"wh{secrets.token_hex(3)}", tmp_path_factory.mktemp("services"), transceivers=1) as (lab, svc):
        yield lab, svc


def relay_sample(svc, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in svc.metrics().items() if n == name and all(dict(ls).get(k) == x
                                                                            for k, x in labels.items()))


async def drive(browser: Chromium, source: str) -> dict:
    await browser.connect()
    try:
        return await _drive(browser, source)
    finally:
        await browser.close()


async def _drive(browser: Chromium, source: str) -> dict:
    # The relay's page, not the about:blank before it (no microphone there).
    await eventually_async(lambda: browser.evaluate(f"location.origin === {json.dumps(browser.origin)} && "
                                                    "document.readyState === 'complete'"), 20,
                           what="the relay's page loaded", interval=0.2)
    assert await browser.evaluate(PUBLISH % json.dumps(source)) is True

    async def state() -> dict:
        return json.loads(await browser.evaluate(STATE))

    flowing = await eventually_async(
        lambda: _if(state(), lambda s: s["state"] == "connected" and s["received"] > 50), 20,
        what="the call connected and 50 echoed packets received", interval=0.25)
    restart = await browser.evaluate("window.whip.client.restart().then(() => 'ok', e => e.message)")
    after = await eventually_async(lambda: _if(state(), lambda s: s["received"] > flowing["received"] + 50), 10,
                                   what="50 more packets after the refused restart", interval=0.25)
    await browser.evaluate("window.whip.client.stop()")
    done = await eventually_async(lambda: _if(state(), lambda s: any(e["method"] == "DELETE" for e in s["log"])),
                                  10, what="the DELETE answered", interval=0.25)
    return {"flowing": flowing, "restart": restart, "after": after, "log": done["log"]}


async def _if(value, predicate):
    got = await value
    return got if predicate(got) else None


def test_whip_whep_client_publishes_trickles_and_ends_a_call(env, tmp_path: Path):
    lab, svc = env
    assert WHIP_JS.is_file(), f"{WHIP_JS} is missing: run scripts/setup.sh (it fetches whip-whep from npm)"
    restarts_before = relay_sample(svc, "splitrelay_ice_restarts_total")
    browser = Chromium(lab.client_ns, f"{lab.signaling_url}/", origin=lab.signaling_url)
    browser.start()
    try:
        with NetnsExecutor(lab.client_ns) as ex:
            out = ex.call(asyncio.run, asyncio.wait_for(drive(browser, WHIP_JS.read_text()), 90))
    finally:
        browser.stop()
    log = out["log"]
    post = next(e for e in log if e["method"] == "POST")
    assert post["status"] == 201 and post["location"].startswith("/v1/calls/") and post["etag"], post
    assert post["link"] is None  # no ice-server to name: the relay's address is the only candidate
    patches = [e for e in log if e["method"] == "PATCH"]
    trickles = [e for e in patches if e["if_match"] == post["etag"]]
    assert trickles and all(e["status"] == 204 and ("a=candidate:" in e["body"] or "a=end-of-candidates" in e["body"])
                            for e in trickles), trickles
    restarts = [e for e in patches if e["if_match"] == "*"]
    assert [e["status"] for e in restarts] == [200], restarts
    assert restarts[0]["etag"] not in (None, post["etag"]), restarts  # a new ICE session, a new ETag
    # whip-whep's own rewrite of the answer (see the module docstring), or its success.
    assert out["restart"] == "ok" or "Invalid SDP line" in out["restart"] and ",a=candidate:" in out["restart"], out
    assert out["after"]["state"] == "connected"
    delete = next(e for e in log if e["method"] == "DELETE")
    assert delete["status"] == 204 and delete["url"].endswith(post["location"]), delete
    assert relay_sample(svc, "splitrelay_ice_restarts_total") == restarts_before + 1
    assert relay_sample(svc, "splitrelay_trickle_candidates_total") >= 1
    print(f"\nwhip-whep: POST 201, {len(trickles)} trickle PATCH(es) 204, restart 200 ({out['restart'][:60]}), "
          f"{out['after']['received']} packets echoed, DELETE 204")
