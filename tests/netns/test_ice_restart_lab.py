"""ICE restart through the real relay (relayd with XDP, a transceiver process):
an unmodified aiortc client's call is restarted by PATCH (RFC 9725); the
relay's XDP admission lets the new server ufrag in and no longer the old one.

aiortc cannot restart ICE itself: the client's side is its aioice connection
given the new credentials (what a browser's ICE agent does with the
answer), and bare STUN checks from fresh sockets of the client namespace
play the client at a new address. The call goes on: same call, same agent
session, media and data channel both ways. In a fleet the new ufrag reaches
the other relay through the shared registry (Redis): its XDP admits the new
ufrag and no longer the old one."""

from __future__ import annotations

import asyncio
import secrets

import aiohttp
import aioice.ice
import pytest
from aioice import stun

from manager.lab.routing import route_vip
from manager.lab.services import running_lab
from manager.protocol.sdpfrag import parse_fragment
from tests.support.lab_calls import assert_untouched, audio_flowing, run_call, vip_at_relay_1
from tests.support.stun_checks import ask, binding_check
from tests.support.waiting import eventually_async

# realtime: consent and media are judged against the wall clock.
pytestmark = [pytest.mark.netns, pytest.mark.realtime]

CLIENT_UFRAG, CLIENT_PWD = "cli2", "clientpasswordclientpwd2"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with running_lab(f"ir{secrets.token_hex(3)}", tmp_path_factory.mktemp("services"), transceivers=1) as (lab, svc):
        yield lab, svc


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    with running_lab(f"irf{secrets.token_hex(2)}", tmp_path_factory.mktemp("fleet"), transceivers=1,
                     relays=2) as (lab, svc), vip_at_relay_1(lab):
        yield lab, svc


async def patch_restart(call_url: str):
    fragment = f"a=ice-ufrag:{CLIENT_UFRAG}\r\na=ice-pwd:{CLIENT_PWD}\r\n"
    headers = {"Content-Type": "application/trickle-ice-sdpfrag", "If-Match": "*"}
    async with aiohttp.ClientSession() as http, http.patch(call_url, data=fragment, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return parse_fragment(await resp.text())


def take_new_credentials(pc, frag) -> None:
    """The client's ICE agent takes its new credentials and the answer's."""
    conn = pc.getTransceivers()[0].sender.transport.transport.iceGatherer._connection
    conn._local_username, conn._local_password = CLIENT_UFRAG, CLIENT_PWD
    conn.remote_username, conn.remote_password = frag.ufrag, frag.pwd


@pytest.fixture
def fast_client_consent(monkeypatch: pytest.MonkeyPatch) -> None:
    # The client's own consent checks every ~0.5 s (aioice reads the global at
    # run time; the transceiver is another process): its first check with the
    # new credentials comes soon after they are set.
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.5)


