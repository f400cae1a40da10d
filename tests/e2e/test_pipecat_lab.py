"""The Pipecat bot (examples/pipecat_bot.py, Silero VAD) answers Chromium
through the relay, and keeps its conversation across a live migration and a
relay failover.

One fleet lab for the module: two relayd with XDP behind an edge router
(Redis between them), two transceivers running the bot as every call's agent
(`--agent examples/pipecat_bot.py:make_pipeline`). Chromium's fake microphone
loops a spoken sentence (espeak-ng) and a pause, so the bot hears one turn
each loop; the page is relayd's own, probed by tests/support/bot_page.py,
which records what the browser hears and asks the bot its state over the
data channel (its turn count and LLM context's messages).

"Answered" means: the bot completed a turn after a moment of the call (the
start, the migration's reply, the failover's take-over), and the browser
heard that turn's reply: voiced audio 1.5x higher than the sentence
(spectral centroid ratio).
"Context intact" means: the bot's turn count, as it answered over the
whole call, never went back, and after the move its context's messages
begin with those it had before."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal

import numpy as np
import pytest

from manager.lab.netns import NetnsExecutor
from manager.lab.routing import route_vip, set_relay_links
from manager.lab.services import LAB_TCP_PORT, running_lab
from tests.support.bot_page import BOT, PAUSE_S, PITCH, SENTENCE, BotPage, answered
from tests.support.lab_calls import ssrc_published, vip_at_relay_1
from tests.support.speech import mic_wav, speech_wav, wav_samples
from tests.support.tcp_calls import udp_blocked
from tests.support.waiting import eventually_async

# realtime: the bot's turns and replies are heard against the wall clock.
pytestmark = [pytest.mark.netns, pytest.mark.realtime, pytest.mark.browser]



@pytest.fixture(scope="module")
def said(tmp_path_factory) -> np.ndarray:
    return wav_samples(speech_wav(SENTENCE, tmp_path_factory.mktemp("speech") / "s.wav"))


@pytest.fixture(scope="module")
def mic(said, tmp_path_factory):
    return mic_wav(said, tmp_path_factory.mktemp("mic") / "mic.wav", PAUSE_S)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with running_lab(f"pc{secrets.token_hex(3)}", tmp_path_factory.mktemp("pipecat"), relays=2,
                     agent=BOT) as (lab, svc):
        yield lab, svc


@pytest.fixture
def fleet(env):
    with vip_at_relay_1(env[0]):
        yield env


def assert_goes_on(before: dict, after: dict) -> None:
    """The bot answered again, with its turn count and context carried on."""
    assert after["turn"] > before["turn"], (before["turn"], after["turn"])
    # Every answer of the call, in order: the count never went back (a new bot would count from 0 again).
    assert after["counted"] == sorted(after["counted"]), after["counted"]
    assert after["context"][: len(before["context"])] == before["context"], (before["context"], after["context"])
    for phase in (before, after):
        assert PITCH[0] < phase["ratio"] < PITCH[1], f"pitch ratio {phase['ratio']}"


def summary(before: dict, after: dict) -> str:
    return "; ".join(f"{when}: turn {p['turn']} heard, pitch x{p['ratio']}, reply {p['reply_s']} s"
                     + (f" (before it, short replies (turn, s): {p['short']})" if p["short"] else "")
                     for when, p in (("before", before), ("after", after))) + f"; turns answered {after['counted']}; " \
        + "utterances the bot heard: " + ", ".join(m["content"].split(": ")[1] for m in after["context"][::2])


def in_browser(lab, mic, scenario, name: str) -> dict:
    """Run `scenario(page)` with Chromium on the lab's page (in the client
    namespace); its report and logs are kept under test-artifacts/ on failure."""
    page = BotPage(lab.client_ns, lab.signaling_url, mic)

    async def run() -> dict:
        await page.start()
        try:
            return await asyncio.wait_for(scenario(page), 120)
        finally:
            await page.stop()

    try:
        with NetnsExecutor(lab.client_ns) as ex:
            return ex.call(asyncio.run, run())
    except BaseException as exc:
        raise AssertionError(f"{name}: {exc}; the page's report and logs in {page.save_artifacts(name)}") from exc


@pytest.mark.parametrize("network", ["udp", "tcp"])
def test_bot_answers_chromium_and_keeps_its_conversation_across_a_migration(fleet, said, mic, network):
    lab, svc = fleet
    known = {c["call_id"] for c in svc.calls()}
    out: dict = {}

    async def scenario(page: BotPage) -> dict:
        out["before"] = await answered(page, said, 0)
        (call,) = [c for c in await asyncio.to_thread(svc.calls) if c["call_id"] not in known]
        target = 2 if call["transceiver_id"] == 1 else 1
        res = await asyncio.to_thread(svc.control.request, "POST", f"/sessions/{call['call_id']}/migrate",
                                      {"to": target})
        assert res["outcome"] == "moved", res
        out["after"] = await answered(page, said, await page.now())
        out["moved"] = await asyncio.to_thread(svc.transceiver_api, target, f"/calls/{call['conn_id']}")
        return out

    with udp_blocked(lab) if network == "tcp" else contextlib.nullcontext():
        in_browser(lab, mic, scenario, f"pipecat-{network}")
    before, after = out["before"], out["after"]
    print(f"\npipecat bot over {network}, live migration: {summary(before, after)}; path {after['path']}")
    assert out["moved"] is not None and out["moved"]["imported"], out["moved"]
    assert_goes_on(before, after)
    if network == "tcp":
        assert after["path"].startswith("TCP IPv") and after["path"].endswith(f":{LAB_TCP_PORT}"), after["path"]
    else:
        assert after["path"].startswith("UDP IPv"), after["path"]


def test_bot_answers_after_a_relay_failover(fleet, said, mic):
    """Relay 1 dies mid-call (relayd SIGKILLed, its links down) and the VIP
    route moves to relay 2, which takes the call over: the bot, on the same
    transceiver, answers again and its conversation goes on."""
    lab, svc = fleet
    out: dict = {}

    def events(relay: int) -> dict:
        return svc.control_of(relay).stats()["slowpath"]["events"]

    async def scenario(page: BotPage) -> dict:
        out["before"] = await answered(page, said, 0)
        await ssrc_published(svc)
        seen = await asyncio.to_thread(events, 2)
        await asyncio.to_thread(svc.stop_one, "relayd", signal.SIGKILL)
        await asyncio.to_thread(set_relay_links, lab, 1, False)
        await asyncio.to_thread(route_vip, lab, 2)

        def taken_over() -> bool:
            ev = events(2)
            return sum(ev.get(k, 0) - seen.get(k, 0) for k in ("failovers", "repointed")) >= 1

        await eventually_async(lambda: asyncio.to_thread(taken_over), 10,
                               what="relay 2 to take the call over (failovers or repointed)")
        out["after"] = await answered(page, said, await page.now())
        return out

    try:
        in_browser(lab, mic, scenario, "pipecat-failover")
    finally:
        set_relay_links(lab, 1, True)
        route_vip(lab, 1)
        svc.start_relayd()
        svc.wait_signaling(30.0)
    before, after = out["before"], out["after"]
    print(f"\npipecat bot, relay failover: {summary(before, after)}")
    assert_goes_on(before, after)
