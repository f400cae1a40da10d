"""Live call migration between transceivers, transceiver side (no kernel).

An unmodified aiortc client calls transceiver A through the userspace relay
stand-in of test_transceiver.py (its per-client forwarding socket is the
relay's flow port; it forwards return packets only from the current owner).
During the call A exports and freezes it, B imports it, the forwarder's owner
is switched to B (the relay's ownership flip), B is activated and A releases
the call, all through the HTTP control API the relay's migration code uses.
The client must notice nothing: same ICE/DTLS state, no renegotiation, no
sequence gap, its tone still echoed (by B's agent, from live input).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

import pytest
from aiohttp import ClientSession
from aioice import stun

from manager.protocol.callstate import RtpState, RtpStream, SrtpState
from manager.protocol.sdp import strip_candidates
from manager.transceiver.registrar import Registrar
from manager.transceiver.rtp_streams import WRAP_MARGIN, RtpStreamState, migration_blocker
from manager.transceiver.transceiver import Transceiver
from tests.support.dtls_peers import rsa_certificate, use_certificate
from tests.support.transceiver_calls import (
    UFRAG_A,
    UFRAG_B,
    ClientCall,
    FakeRelay,
    _serve,
    decrypt_rtp,
    hears,
    run,
)
from tests.support.transceiver_migration import (
    Api,
    StateLog,
    inbound_lost,
    migrate,
    owner_addr,
    serve,
    two_transceivers,
)
from tests.support.waiting import eventually_async

# realtime: the checks count media against the wall clock.
pytestmark = pytest.mark.realtime













async def check_after_switch(
    client: ClientCall, m: dict[str, Any], dst: Api, conn_id: int
) -> dict[str, Any]:
    """What the client got from the new owner: same SSRC, no sequence gap, no loss."""
    fwd = client.fwd
    assert fwd is not None
    state = m["state"]
    srtp = state["srtp"]
    audio = next(x for x in state["media"] if x["kind"] == "audio")
    ssrc = audio["local_ssrc"]
    final = state["rtp"]["tx"][str(ssrc)]
    # Only the new owner's packets pass the forwarder after the flip; they
    # decrypt with the exported tx key and continue the old owner's numbering.
    after = decrypt_rtp(srtp["profile"], srtp["tx_key"], fwd.to_client[m["switch_index"] :])
    assert len(after) > 20
    assert {p.ssrc for p in after} == {ssrc}
    assert {p.payload_type for p in after} == {final["payload_type"]}
    seqs = [p.sequence_number for p in after]
    assert seqs == [(final["seq"] + 1 + i) & 0xFFFF for i in range(len(seqs))]
    ts_jump = (after[0].timestamp - final["timestamp"]) & 0xFFFFFFFF
    assert 960 <= ts_jump < 48000, ts_jump  # one frame + the switch time, < 1 s
    lost = await inbound_lost(client) - m["lost_before"]
    assert lost <= 1, f"client lost {lost} packets across the switch"
    info = (await dst.get(f"/calls/{conn_id}"))["migration"]
    assert info["rx_undecryptable"] <= 1 and info["rx_decrypted"] > 20
    assert info["tx_packets"] >= len(after)
    # The audible gap: longest pause between decoded frames at the client.
    times = [t for t, _ in client.frames if m["t_start"] - 0.5 <= t <= m["t_switch"] + 1.0]
    gap = max(b - a for a, b in itertools.pairwise(times))
    return {
        "lost": lost,
        "undecryptable": info["rx_undecryptable"],
        "import_to_first_sent_s": info["import_to_first_sent_s"],
        "activate_to_first_sent_s": info["activate_to_first_sent_s"],
        "activated_by": info["activated_by"],
        "ts_jump": ts_jump,
        "max_frame_gap_s": gap,
        "export_s": m["export_s"],
        "import_s": m["import_s"],
    }


def test_live_migration_a_to_b_and_back(fast_consent: None) -> None:
    async def scenario() -> None:
        relay = FakeRelay()
        relay_runner, relay_url = await _serve(relay.app)
        async with (
            Transceiver(1, capacity=2) as tx_a,
            Transceiver(2, capacity=2) as tx_b,
            ClientSession() as http,
        ):
            ended_a: list[tuple[int, str]] = []
            ended_b: list[tuple[int, str]] = []
            tx_a.on_call_ended.append(lambda c, r: ended_a.append((c, r)))
            tx_b.on_call_ended.append(lambda c, r: ended_b.append((c, r)))
            reg = Registrar(tx_a, relay_url, "http://127.0.0.1:1", interval=0.2)
            await reg.start()
            run_a, api_a = await serve(tx_a, http)
            run_b, api_b = await serve(tx_b, http)
            client = ClientCall(440)
            try:
                await client.place(tx_a, 42, UFRAG_A)
                await client.wait_connected()
                await hears(client, 440, [660])
                await eventually_async(lambda: relay.of("heartbeat")[-1]["calls"] == [42], 2, "listed")
                log = StateLog(client)

                # -- A -> B -------------------------------------------------------------
                m1 = await migrate(client, 42, api_a, api_b, owner_addr(tx_a.owner))
                assert tx_a.calls() == [] and tx_b.calls() == [42]
                assert ended_a == [(42, "released after migration")]
                await eventually_async(lambda: relay.of("heartbeat")[-1]["calls"] == [], 1, "A omits 42")
                # The tone still comes back, now through B...
                await hears(client, 440, [660], since=m1["t_switch"])
                # ...and B's agent echoes live input, not something replayed.
                client.track.freq = 660
                await hears(client, 660, [440], since=time.monotonic())
                r1 = await check_after_switch(client, m1, api_b, 42)
                # Consent: the client checks every ~0.5 s here and would give up
                # after ~3 s of unanswered checks; B answers them.
                # 5 s after the switch nothing has failed: a real-time span.
                await asyncio.sleep(max(0.0, m1["t_switch"] + 5.0 - time.monotonic()))  # real time, see above
                log.assert_untouched(client)

                async def answered() -> dict:
                    info = (await api_b.get("/calls/42"))["migration"]
                    return info if info["stun_answered"] >= 5 else {}

                info = await eventually_async(answered, 3, what="B to answer 5 of the client's checks")
                assert info["stun_rejected"] == 0
                # The data channel moved with the call: B's agent echoes on it.
                while not client.messages.empty():
                    client.messages.get_nowait()
                client.dc.send("after the switch")
                assert await asyncio.wait_for(client.messages.get(), 3) == "after the switch"
                data = (await api_b.get("/calls/42"))["migration"]["data_channels"]
                assert data["rx_records"] >= 1 and data["rx_unauthenticated"] == 0 and data["rx_replayed"] == 0
                health = await api_b.get("/health")
                assert health["calls"] == 1 and "42" in health["migration"]["imported"]

                # -- B -> A (an imported call moves again) --------------------------------
                m2 = await migrate(client, 42, api_b, api_a, owner_addr(tx_b.owner))
                assert m2["state"]["migrations"] == 1
                assert tx_b.calls() == [] and tx_a.calls() == [42]
                assert ended_b == [(42, "released after migration")]
                await eventually_async(lambda: relay.of("heartbeat")[-1]["calls"] == [42], 1, "A lists 42")
                await hears(client, 660, [440], since=m2["t_switch"])
                client.track.freq = 440
                await hears(client, 440, [660], since=time.monotonic())
                r2 = await check_after_switch(client, m2, api_a, 42)
                log.assert_untouched(client)
                print(f"\nmigration A->B: {r1}\nmigration B->A: {r2}")
            finally:
                await client.close()
                await reg.stop(final_heartbeat=False)
                await run_a.cleanup()
                await run_b.cleanup()
        await relay_runner.cleanup()

    run(scenario(), timeout=45)


def test_migration_across_the_sequence_wrap_both_ways(fast_consent: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both senders start 100 packets (2 s) before 65535: the call moves A→B
    before the wrap, wraps at B, moves back B→A past the wrap (rollover
    counter 1 both ways) and A→B again. After each switch audio decrypts on
    both sides: the client hears the echo of its tone, the owner decrypts the
    client's packets."""
    import aiortc.rtcrtpsender

    monkeypatch.setattr(aiortc.rtcrtpsender, "random_sequence_number", lambda: 0xFFFF - 100)

    async def scenario() -> None:
        async with two_transceivers() as (tx_a, api_a, tx_b, api_b):
            client = ClientCall(440)
            rocs = []
            try:
                await client.place(tx_a, 42, UFRAG_A)
                await client.wait_connected()
                # The timeline: both streams wrap 2 s into the call; the first move
                # comes before that, the next two after it.
                await asyncio.sleep(0.8)  # the timeline
                log = StateLog(client)
                owners = [(api_a, owner_addr(tx_a.owner)), (api_b, owner_addr(tx_b.owner))]
                for i, wait in enumerate((2.5, 1.5, 1.5)):
                    (src, src_owner), (dst, _) = owners[i % 2], owners[(i + 1) % 2]
                    m = await migrate(client, 42, src, dst, src_owner)
                    rx = m["state"]["rtp"]["rx"]
                    tx = m["state"]["rtp"]["tx"]
                    rocs.append(([s["roc"] for s in tx.values()], [s["roc"] for s in rx.values()]))
                    before = (await dst.get("/calls/42"))["migration"]["rx_decrypted"]
                    await asyncio.sleep(wait)  # the timeline above

                    async def decrypting(dst=dst, before=before) -> dict:
                        info = (await dst.get("/calls/42"))["migration"]
                        return info if info["rx_decrypted"] - before > 40 else {}

                    info = await eventually_async(decrypting, 3, what="the owner to decrypt > 40 client packets")
                    assert info["rx_undecryptable"] <= 1, info
                    await hears(client, 440, [660], since=m["t_switch"])  # the client decrypts the owner
                    assert await inbound_lost(client) - m["lost_before"] <= 1
                log.assert_untouched(client)
                # Moved once before the wrap, then twice after it, both directions.
                assert rocs[0] == ([0], [0]) and rocs[1] == ([1], [1]) and rocs[2] == ([1], [1]), rocs
            finally:
                await client.close()

    run(scenario(), timeout=45)


