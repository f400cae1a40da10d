"""ICE restart on the transceiver (its control API's ``/calls/{id}/ice-restart``):
an engine call takes new credentials beside the old ones, completes the
restart at the first check with the new ones, retires the old, and goes on
with the same agent session, media and DTLS; a restarted call still
migrates. aiortc clients cannot restart ICE, so the client's side of the
restart is its aioice connection given the new credentials (what a browser's
ICE agent does after restartIce()), and a bare STUN check plays a client at
a new address."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import ClientSession
from aioice import stun

from manager.protocol.ufrag import encode_ufrag
from manager.transceiver.imported_call import ImportedCall
from manager.transceiver.transceiver import Transceiver
from tests.support.stun_checks import ask, binding_check
from tests.support.transceiver_calls import ClientCall, assert_dominant, run
from tests.support.transceiver_migration import StateLog, migrate, owner_addr, serve
from tests.support.waiting import eventually_async

# realtime: consent and media are judged against the wall clock.
pytestmark = pytest.mark.realtime

KEY = b"h" * 32
CONN = 42
CLIENT_UFRAG, CLIENT_PWD = "cli2", "clientpasswordclientpwd2"


async def engine_call(tx: Transceiver, ufrag: str) -> tuple[ClientCall, ImportedCall]:
    client = ClientCall(440)
    await client.place(tx, CONN, ufrag)
    await client.wait_connected()
    await eventually_async(lambda: isinstance(tx._calls.get(CONN), ImportedCall), 10, what="the hand-over")
    return client, tx._calls[CONN]  # type: ignore[return-value]


def client_restarts(client: ClientCall, server_ufrag: str, server_pwd: str) -> None:
    """The client's ICE agent takes its new credentials and the answer's (as a
    browser does after restartIce() and the PATCH's answer)."""
    conn = client.pc.getTransceivers()[0].sender.transport.transport.iceGatherer._connection
    conn._local_username, conn._local_password = CLIENT_UFRAG, CLIENT_PWD
    conn.remote_username, conn.remote_password = server_ufrag, server_pwd


def test_a_restart_keeps_the_call_and_retires_the_old_credentials(fast_consent: None) -> None:
    async def scenario() -> None:
        async with (
            Transceiver(1, capacity=2, media_engine=True, hint_key=KEY) as tx_a,
            Transceiver(2, capacity=2, media_engine=True, hint_key=KEY) as tx_b,
            ClientSession() as http,
        ):
            run_a, api_a = await serve(tx_a, http)
            run_b, api_b = await serve(tx_b, http)
            first = encode_ufrag(KEY, 1, CONN)
            client, call = await engine_call(tx_a, first)
            try:
                log = StateLog(client)
                session = tx_a.call_info(CONN)["agent_session"]
                old_pwd = call.ice.current.local_pwd
                new = encode_ufrag(KEY, 1, CONN)
                status, creds = await api_a.post(f"/calls/{CONN}/ice-restart", {
                    "ufrag": new, "remote_ufrag": CLIENT_UFRAG, "remote_pwd": CLIENT_PWD})
                assert status == 200, creds
                assert creds["ufrag"] == new and len(creds["pwd"]) >= 22 and creds["pwd"] != old_pwd
                assert tx_a.call_info(CONN)["ice"] == {"ufrag": first, "restarts": 0, "restart_pending": True}
                # Until the client uses them the old credentials hold: consent
                # (1.5 s here) outlives a pause longer than its timeout.
                await asyncio.sleep(2.0)  # pacing: past one consent timeout on the old credentials
                assert tx_a.calls() == [CONN] and client.pc.connectionState == "connected"
                owner = owner_addr(tx_a.owner)
                answered = call.stats.consent_checks_answered
                client_restarts(client, new, creds["pwd"])
                await eventually_async(lambda: tx_a.call_info(CONN)["ice"]["restarts"] == 1, 5,
                                       what="the client's first check with the new credentials")
                assert tx_a.call_info(CONN)["ice"] == {"ufrag": new, "restarts": 1, "restart_pending": False}
                # The old credentials are retired: a check with them reaches no call.
                dropped = tx_a.health()["demux"].get("drop_unknown_ufrag", 0)
                assert (await ask(owner, binding_check(f"{first}:{CLIENT_UFRAG}", old_pwd), timeout=0.5, bind="127.0.0.1"))[0] is None
                assert tx_a.health()["demux"]["drop_unknown_ufrag"] == dropped + 1
                # A client at a new address is answered with the new password; the
                # media stays on the live path (the check nominates nothing).
                home = call.remote_addr
                reply, _ = await ask(owner, binding_check(f"{new}:{CLIENT_UFRAG}", creds["pwd"]), bind="127.0.0.1")
                assert reply is not None and reply.message_class == stun.Class.RESPONSE
                assert reply.check_message_integrity(creds["pwd"].encode())
                assert call.remote_addr == home
                # Our own consent checks now carry the client's new credentials, and it answers them.
                await eventually_async(lambda: call.stats.consent_checks_answered > answered + 1, 5,
                                       what="consent answered under the new credentials")
                await asyncio.sleep(1.2)  # pacing: a window of echoed tone to judge
                assert_dominant(client.window(0.5), 440, [660])
                assert tx_a.call_info(CONN)["agent_session"] == session  # the same agent session object
                # The export carries the current credentials: the restarted call migrates.
                state = tx_a.export_call_state(CONN)
                assert (state["ice"]["local_ufrag"], state["ice"]["local_pwd"]) == (new, creds["pwd"])
                assert (state["ice"]["remote_ufrag"], state["ice"]["remote_pwd"]) == (CLIENT_UFRAG, CLIENT_PWD)
                await migrate(client, CONN, api_a, api_b, owner)
                await asyncio.sleep(2.0)  # pacing: past a consent timeout on the new owner
                assert tx_b.calls() == [CONN] and client.pc.connectionState == "connected"
                assert tx_b.call_info(CONN)["ice"]["ufrag"] == new
                assert_dominant(client.window(0.5), 440, [660])
                log.assert_untouched(client)
                # On the new owner too a check with the restart's credentials that
                # nominates another pair takes the replies at once; the client's
                # checks bring them back once that path has fallen silent.
                home = tx_b._calls[CONN].remote_addr
                reply, moved_to = await ask(owner_addr(tx_b.owner), binding_check(
                    f"{new}:{CLIENT_UFRAG}", creds["pwd"], nominate=True), bind="127.0.0.1")
                assert reply is not None and reply.message_class == stun.Class.RESPONSE
                assert tx_b._calls[CONN].remote_addr == moved_to
                await eventually_async(lambda: tx_b._calls[CONN].remote_addr == home, 5,
                                       what="the client's checks taking the replies back")
            finally:
                await client.close()
                await run_a.cleanup()
                await run_b.cleanup()

    run(scenario(), timeout=60)


def test_bad_restarts_are_refused_and_leave_the_call() -> None:
    async def scenario() -> None:
        async with Transceiver(1, capacity=2, media_engine=True, hint_key=KEY) as tx, ClientSession() as http:
            runner, api = await serve(tx, http)
            client, call = await engine_call(tx, encode_ufrag(KEY, 1, CONN))
            try:
                body = {"ufrag": encode_ufrag(KEY, 1, CONN), "remote_ufrag": CLIENT_UFRAG, "remote_pwd": CLIENT_PWD}
                cases = [
                    ({**body, "ufrag": encode_ufrag(KEY, 1, CONN + 1)}, 400, "ufrag routes to conn_id 43, not 42"),
                    ({**body, "ufrag": encode_ufrag(b"x" * 32, 1, CONN)}, 400, "ufrag carries no valid routing hint"),
                    ({**body, "remote_pwd": "short"}, 400, "remote_pwd must be 22 to 256"),
                    ({**body, "ufrag": call.ufrag}, 409, "ufrag"),
                    ({"ufrag": body["ufrag"]}, 400, "missing field(s): remote_ufrag, remote_pwd"),
                ]
                for request, status, error in cases:
                    got, reply = await api.post(f"/calls/{CONN}/ice-restart", request)
                    assert got == status and error in reply["error"], (request, reply)
                got, _ = await api.post(f"/calls/{CONN + 1}/ice-restart", body)
                assert got == 404
                assert tx.call_info(CONN)["ice"]["restart_pending"] is False
            finally:
                await client.close()
                await runner.cleanup()

    run(scenario(), timeout=30)


def test_a_call_kept_on_aiortc_cannot_restart() -> None:
    async def scenario() -> None:
        async with Transceiver(1, capacity=2, media_engine=False, hint_key=KEY) as tx, ClientSession() as http:
            runner, api = await serve(tx, http)
            client = ClientCall(440)
            await client.place(tx, CONN, encode_ufrag(KEY, 1, CONN))
            try:
                await client.wait_connected()
                status, reply = await api.post(f"/calls/{CONN}/ice-restart", {
                    "ufrag": encode_ufrag(KEY, 1, CONN), "remote_ufrag": CLIENT_UFRAG, "remote_pwd": CLIENT_PWD})
                assert status == 422, reply
                assert reply["error"] == (f"call {CONN} runs on aiortc, whose ICE agent (aioice) cannot restart "
                                          "ICE; only calls on the media engine can")
                assert tx.calls() == [CONN] and client.pc.connectionState == "connected"
            finally:
                await client.close()
                await runner.cleanup()

    run(scenario(), timeout=30)