def test_an_aiortc_call_restarts_ice_through_the_relay(env, fast_client_consent: None) -> None:
    lab, svc = env
    seen: dict = {}

    async def restart(pc, rep) -> None:
        await audio_flowing(pc)
        (session,) = (await asyncio.to_thread(svc.control.sessions))["sessions"]
        conn_id, tx = session["conn_id"], session["transceiver"]
        seen["info_before"] = await asyncio.to_thread(svc.transceiver_api, tx, f"/calls/{conn_id}")
        old_ufrag = session["server_ufrag"]
        frag = await patch_restart(rep.call_url)
        assert frag.ufrag != old_ufrag and frag.pwd and frag.candidates
        seen["frag"] = frag
        vip = (lab.vip4, lab.port)
        # A client at a new address: the new ufrag passes XDP's admission and the
        # owner answers with its new password; the old ufrag routes nothing now.
        # Its first check, sent once the 200 is read, is answered (one try): the
        # PATCH answers only once all that admits the new ufrag is in place, as a
        # browser's first check, lost, would wait for its next (a few hundred ms).
        reply, _ = await ask(vip, binding_check(f"{frag.ufrag}:{CLIENT_UFRAG}", frag.pwd), timeout=2.0)
        assert reply is not None and reply.message_class == stun.Class.RESPONSE
        assert reply.check_message_integrity(frag.pwd.encode())
        seen["old_answered"], _ = await ask(vip, binding_check(f"{old_ufrag}:{CLIENT_UFRAG}", "x" * 22), tries=3)
        # The client's ICE agent takes the new credentials; its next check completes the restart.
        take_new_credentials(pc, frag)

        async def completed() -> dict | None:
            info = await asyncio.to_thread(svc.transceiver_api, tx, f"/calls/{conn_id}")
            return info if info and info["ice"]["restarts"] == 1 and info["migration"]["remote"] == \
                seen["info_before"]["migration"]["remote"] else None

        seen["info_after"] = await eventually_async(completed, 10, what="the restart completed, replies back home")
        rep.mark("restarted")
        seen["session_after"] = (await asyncio.to_thread(svc.control.sessions))["sessions"]
        seen["session"] = session

    rep = run_call(lab, on_connected=restart, duration=3.0, messages=6)
    assert_untouched(rep)
    assert seen["old_answered"] is None
    before, after = seen["info_before"], seen["info_after"]
    assert after["agent_session"] == before["agent_session"]  # the same agent session object
    assert after["ice"] == {"ufrag": seen["frag"].ufrag, "restarts": 1, "restart_pending": False}
    (now,) = seen["session_after"]
    assert (now["call_id"], now["conn_id"], now["server_ufrag"]) == (
        seen["session"]["call_id"], seen["session"]["conn_id"], seen["frag"].ufrag)
    # Media and the data channel went on both ways after the restart.
    assert rep.frames_after["restarted"] > 50 and rep.tone_ratio_after["restarted"] > 0.5, rep
    assert rep.dc_echoed == rep.dc_sent == 6


def test_the_other_relay_of_a_fleet_admits_the_new_ufrag(fleet, fast_client_consent: None) -> None:
    lab, svc = fleet
    seen: dict = {}

    async def restart(pc, rep) -> None:
        await audio_flowing(pc)
        call_id = rep.call_url.rsplit("/", 1)[1]
        frag = await patch_restart(rep.call_url)  # at relay 1, where the VIP routes
        seen["frag"] = frag

        def relay2_knows() -> dict | None:
            s = next((s for s in svc.control_of(2).sessions()["sessions"] if s["call_id"] == call_id), None)
            return s if s is not None and s["server_ufrag"] == frag.ufrag else None

        await eventually_async(lambda: asyncio.to_thread(relay2_knows), 5, what="relay 2 learning the new ufrag")
        take_new_credentials(pc, frag)
        await asyncio.to_thread(route_vip, lab, 2)  # the client's next network reaches relay 2
        try:
            vip = (lab.vip4, lab.port)
            reply, _ = await ask(vip, binding_check(f"{frag.ufrag}:{CLIENT_UFRAG}", frag.pwd), tries=3)
            assert reply is not None and reply.message_class == stun.Class.RESPONSE
            assert reply.check_message_integrity(frag.pwd.encode())
            seen["relay2"] = next(s for s in svc.control_of(2).sessions()["sessions"] if s["call_id"] == call_id)
        finally:
            await asyncio.to_thread(route_vip, lab, 1)
        rep.mark("restarted")

    rep = run_call(lab, on_connected=restart, duration=3.0, messages=6)
    assert_untouched(rep)
    # Relay 2 took the client at its new address by the new ufrag's hint.
    assert seen["relay2"]["server_ufrag"] == seen["frag"].ufrag and seen["relay2"]["legs"], seen["relay2"]
    assert rep.frames_after["restarted"] > 50 and rep.tone_ratio_after["restarted"] > 0.5, rep
    assert rep.dc_echoed == rep.dc_sent == 6
