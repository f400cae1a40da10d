"""Pipecat's prebuilt browser client (PyPI `pipecat-ai-small-webrtc-prebuilt`,
as installed) places a call through the relay to the Pipecat bot
(examples/pipecat_bot.py), and the browser hears the bot answer.

The page is served by tests/support/pipecat_prebuilt.py's PrebuiltFront on
its own origin in the lab's client namespace, its signaling paths passed on
to relayd as they are (`POST /start`, `POST` and `PATCH
/sessions/{sessionId}/api/offer`). The call is placed by the page's own
`PipecatClient` class, through its connect flow, over the page's bundled
`SmallWebRTCTransport` with the microphone of the `WavMediaManager` it also
ships: the page's default device manager loads Daily's call-machine bundle
from Daily's CDN, which no lab reaches (docs/pipecat.md).

Checked: the bodies the client sent have Pipecat's shapes and the relay
answered each with 200; the client's connect() resolved with the bot's
RTVI bot-ready; the bot completed a turn and the browser heard its reply,
1.5x higher than the sentence; the bot's RTVI events reached the client
(bot-started/stopped-speaking, its server-message for the turn) and a client
request was answered with the bot's state. Then the call migrates live to the
other transceiver: the browser hears the reply to a later turn, and that
bot's server-message for it reaches the client with no RTVI from the client
since (the RTVI handshake moved with the call), no second bot-ready."""

from __future__ import annotations

import asyncio
import secrets

import numpy as np
import pytest

from manager.lab.netns import NetnsExecutor
from manager.lab.services import running_lab
from tests.support.bot_page import BOT, PAUSE_S, PITCH, SENTENCE, answered
from tests.support.pipecat_prebuilt import PrebuiltFront, PrebuiltPage, prebuilt_dist
from tests.support.speech import mic_wav, speech_wav, wav_samples
from tests.support.waiting import eventually_async

# realtime: the bot's turn and reply are heard against the wall clock.
pytestmark = [pytest.mark.netns, pytest.mark.realtime, pytest.mark.browser]