def test_failed_import_unfreeze_errors_and_imported_call_lifecycle() -> None:
    async def scenario() -> None:
        async with (
            Transceiver(1, capacity=3) as tx_a,
            Transceiver(2, capacity=0) as tx_full,
            Transceiver(3, capacity=2, consent_timeout=1.0) as tx_c,
            ClientSession() as http,
        ):
            ended_a: list[tuple[int, str]] = []
            ended_c: list[tuple[int, str]] = []
            tx_a.on_call_ended.append(lambda c, r: ended_a.append((c, r)))
            tx_c.on_call_ended.append(lambda c, r: ended_c.append((c, r)))
            runners = []
            for tx in (tx_a, tx_full, tx_c):
                runners.append(await serve(tx, http))
            api_a, api_full, api_c = (api for _, api in runners)
            client = ClientCall(440)
            idle = ClientCall(440)
            try:
                # A call that never connects cannot be exported; unknown ones are 404.
                await tx_a.create_call(8, UFRAG_B, strip_candidates(await idle.offer()))
                status, body = await api_a.post("/calls/8/export", {"freeze": True})
                assert status == 409 and "not connected" in body["error"]
                for path in ("export", "unfreeze", "release", "activate"):
                    status, _ = await api_a.post(f"/calls/99/{path}")
                    assert status == 404, path
                status, body = await api_a.post("/calls/8/export", {"freeze": "yes"})
                assert status == 400

                await client.place(tx_a, 7, UFRAG_A)
                await client.wait_connected()
                await hears(client, 440, [660])
                fwd = client.fwd
                assert fwd is not None
                status, body = await api_a.post("/calls/7/activate")
                assert status == 409 and "not imported" in body["error"]


                # A plain export (empty body: no freeze) is not importable.
                async with http.post(f"{api_a.url}/calls/7/export") as r:
                    assert r.status == 200
                    plain = await r.json()
                assert plain["frozen"] is None and plain["srtp"]["tx_key"]
                status, body = await api_full.post("/calls/import", {"conn_id": 7, "state": plain})
                assert status == 400 and "freeze" in body["error"]

                # Freeze; the import fails (bad state, then capacity): A stays silent...
                lost_before = await inbound_lost(client)
                status, state = await api_a.post("/calls/7/export", {"freeze": True})
                assert status == 200 and state["frozen"] is not None
                assert (await api_a.get("/health"))["migration"]["frozen"] == [7]
                n_frozen = len(fwd.to_client)
                bad = json.loads(json.dumps(state))
                del bad["srtp"]["tx_key"]
                status, body = await api_full.post("/calls/import", {"conn_id": 7, "state": bad})
                assert status == 400 and "srtp.tx_key" in body["error"]
                status, body = await api_full.post("/calls/import", {"conn_id": 8, "state": state})
                assert status == 400 and "conn_id" in body["error"]
                status, body = await api_full.post("/calls/import", {"conn_id": 7, "state": state})
                assert status == 503 and "capacity" in body["error"]
                status, body = await api_full.post("/calls/import", {"conn_id": 7})
                assert status == 400 and "state" in body["error"]
                await eventually_async(lambda: tx_a.call_info(7)["migration"]["frozen_dropped"] >= 15, 3,
                                       what="A to hold back 15 packets while frozen")
                n_unfreeze = len(fwd.to_client)
                # (at most one packet still in flight from before the freeze)
                assert n_unfreeze - n_frozen <= 1 and tx_a.call_info(7)["migration"]["frozen_dropped"] >= 15

                # ...then unfreezes: the call goes on at A with no sequence gap.
                t_unfreeze = time.monotonic()
                status, _ = await api_a.post("/calls/7/unfreeze")
                assert status == 204
                await hears(client, 440, [660], since=t_unfreeze)
                ssrc = next(m["local_ssrc"] for m in state["media"] if m["kind"] == "audio")
                final = state["rtp"]["tx"][str(ssrc)]["seq"]
                resumed = decrypt_rtp(
                    state["srtp"]["profile"], state["srtp"]["tx_key"], fwd.to_client[n_unfreeze:]
                )
                assert [p.sequence_number for p in resumed[:5]] == [
                    (final + 1 + i) & 0xFFFF for i in range(5)
                ]
                assert await inbound_lost(client) - lost_before <= 1
                assert client.pc.connectionState == "connected"

                # An imported call before the flip: answers checks, sends no media
                # until activated (here: by the first authenticated STUN check).
                status, body = await api_c.post("/calls/import", {"conn_id": 7, "state": state})
                assert status == 201 and owner_addr(body["owner"]) == owner_addr(tx_c.owner)
                status, _ = await api_c.post("/calls/import", {"conn_id": 7, "state": state})
                assert status == 409
                info = await api_c.get("/calls/7")
                assert info["imported"] and "tx_key" not in json.dumps(info)
                assert info["export"]["migrations"] == 1

                loop = asyncio.get_running_loop()
                replies: asyncio.Queue[bytes] = asyncio.Queue()

                class Probe(asyncio.DatagramProtocol):
                    def datagram_received(self, data: bytes, addr: Any) -> None:
                        replies.put_nowait(data)

                probe, _ = await loop.create_datagram_endpoint(Probe, local_addr=("127.0.0.1", 0))

                def check(password: str) -> bytes:
                    msg = stun.Message(
                        message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST
                    )
                    msg.attributes["USERNAME"] = f"{UFRAG_A}:{state['ice']['remote_ufrag']}"
                    msg.attributes["ICE-CONTROLLING"] = 1
                    msg.add_message_integrity(password.encode())
                    return bytes(msg)

                c_owner = owner_addr(tx_c.owner)
                probe.sendto(check("x" * 22), c_owner)  # wrong password: no answer
                await eventually_async(lambda: tx_c._calls[7].stats.stun_rejected == 1, 2, "rejected")
                await asyncio.sleep(0.1)  # nothing must come back: a window for a wrong answer to arrive
                assert replies.empty() and tx_c._calls[7].media.stats.tx_packets == 0
                probe.sendto(check(state["ice"]["local_pwd"]), c_owner)
                reply = stun.parse_message(await asyncio.wait_for(replies.get(), 2))
                assert reply.message_class == stun.Class.RESPONSE
                assert reply.check_message_integrity(state["ice"]["local_pwd"].encode())
                assert reply.attributes["XOR-MAPPED-ADDRESS"] == probe.get_extra_info("sockname")
                # Activated by the check; media now goes to the authenticated source.
                srtp = await asyncio.wait_for(replies.get(), 2)
                assert 127 < srtp[0] < 192
                assert tx_c._calls[7].stats.activated_by == "stun"
                probe.close()
                # No more checks: consent expires (1 s here, 30 s by default).
                await eventually_async(lambda: ended_c, 3, "consent expiry")
                assert ended_c == [(7, "ICE consent expired")] and tx_c.calls() == []

                # Roll-back of an import (DELETE) before the flip sends nothing.
                status, _ = await api_c.post("/calls/import", {"conn_id": 7, "state": state})
                assert status == 201
                async with http.delete(f"{api_c.url}/calls/7") as r:
                    assert r.status == 204
                assert fwd.not_owner[c_owner] == 0  # tx_c never sent to the flow port

                # Release: A drops the call quietly (no DTLS close_notify to the client).
                status, _ = await api_a.post("/calls/7/release")
                assert status == 204
                assert ended_a == [(7, "released after migration")] and tx_a.calls() == [8]
                await asyncio.sleep(0.3)  # nothing must happen: a window for a close_notify to arrive
                assert client.pc.connectionState == "connected"
            finally:
                await client.close()
                await idle.close()
                for runner, _ in runners:
                    await runner.cleanup()

    run(scenario(), timeout=40)


