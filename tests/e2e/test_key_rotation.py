"""Rotating the routing-hint key and the client-token key during a live
call, as docs/operations.md tells an operator to: `relayctl keys add`,
`relayctl reload`, later `relayctl keys retire` and reload again. Real
relayd with XDP, transceiver processes following their key file, aiortc
clients in the client namespace.

While both keys are listed, the call placed before the rotation keeps its
audio and data channel, migrates to the other transceiver, and its ufrag
still opens a new leg; new calls carry the new key id, and a token of the
old key still creates a call. Once the old keys are retired, the old call's
ufrag and an old-key token are refused (this fails if retiring changes
nothing)."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import socket
import subprocess
import sys

import pytest
from aioice import stun

from manager.lab.client import client_call
from manager.lab.services import lab_client_token, running_lab
from manager.relay.control_client import ControlClient
from tests.support.lab_calls import assert_untouched, audio_flowing, rtp_received, run_call
from tests.support.waiting import eventually_async

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with running_lab(f"kr{secrets.token_hex(3)}", tmp_path_factory.mktemp("keys"), client_auth="tokens") as (lab, svc):
        yield lab, svc, ControlClient(svc.config["control_socket"])


def server_ufrag(answer: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in answer.splitlines() if line.startswith("a=ice-ufrag:"))


def key_id(ufrag: str) -> int:
    return base64.b64decode(ufrag)[7]  # manager/protocol/ufrag.py: the key id's byte


async def relayctl(svc, *args: str) -> str:
    res = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "cli.relayctl", "--socket", svc.config["control_socket"], *args],
        capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res
    return res.stdout


async def probe(lab, ufrag: str) -> None:
    """A binding request for the call's ufrag from a tuple the relay never saw
    (as a client's new network path would send): the slow path decodes the hint."""
    msg = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    msg.attributes["USERNAME"] = f"{ufrag}:prb{secrets.token_hex(2)}"
    msg.attributes["PRIORITY"] = 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(bytes(msg), (lab.vip4, lab.port))


def events(ctl: ControlClient) -> dict:
    return ctl.stats()["slowpath"]["events"]


def test_rotation_during_a_live_call(env):
    lab, svc, ctl = env
    hint, tok = str(svc.workdir / "hint.key"), str(svc.workdir / "token.key")
    first, old_token, retired_token = (lab_client_token(svc.workdir) for _ in range(3))
    seen: dict = {}

    async def rotate(pc, rep) -> None:
        await audio_flowing(pc)
        old_ufrag = server_ufrag(rep.answer)
        seen["old_key_id"] = key_id(old_ufrag)
        # 1. A new key for each, signing; relayd takes them on reload.
        await relayctl(svc, "keys", "add", "hint", "--file", hint)
        await relayctl(svc, "keys", "add", "token", "--file", tok)
        seen["reload"] = json.loads(await relayctl(svc, "reload", "--json"))
        new_token = json.loads(await relayctl(svc, "token", "--key-file", tok, "--json"))["token"]
        # 2. A new call: the new key id in its ufrag; an old key's token still creates one.
        seen["new"] = await client_call(lab.signaling_url, token=new_token, duration=1.0, messages=2)
        seen["old_token"] = await client_call(lab.signaling_url, token=old_token, duration=0.3, messages=0)
        # 3. The old call: its ufrag still opens a leg, and it migrates (the target checks its hint).
        before = await asyncio.to_thread(events, ctl)
        await probe(lab, old_ufrag)
        seen["opened"] = await eventually_async(
            lambda: asyncio.to_thread(lambda: events(ctl).get("legs_opened", 0) > before.get("legs_opened", 0)),
            10, what="the old call's ufrag admitted")
        now = await asyncio.to_thread(events, ctl)
        seen["forged_before"] = now.get("drop_forged_hint", 0) - before.get("drop_forged_hint", 0)
        sessions = (await asyncio.to_thread(ctl.sessions))["sessions"]
        call = next(s for s in sessions if rep.call_url.endswith(s["call_id"]))
        rep.mark("migrated")
        seen["migration"] = await asyncio.to_thread(ctl.request, "POST", f"/sessions/{call['call_id']}/migrate",
                                                    {"to": 2 if call["transceiver"] == 1 else 1})
        await audio_flowing(pc, packets=(await rtp_received(pc)) + 25)  # audio from the new owner
        # 4. Retire the old keys: its ufrag and its tokens are refused from the reload on.
        await relayctl(svc, "keys", "retire", "hint", str(seen["old_key_id"]), "--file", hint)
        await relayctl(svc, "keys", "retire", "token", "0", "--file", tok)
        seen["retire"] = json.loads(await relayctl(svc, "reload", "--json"))
        before = await asyncio.to_thread(events, ctl)
        await probe(lab, old_ufrag)
        await eventually_async(
            lambda: asyncio.to_thread(lambda: events(ctl).get("drop_forged_hint", 0)
                                      > before.get("drop_forged_hint", 0)),
            10, what="the retired key's ufrag refused")
        seen["retired_token"] = await client_call(lab.signaling_url, token=retired_token, duration=0.3, messages=0)
        newer = json.loads(await relayctl(svc, "token", "--key-file", tok, "--json"))["token"]
        seen["after"] = await client_call(lab.signaling_url, token=newer, duration=0.5, messages=1)

    rep = run_call(lab, token=first, on_connected=rotate, duration=2.0, messages=4)
    assert_untouched(rep)
    assert rep.dc_echoed == rep.dc_sent == 4  # the data channel carried on through it all
    assert rep.tone_ratio_after["migrated"] > 0.5, rep.tone_ratio_after
    assert seen["old_key_id"] == 0  # the lab's plain key file: the legacy key 0
    assert seen["reload"]["changed"] == ["hint keys: 0* -> 0,1*", "client_auth.token_keys: 0* -> 0,1*"]
    new = seen["new"]
    assert new.connected and new.error is None and new.dc_echoed == 2, new.error
    assert key_id(server_ufrag(new.answer)) == 1  # new calls carry the new key's id
    assert seen["old_token"].connected, seen["old_token"].error
    assert seen["forged_before"] == 0
    assert seen["migration"]["outcome"] == "moved", seen["migration"]
    assert seen["retire"]["changed"] == ["hint keys: 0,1* -> 1*", "client_auth.token_keys: 0,1* -> 1*"]
    refused = seen["retired_token"]
    assert refused.status == 401 and "token key id 0 is not accepted" in refused.error, refused.error
    assert seen["after"].connected and key_id(server_ufrag(seen["after"].answer)) == 1