@pytest.fixture(scope="module")
def said(tmp_path_factory) -> np.ndarray:
    return wav_samples(speech_wav(SENTENCE, tmp_path_factory.mktemp("speech") / "s.wav"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with running_lab(f"pb{secrets.token_hex(3)}", tmp_path_factory.mktemp("prebuilt"), transceivers=2,
                     agent=BOT) as (lab, svc):
        yield lab, svc


async def moved_turn_reported(page: PrebuiltPage, turn: int) -> dict | None:
    report = await page.state()
    return report if {"turns": turn} in report["messages"] else None


def test_prebuilt_client_calls_the_bot_through_the_relay(env, said, tmp_path):
    lab, svc = env
    mic = mic_wav(said, tmp_path / "mic.wav", PAUSE_S)
    front = PrebuiltFront(lab.signaling_url, prebuilt_dist())
    page = PrebuiltPage(lab.client_ns, front, mic)

    async def run() -> dict:
        await front.start()
        try:
            await page.start()
            try:
                ready = await eventually_async(page.ready, 30, what="the client's connect() (bot-ready)",
                                               interval=0.2)
                heard = await asyncio.wait_for(answered(page, said, 0), 90)
                heard["calls"] = {c["call_id"] for c in await asyncio.to_thread(svc.calls)}
                heard["answer"] = await page.request("state")

                async def spoke() -> dict | None:  # the bot's stop follows its reply's last audio
                    report = await page.state()
                    return report if "bot-stopped-speaking" in report["rtvi"] else None

                heard["ready"], heard["report"] = ready, await eventually_async(
                    spoke, 10, what="the bot's bot-stopped-speaking", interval=0.2)

                # A live migration: the client sends no RTVI of its own after it.
                (call,) = await asyncio.to_thread(svc.calls)
                target = 2 if call["transceiver_id"] == 1 else 1
                res = await asyncio.to_thread(svc.control.request, "POST", f"/sessions/{call['call_id']}/migrate",
                                              {"to": target})
                assert res["outcome"] == "moved", res
                heard["moved"] = await asyncio.wait_for(answered(page, said, await page.now()), 60)
                heard["moved"]["report"] = await eventually_async(
                    lambda: moved_turn_reported(page, heard["moved"]["turn"]), 10,
                    what="the moved bot's server-message", interval=0.2)
                return heard
            finally:
                await page.stop()
        finally:
            await front.stop()

    try:
        with NetnsExecutor(lab.client_ns) as ex:
            heard = ex.call(asyncio.run, run())
    except BaseException as exc:
        raise AssertionError(f"{exc}; relayed: {front.exchanges}; the page's report and logs in "
                             f"{page.save_artifacts('pipecat-prebuilt')}") from exc

    print(f"\nprebuilt client: turn {heard['turn']} heard, pitch x{heard['ratio']}, reply {heard['reply_s']} s; "
          f"after the move turn {heard['moved']['turn']}, pitch x{heard['moved']['ratio']}; "
          f"relayed: {[(x['method'], x['path'].split('/')[-1] or x['path'], x['status']) for x in front.exchanges]}")
    assert PITCH[0] < heard["ratio"] < PITCH[1], f"pitch ratio {heard['ratio']}"

    # RTVI: connect() resolved with bot-ready, the protocol version the client speaks (1.x) echoed.
    ready, report = heard["ready"], heard["report"]
    assert ready["version"].startswith("1.") and ready["about"]["library"] == "pipecat-ai", ready
    assert report["states"][-1] == "ready" and "connected" in report["states"], report["states"]
    # The bot's events: it spoke (Pipecat's bot-*-speaking), and its server-message a turn.
    assert {"bot-started-speaking", "bot-stopped-speaking"} <= set(report["rtvi"]), report["rtvi"]
    assert {"turns": heard["turn"]} in report["messages"], report["messages"]
    assert not [e for e in report["rtvi"] if e.startswith(("error", "message-error"))], report["rtvi"]
    # A client request (RTVI client-message) answered with the bot's state, as its data channel says.
    assert heard["answer"]["turns"] >= heard["turn"] and heard["answer"]["context"][:2] == heard["context"][:2]

    # After a live migration the new bot's RTVI knows the client (its handshake moved with
    # the call): its server-message for a turn after the move reaches the client, which got
    # no second bot-ready, saw no RTVI error and stayed ready; the conversation went on.
    moved = heard["moved"]
    assert moved["turn"] > heard["turn"] and PITCH[0] < moved["ratio"] < PITCH[1], moved
    after = moved["report"]
    assert after["rtvi"].count("bot-ready") == 1 and after["transport"] == "ready", after["rtvi"]
    assert not [e for e in after["rtvi"] if e.startswith(("error", "message-error"))], after["rtvi"]
    assert after["bot"]["context"][: len(heard["context"])] == heard["context"], after["bot"]

    start, offer, *patches = front.exchanges
    assert page.config["transportType"] == "smallwebrtc", page.config
    params = page.config["startBotParams"]
    assert (start["method"], start["path"], start["status"]) == ("POST", params["endpoint"], 200), start
    assert start["request"] == params["requestData"] and set(start["response"]) == {"sessionId"}, start
    session = start["response"]["sessionId"]
    assert (offer["method"], offer["path"], offer["status"]) == ("POST", f"/sessions/{session}/api/offer", 200)
    assert set(offer["request"]) >= {"sdp", "type", "pc_id", "restart_pc"}, offer["request"].keys()
    assert offer["request"]["type"] == "offer" and offer["request"]["restart_pc"] is False, offer["request"]
    call_id = offer["response"]["pc_id"]
    assert offer["response"]["type"] == "answer" and call_id in heard["calls"], (call_id, heard["calls"])
    # Trickle: the candidates gathered after the offer, by PATCH on the same URL, naming the call.
    assert patches, "the client trickled no candidate"
    for patch in patches:
        assert (patch["method"], patch["path"], patch["status"]) == ("PATCH", offer["path"], 200), patch
        assert set(patch["request"]) == {"pc_id", "candidates"} and patch["request"]["pc_id"] == call_id, patch
        for cand in patch["request"]["candidates"]:
            assert set(cand) == {"candidate", "sdp_mid", "sdp_mline_index"}, cand