def test_migration_blocker_and_stream_state() -> None:
    keys = SrtpState(profile="p", tx_key="00", rx_key="00", keying_material="00")

    def rtp(tx: dict[str, RtpStream], rx: dict[str, RtpStream]) -> RtpState:
        return RtpState(tx=tx, rx=rx)

    ok = RtpStreamState(ssrc=1, payload_type=111, seq=100, packets=5).to_model()
    assert migration_blocker(keys, rtp({"1": ok}, {"2": ok})) is None
    assert "no SRTP keys" in (migration_blocker(SrtpState(profile="p"), rtp({}, {})) or "")
    assert "no SRTP keys" in (migration_blocker(None, rtp({}, {})) or "")
    # Wrapped or about to wrap: no reason to refuse (the counters move along).
    wrapped = ok.model_copy(update={"roc": 2})
    assert migration_blocker(keys, rtp({"1": ok}, {"2": wrapped})) is None
    near = ok.model_copy(update={"seq": 0xFFFF - WRAP_MARGIN + 1})
    assert migration_blocker(keys, rtp({"1": near}, {})) is None
    st = RtpStreamState.from_model(ok)
    assert st.is_newer(101) and not st.is_newer(100) and not st.is_newer(99)
    with pytest.raises(ValueError, match=r"seq"):
        RtpStream(ssrc=1, payload_type=111, seq=70000)


def test_a_freeze_expires_by_itself_when_no_release_comes() -> None:
    """relayd died between export-with-freeze and the flip: the old owner's
    lease runs out and the call is heard again; a release before the lease
    ends the call instead."""

    async def scenario() -> None:
        async with Transceiver(1, capacity=3, freeze_lease=0.8) as tx:
            client = ClientCall(440)
            try:
                await client.place(tx, 7, UFRAG_A)
                await client.wait_connected()
                fwd = client.fwd
                assert fwd is not None
                await eventually_async(lambda: len(fwd.to_client) >= 25, what="media to the client")
                tx.export_call(7, freeze=True)
                assert tx.health()["migration"]["frozen"] == [7]

                def held() -> int:
                    return tx.call_info(7)["migration"]["frozen_dropped"]

                await eventually_async(lambda: held() >= 1, what="the first packet held back")
                frozen_count = len(fwd.to_client)
                await eventually_async(lambda: held() >= 15, what="15 packets held back")
                assert len(fwd.to_client) - frozen_count <= 1  # silent while frozen
                await eventually_async(lambda: tx.health()["migration"]["frozen"] == [], 3, "the lease to expire")
                assert tx.leases_expired == 1
                resumed = len(fwd.to_client)
                await eventually_async(lambda: len(fwd.to_client) - resumed > 10, what="media flowing again")
                # An unfreeze or a release stops the lease: nothing expires afterwards.
                tx.export_call(7, freeze=True)
                tx.unfreeze_call(7)
                await asyncio.sleep(1.0)  # longer than the 0.8 s lease: nothing must expire
                assert tx.leases_expired == 1
            finally:
                await client.close()

    run(scenario(), timeout=30)


def test_a_session_with_an_rsa_certificate_peer_migrates(fast_consent: None) -> None:
    """A client with an RSA-2048 certificate (GStreamer's default) negotiates
    an ECDHE-RSA suite; its call moves A → B with audio and the data channel."""

    async def scenario() -> None:
        async with two_transceivers() as (tx_a, api_a, tx_b, api_b):
            client = ClientCall(440)
            use_certificate(client.pc, rsa_certificate(2048))
            try:
                await client.place(tx_a, 43, UFRAG_A)
                await client.wait_connected()
                await hears(client, 440, [660])
                dtls = (await api_a.get("/calls/43"))["export"]["dtls"]
                assert (dtls["version"], dtls["cipher"]) == ("DTLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256")
                log = StateLog(client)
                m = await migrate(client, 43, api_a, api_b, owner_addr(tx_a.owner))
                assert m["state"]["sctp"]["association"] is not None, m["state"]["sctp"]["not_carried"]
                switched = time.monotonic()
                client.track.freq = 660
                await hears(client, 660, [440], since=switched)
                await check_after_switch(client, m, api_b, 43)
                client.dc.send("after the switch")
                assert await asyncio.wait_for(client.messages.get(), 3) == "after the switch"
                data = (await api_b.get("/calls/43"))["migration"]["data_channels"]
                assert data["rx_records"] >= 1 and data["rx_unauthenticated"] == 0
                log.assert_untouched(client)
            finally:
                await client.close()

    run(scenario(), timeout=30)
