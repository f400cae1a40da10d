"""Transceiver tests: real aiortc clients call a Transceiver through a userspace relay stand-in.

No kernel involved. The client is an unmodified aiortc RTCPeerConnection; a
small asyncio UDP forwarder plays the relay (answer candidates rewritten to
it, one forwarding socket per client address), so the transceiver only ever
sees the forwarder's addresses, as peer-reflexive candidates.
"""

from __future__ import annotations

import array
import asyncio
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import aioice.ice
import av
import pylibsrtp
import pytest
from aiohttp import ClientSession
from aioice import stun
from aiortc.rtp import is_rtcp

from manager import pki
from manager.protocol.sdp import strip_candidates
from manager.transceiver.agent import (
    AgentAudioTrack,
    AgentSession,
    CallEnded,
    EchoAgent,
)
from manager.transceiver.control import create_app
from manager.transceiver.errors import CapacityExceeded, DuplicateCall, InvalidRequest, UnknownCall
from manager.transceiver.registrar import Registrar
from manager.transceiver.rtp_streams import RtpStreamState
from manager.transceiver.transceiver import Transceiver
from tests.support.paths import REPO
from tests.support.transceiver_calls import (
    UFRAG_A,
    UFRAG_B,
    ClientCall,
    FakeRelay,
    Forwarder,
    _serve,
    decrypt_rtp,
    hears,
    run,
)
from tests.support.waiting import eventually_async

# realtime: the checks count media against the wall clock.
pytestmark = pytest.mark.realtime







# -- media helpers ---------------------------------------------------------------------




# -- relay stand-in -------------------------------------------------------------------------










def sdp_attr_values(sdp: str, name: str) -> list[str]:
    prefix = f"a={name}:"
    return [line[len(prefix) :] for line in sdp.splitlines() if line.startswith(prefix)]


# -- end-to-end ------------------------------------------------------------------------


def test_call_echoes_audio_and_messages_and_exports_real_keys() -> None:
    # aiortc's own path (its ICE state is read below); tests/netns/transceiver/
    # test_media_engine.py checks the same on the media engine.
    async def scenario() -> None:
        ended: list[tuple[int, str]] = []
        async with Transceiver(1, capacity=4, media_engine=False) as tx:
            tx.on_call_ended.append(lambda c, r: ended.append((c, r)))
            client = ClientCall(440)
            await client.place(tx, 42, UFRAG_A)
            assert client.fwd is not None

            # The answer uses exactly the given ufrag, and its candidate is the
            # owner address: the one shared ICE socket.
            assert set(sdp_attr_values(client.answer, "ice-ufrag")) == {UFRAG_A}
            cands = sdp_attr_values(client.answer, "candidate")
            assert cands and all(
                c.split()[4:6] == ["127.0.0.1", str(client.owner["port4"])] for c in cands
            )
            assert client.owner == tx.owner and client.owner["addr6"] is None
            assert tx.calls() == [42]

            await client.wait_connected()
            await eventually_async(
                lambda: tx.call_info(42)["connection_state"] == "connected", 5, "server connected"
            )

            # Data channel round trip, text and binary.
            client.dc.send("hello agent")
            assert await asyncio.wait_for(client.messages.get(), 3) == "hello agent"
            client.dc.send(b"\x00\x01binary")
            assert await asyncio.wait_for(client.messages.get(), 3) == b"\x00\x01binary"

            # Audio: what comes back is what we send, and follows a change.
            await hears(client, 440, [660, 880])
            client.track.freq = 660
            await hears(client, 660, [440, 880], since=time.monotonic())

            # The transceiver knows the client only as the forwarder's leg (prflx).
            state = tx.export_call_state(42)
            json.dumps(state)  # JSON-serialisable
            remote = state["ice"]["selected_pair"]["remote"]
            assert remote["type"] == "prflx"
            assert (remote["host"], remote["port"]) in client.fwd.leg_addrs
            conn = tx._calls[42].connection
            assert {c.type for c in conn.remote_candidates} == {"prflx"}
            assert state["ice"]["local_ufrag"] == UFRAG_A
            assert state["ice"]["local_pwd"] == sdp_attr_values(client.answer, "ice-pwd")[0]
            assert state["ice"]["remote_ufrag"] == sdp_attr_values(client.offer_sdp, "ice-ufrag")[0]
            assert state["ice"]["remote_pwd"] == sdp_attr_values(client.offer_sdp, "ice-pwd")[0]
            assert state["ice"]["role"] == "controlled"
            assert state["dtls"]["role"] == "client"  # answer to actpass: we connect

            # SRTP keys: same DTLS session as the client's transport...
            srtp = state["srtp"]
            client_dtls = client.pc.getTransceivers()[0].receiver.transport
            ssl = client_dtls._ssl
            assert (
                ssl.get_selected_srtp_profile().decode()
                == srtp["profile"]
                == state["dtls"]["srtp_profile"]
            )
            material = bytes.fromhex(srtp["keying_material"])
            assert ssl.export_keying_material(b"EXTRACTOR-dtls_srtp", len(material)) == material
            # ...and they decrypt the packets that actually crossed the relay.
            await eventually_async(
                lambda: len(decrypt_rtp(srtp["profile"], srtp["tx_key"], client.fwd.to_client)) > 50
                and len(decrypt_rtp(srtp["profile"], srtp["rx_key"], client.fwd.to_owner)) > 50,
                what="50 RTP packets each way through the forwarder")
            sent = decrypt_rtp(srtp["profile"], srtp["tx_key"], client.fwd.to_client)
            recv = decrypt_rtp(srtp["profile"], srtp["rx_key"], client.fwd.to_owner)
            assert len(sent) > 50 and len(recv) > 50
            # (the last RTP packet: decrypt_rtp skips RTCP, which could make this vacuous)
            last_rtp = next(p for p in reversed(client.fwd.to_client) if not is_rtcp(p))
            with pytest.raises(pylibsrtp.Error):  # the check is not vacuous
                decrypt_rtp(srtp["profile"], srtp["rx_key"], [last_rtp])

            # RTP state per SSRC matches the wire, both directions.
            audio = next(m for m in state["media"] if m["kind"] == "audio")
            assert {p.ssrc for p in sent} == {audio["local_ssrc"]}
            tx_stream = state["rtp"]["tx"][str(audio["local_ssrc"])]
            assert any(
                p.sequence_number == tx_stream["seq"] and p.timestamp == tx_stream["timestamp"]
                for p in sent
            )
            client_ssrc = client.pc.getSenders()[0]._ssrc
            assert {p.ssrc for p in recv} == {client_ssrc}
            assert audio["remote_ssrcs"] == [client_ssrc]
            rx_stream = state["rtp"]["rx"][str(client_ssrc)]
            assert any(
                p.sequence_number == rx_stream["seq"] and p.timestamp == rx_stream["timestamp"]
                for p in recv
            )
            # Counted at export time; the capture kept going for 0.2 s (~10 packets).
            assert len(recv) - 20 <= rx_stream["packets"] <= len(recv)
            assert len(sent) - 20 <= tx_stream["packets"] <= len(sent)
            assert audio["codecs"][0]["mime_type"] == "audio/opus"

            # Client hang-up ends and reports the call.
            await client.close()
            await eventually_async(lambda: tx.calls() == [], 5, "call removed after hang-up")
            await eventually_async(lambda: ended, 2, "on_call_ended")
            assert ended == [(42, "client hung up")]
            with pytest.raises(UnknownCall):
                tx.export_call_state(42)

    run(scenario())


def test_two_calls_share_one_port_and_close_call_ends_one() -> None:
    async def scenario() -> None:
        async with Transceiver(2, capacity=4) as tx:
            a, b = ClientCall(440), ClientCall(880)
            await a.place(tx, 1, UFRAG_A)
            await b.place(tx, 2, UFRAG_B)
            assert a.owner == b.owner == tx.owner  # one UDP port for all calls
            await asyncio.gather(a.wait_connected(), b.wait_connected())
            # Each client hears its own voice, not the other call's.
            await hears(a, 440, [880])
            await hears(b, 880, [440])

            await tx.close_call(1)
            assert tx.calls() == [2]
            # The transceiver's DTLS close_notify hangs the client up.
            await eventually_async(lambda: a.pc.connectionState == "closed", 5, "client A closed")
            with pytest.raises(UnknownCall):
                await tx.close_call(1)
            # B is unaffected.
            b.dc.send("still here")
            assert await asyncio.wait_for(b.messages.get(), 3) == "still here"
            assert b.pc.connectionState == "connected"
            assert tx.health()["calls"] == 1
            await a.close()
            await b.close()
            await eventually_async(lambda: tx.calls() == [], 5, "call 2 removed")

    run(scenario())


def test_consent_failure_ends_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # RFC 7675 timing shrunk (aioice reads these module globals at run time):
    # consent every ~0.2 s, given up after 2 unanswered checks of 0.1 s.
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.2)
    monkeypatch.setattr(aioice.ice, "CONSENT_FAILURES", 2)
    monkeypatch.setattr(stun, "RETRY_RTO", 0.1)

    async def scenario() -> None:
        ended: list[tuple[int, str]] = []
        async with Transceiver(8, capacity=2) as tx:
            tx.on_call_ended.append(lambda c, r: ended.append((c, r)))
            client = ClientCall(440)
            await client.place(tx, 5, UFRAG_A)
            await client.wait_connected()
            assert client.fwd is not None
            client.fwd.blackhole = True  # the client vanishes without a goodbye
            await eventually_async(lambda: tx.calls() == [], 5, "call removed after consent failure")
            await eventually_async(lambda: ended, 2, "on_call_ended")
            assert ended == [(5, "ICE consent expired")]
            await client.close()

    run(scenario())


def test_dual_stack_owner_and_ipv6_checks() -> None:
    async def scenario() -> None:
        async with Transceiver(9, capacity=2, bind_addrs=["127.0.0.1", "::1"]) as tx:
            owner = tx.owner
            assert owner["addr4"] == "127.0.0.1" and owner["addr6"] == "::1"
            assert owner["port4"] == owner["port6"] > 0  # one port number for both families
            client = ClientCall(440)
            offer = await client.offer()
            answer, returned = await tx.create_call(3, UFRAG_B, strip_candidates(offer))
            assert returned == owner
            hosts = {tuple(c.split()[4:6]) for c in sdp_attr_values(answer, "candidate")}
            assert hosts == {("127.0.0.1", str(owner["port4"])), ("::1", str(owner["port6"]))}

            # An authenticated check on the IPv6 socket reaches the call and is answered.
            msg = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
            msg.attributes["USERNAME"] = f"{UFRAG_B}:{sdp_attr_values(offer, 'ice-ufrag')[0]}"
            msg.attributes["PRIORITY"] = 1
            msg.attributes["ICE-CONTROLLING"] = 1
            msg.add_message_integrity(tx.export_call_state(3)["ice"]["local_pwd"].encode())
            msg.add_fingerprint()
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
                s.bind(("::1", 0))
                s.setblocking(False)
                s.sendto(bytes(msg), ("::1", owner["port6"]))
                loop = asyncio.get_running_loop()
                data = await asyncio.wait_for(loop.sock_recv(s, 2048), 2)
                reply = stun.parse_message(data)
                assert reply.message_class == stun.Class.RESPONSE
                assert reply.attributes["XOR-MAPPED-ADDRESS"] == s.getsockname()[:2]
            await client.close()

    run(scenario())


def test_shared_socket_ignores_unauthenticated_and_unknown_sources() -> None:
    async def scenario() -> None:
        async with Transceiver(3, capacity=4, connect_timeout=10) as tx:
            client = ClientCall(440)
            offer = await client.offer()
            await tx.create_call(9, UFRAG_A, strip_candidates(offer))
            owner = (tx.owner["addr4"], tx.owner["port4"])
            mux = tx._muxes[0]

            loop = asyncio.get_running_loop()
            replies: asyncio.Queue[bytes] = asyncio.Queue()

            class Probe(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, addr: Any) -> None:
                    replies.put_nowait(data)

            probe, _ = await loop.create_datagram_endpoint(Probe, local_addr=("127.0.0.1", 0))
            probe_addr = probe.get_extra_info("sockname")

            def check(username: str, password: str) -> bytes:
                msg = stun.Message(
                    message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST
                )
                msg.attributes["USERNAME"] = username
                msg.attributes["PRIORITY"] = 1
                msg.attributes["ICE-CONTROLLING"] = 1
                msg.add_message_integrity(password.encode())
                msg.add_fingerprint()
                return bytes(msg)

            # Right ufrag, wrong password: answered 401 by aioice, claims nothing.
            probe.sendto(check(f"{UFRAG_A}:evil", "x" * 22), owner)
            reply = stun.parse_message(await asyncio.wait_for(replies.get(), 2))
            assert (
                reply.message_class == stun.Class.ERROR and reply.attributes["ERROR-CODE"][0] == 401
            )
            before = mux.stats["drop_unknown_source"]
            probe.sendto(b"\x17\xfe\xfd" + b"\x00" * 30, owner)  # DTLS-looking datagram
            await eventually_async(lambda: mux.stats["drop_unknown_source"] == before + 1, 2, "drop")
            assert probe_addr not in tx._calls[9].ports[0].addrs

            # Unknown ufrag: dropped without an answer.
            probe.sendto(check("nosuchufrag:evil", "x" * 22), owner)
            await eventually_async(lambda: mux.stats["drop_unknown_ufrag"] == 1, 2, "unknown ufrag drop")
            await asyncio.sleep(0.1)  # nothing must come back: a window for a wrong answer to arrive
            assert replies.empty()

            # Right password (what the relay forwards from a real client): claims the source.
            pwd = tx.export_call_state(9)["ice"]["local_pwd"]
            remote_ufrag = sdp_attr_values(offer, "ice-ufrag")[0]
            probe.sendto(check(f"{UFRAG_A}:{remote_ufrag}", pwd), owner)
            reply = stun.parse_message(await asyncio.wait_for(replies.get(), 2))
            assert reply.message_class == stun.Class.RESPONSE
            assert reply.attributes["XOR-MAPPED-ADDRESS"] == probe_addr
            assert probe_addr in tx._calls[9].ports[0].addrs
            probe.close()
            await client.close()

    run(scenario())


def test_unconnected_call_times_out_and_bad_input_is_rejected() -> None:
    async def scenario() -> None:
        ended: list[tuple[int, str]] = []
        async with Transceiver(4, capacity=1, connect_timeout=0.5) as tx:
            tx.on_call_ended.append(lambda c, r: ended.append((c, r)))
            client = ClientCall(440)
            offer = strip_candidates(await client.offer())

            with pytest.raises(InvalidRequest, match="ufrag"):
                await tx.create_call(1, "a:b", offer)
            with pytest.raises(InvalidRequest, match="conn_id"):
                await tx.create_call(-1, UFRAG_A, offer)
            with pytest.raises(InvalidRequest, match="conn_id"):
                await tx.create_call(True, UFRAG_A, offer)  # type: ignore[arg-type]
            with pytest.raises(InvalidRequest, match="SDP|media"):
                await tx.create_call(1, UFRAG_A, "hello")
            no_bundle = "\r\n".join(
                line for line in offer.splitlines() if not line.startswith("a=group:BUNDLE")
            )
            with pytest.raises(InvalidRequest, match="BUNDLE"):
                await tx.create_call(1, UFRAG_A, no_bundle)
            no_fp = "\r\n".join(line for line in offer.splitlines() if not line.startswith("a=fingerprint"))
            with pytest.raises(InvalidRequest, match="fingerprint"):
                await tx.create_call(1, UFRAG_A, no_fp)
            assert tx.calls() == []

            # Candidates and end-of-candidates are stripped even if left in.
            await tx.create_call(1, UFRAG_A, client.pc.localDescription.sdp)
            assert tx._calls[1].candidates_stripped > 0
            with pytest.raises(DuplicateCall):
                await tx.create_call(1, UFRAG_B, offer)
            with pytest.raises(CapacityExceeded):
                await tx.create_call(2, UFRAG_B, offer)
            # Nobody connects: the call is dropped and reported.
            await eventually_async(lambda: ended, 3, "timeout removal reported")
            assert tx.calls() == []
            assert ended == [(1, "not connected within 0.5 s")]
            await client.close()

    run(scenario())


# -- HTTP control API and registration ------------------------------------------------------




def test_http_control_api() -> None:
    async def scenario() -> None:
        async with Transceiver(5, capacity=1, connect_timeout=20) as tx:
            runner, url = await _serve(create_app(tx))
            client = ClientCall(440)
            offer = strip_candidates(await client.offer())
            try:
                async with ClientSession() as http:
                    async with http.get(f"{url}/health") as r:
                        assert r.status == 200
                        health = await r.json()
                    assert {k: health[k] for k in ("id", "healthy", "capacity", "calls")} == {
                        "id": 5,
                        "healthy": True,
                        "capacity": 1,
                        "calls": 0,
                    }

                    async def post(body: Any, raw: bytes | None = None) -> tuple[int, Any]:
                        kwargs = {"data": raw} if raw is not None else {"json": body}
                        async with http.post(f"{url}/calls", **kwargs) as r:
                            return r.status, await r.json()

                    status, body = await post(None, raw=b"{not json")
                    assert status == 400 and "JSON" in body["error"]
                    status, body = await post({"conn_id": 1, "offer": offer})
                    assert status == 400 and "ufrag" in body["error"]
                    status, body = await post({"conn_id": "1", "ufrag": UFRAG_A, "offer": offer})
                    assert status == 400 and "conn_id" in body["error"]
                    status, body = await post({"conn_id": 1, "ufrag": "bad ufrag!", "offer": offer})
                    assert status == 400 and "ufrag" in body["error"]
                    status, body = await post(
                        {"conn_id": 1, "ufrag": UFRAG_A, "offer": "v=0\r\nbogus"}
                    )
                    assert status == 400 and body["error"]

                    status, body = await post({"conn_id": 77, "ufrag": UFRAG_A, "offer": offer})
                    assert status == 201
                    assert set(sdp_attr_values(body["answer"], "ice-ufrag")) == {UFRAG_A}
                    assert body["owner"] == {
                        "addr4": "127.0.0.1",
                        "port4": tx.owner["port4"],
                        "addr6": None,
                        "port6": 0,
                    }
                    status, body = await post({"conn_id": 77, "ufrag": UFRAG_B, "offer": offer})
                    assert status == 409
                    status, body = await post({"conn_id": 78, "ufrag": UFRAG_B, "offer": offer})
                    assert status == 503 and "capacity" in body["error"]

                    async with http.get(f"{url}/calls/77") as r:
                        assert r.status == 200
                        text = await r.text()
                    info = json.loads(text)
                    assert info["conn_id"] == 77 and info["export"]["ice"]["local_ufrag"] == UFRAG_A
                    for secret in (
                        "local_pwd",
                        "remote_pwd",
                        "tx_key",
                        "rx_key",
                        "keying_material",
                    ):
                        assert secret not in text
                    async with http.get(f"{url}/calls") as r:
                        assert (await r.json()) == {"calls": [77]}
                    async with http.get(f"{url}/calls/abc") as r:
                        assert r.status == 400
                    async with http.get(f"{url}/calls/12") as r:
                        assert r.status == 404
                    async with http.delete(f"{url}/calls/77") as r:
                        assert r.status == 204
                    async with http.delete(f"{url}/calls/77") as r:
                        assert r.status == 404
                    assert tx.calls() == []
            finally:
                await client.close()
                await runner.cleanup()

    run(scenario())




def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_registration_heartbeat_and_reregistration(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        caplog.set_level(logging.INFO, logger="manager.transceiver.registrar")
        relay = FakeRelay()
        port = _free_port()
        async with Transceiver(6, capacity=3, connect_timeout=20) as tx:
            reg = Registrar(
                tx, f"http://127.0.0.1:{port}", "http://127.0.0.1:9999", interval=0.1, timeout=0.5
            )
            attempts = []
            register = reg._register

            async def counted() -> bool:
                attempts.append(time.monotonic())
                return await register()

            reg._register = counted  # type: ignore[method-assign]
            await reg.start()
            # Relay down: keeps retrying, logs it once.
            await eventually_async(lambda: len(attempts) >= 4, 3, what="4 attempts to register")
            down = [r for r in caplog.records if "unreachable" in r.getMessage()]
            assert len(down) == 1 and not reg.registered
            runner, _ = await _serve(relay.app, port)
            try:
                await eventually_async(lambda: relay.of("heartbeat"), 3, "first heartbeat")
                assert relay.of("register")[0] == {
                    "id": 6,
                    "control_url": "http://127.0.0.1:9999",
                    "capacity": 3,
                }
                assert relay.requests[1][1] == "/v1/transceivers/6/heartbeat"
                assert relay.of("heartbeat")[0] == {"healthy": True, "calls": []}
                assert any(
                    "reachable again" in r.getMessage() or "registered" in r.getMessage()
                    for r in caplog.records
                )

                # A call shows up in heartbeats, and disappears at once when it ends.
                client = ClientCall(440)
                await tx.create_call(31, UFRAG_A, strip_candidates(await client.offer()))
                await eventually_async(lambda: relay.of("heartbeat")[-1]["calls"] == [31], 2, "call listed")
                n = len(relay.requests)
                await tx.close_call(31)
                await eventually_async(
                    lambda: len(relay.requests) > n, 0.09, "immediate heartbeat"
                )  # < interval
                assert relay.of("heartbeat")[-1]["calls"] == []
                await client.close()

                # Relay forgets us (restart): 404 -> register again.
                relay.known.clear()
                await eventually_async(lambda: len(relay.of("register")) == 2, 2, "re-registration")
                await eventually_async(
                    lambda: relay.requests[-1][0] == "heartbeat", 2, "heartbeat after re-register"
                )
                assert relay.of("heartbeat")[-1] == {"healthy": True, "calls": []}

                await reg.stop()
                assert relay.of("heartbeat")[-1] == {"healthy": False, "calls": []}
            finally:
                await runner.cleanup()

    run(scenario())


def test_cli_process_registers_and_stops_on_sigterm(tmp_path: Path) -> None:
    pki_dir = tmp_path / "pki"
    pki.init_ca(pki_dir)
    pki.issue(pki_dir, pki.relayd_name())
    pki.issue(pki_dir, pki.transceiver_name(7))
    key_file = tmp_path / "hint.key"
    key_file.write_text("ab" * 32)
    key_file.chmod(0o600)
    relayd = pki.paths(pki_dir, "relayd")

    async def scenario() -> None:
        relay = FakeRelay()
        runner, relay_url = await _serve(relay.app, ssl_context=pki.server_context(relayd))
        api_port = _free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "manager.transceiver",
            "--id",
            "7",
            "--listen",
            f"127.0.0.1:{api_port}",
            "--relay-url",
            relay_url,
            "--capacity",
            "2",
            "--bind",
            "127.0.0.1",
            "--pki-dir",
            str(pki_dir),
            "--hint-key-file",
            str(key_file),
            cwd=REPO,
            stderr=subprocess.PIPE,
        )
        try:
            await eventually_async(lambda: relay.of("heartbeat"), 15, "registration of the CLI process")
            url = f"https://127.0.0.1:{api_port}"
            assert relay.of("register")[0]["control_url"] == url
            tls = {"ssl": pki.client_context(relayd), "server_hostname": pki.transceiver_name(7)}
            async with ClientSession() as http, http.get(f"{url}/health", **tls) as r:
                health = await r.json()
            assert health["id"] == 7 and health["healthy"] and health["capacity"] == 2
            # The process's runtime: uvloop, the collector frozen after start.
            assert health["runtime"]["loop"] == "uvloop" and health["runtime"]["gc_frozen"] > 0
            # Without relayd's certificate the control API does not answer.
            plain = ssl.create_default_context(cafile=str(pki_dir / "ca.pem"))
            with pytest.raises(aiohttp.ClientError):
                async with ClientSession() as http, http.get(
                        f"{url}/health", ssl=plain, server_hostname=pki.transceiver_name(7)) as r:
                    await r.read()
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 10)
            assert proc.returncode == 0, err.decode()
            assert b"Traceback" not in err
            assert relay.of("heartbeat")[-1] == {"healthy": False, "calls": []}
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await runner.cleanup()

    run(scenario())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--id", "0"], "transceiver id"),
        (["--id", "1", "--bind", "0.0.0.0"], "unspecified"),
        (["--id", "1", "--listen", "nowhere"], "host:port"),
        (["--id", "1", "--capacity", "0"], "positive integer"),
        (["--id", "1"], "the following arguments are required: --pki-dir"),
        (["--id", "1", "--pki-dir", "/nonexistent"], "no routing-hint key"),
    ],
)
def test_cli_rejects_bad_arguments(args: list[str], message: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SPLITRELAY_HINT_KEY"}
    proc = subprocess.run(
        [sys.executable, "-m", "manager.transceiver", *args],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env={**env, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


# -- units ------------------------------------------------------------------------------


def test_rtp_stream_state_counts_rollover() -> None:
    st = RtpStreamState(ssrc=1, payload_type=111)
    for seq in (65533, 65534, 65535, 0, 1, 65535, 2):  # 65535 late: reordered, ignored
        st.update(seq, seq * 960, 111)
    assert (st.seq, st.roc, st.packets, st.timestamp) == (2, 1, 7, 2 * 960)


def test_agent_track_is_paced_with_continuous_pts_and_echo_agent_echoes() -> None:
    async def scenario() -> None:
        track = AgentAudioTrack()
        # Agent audio in another format and frame size: 10 ms at 24 kHz stereo.
        frame = av.AudioFrame(format="s16", layout="stereo", samples=240)
        frame.planes[0].update(array.array("h", [1000] * 480).tobytes())
        frame.sample_rate = 24000
        for _ in range(8):
            track.push(frame)
        # 80 ms pushed; the resampler holds back a few ms for its filter.
        assert 3 * 960 <= track.export_state()["buffered_samples"] <= 4 * 960
        start = time.monotonic()
        frames = [await track.recv() for _ in range(6)]
        elapsed = time.monotonic() - start
        assert [f.pts for f in frames] == [0, 960, 1920, 2880, 3840, 4800]
        assert all(f.samples == 960 and f.sample_rate == 48000 for f in frames)
        # Paced: five 20 ms waits after the first frame. The upper bound only
        # catches a stall; a loaded machine may be late, never early.
        assert 0.09 <= elapsed < 1.0
        loud = [max(array.array("h", bytes(f.planes[0])[:1920])) for f in frames]
        assert min(loud[:3]) > 500 and loud[4:] == [0, 0]  # the agent's audio, then silence
        assert track.silent_frames >= 2

        session = AgentSession(1)
        agent = EchoAgent()
        task = asyncio.ensure_future(agent.run(session))
        sent: list[Any] = []

        class FakeChannel:
            readyState = "open"

            def __init__(self) -> None:
                self.handlers: dict[str, Any] = {}

            def on(self, event: str) -> Any:
                def register(fn: Any) -> Any:
                    self.handlers[event] = fn
                    return fn

                return register

            def send(self, msg: Any) -> None:
                sent.append(msg)

        channel = FakeChannel()
        session.attach_channel(channel)
        channel.handlers["message"]("ping")
        await eventually_async(lambda: sent == ["ping"], 1, "echoed message")
        session.close()
        await asyncio.wait_for(task, 1)
        with pytest.raises(CallEnded):
            await session.recv_message()
        assert agent.export_state()["messages_echoed"] == 1

    run(scenario())


class HoldingForwarder(Forwarder):
    """A Forwarder that can hold the client's media instead of forwarding it:
    a held packet is one the owner never saw (what a relay taking the call over
    holds when it asks the owner to authenticate it)."""

    hold = False
    held: list[bytes]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.hold and 127 < data[0] < 192:
            self.held.append(data)
            return
        super().datagram_received(data, addr)


def test_replies_move_only_to_an_address_the_call_authenticated() -> None:
    """What a relay taking over a call may ask of its owner, tried as an
    attacker would: re-pointing to an address the call never authenticated
    is refused; a forged packet with a path moves nothing; the client's own
    (held, never delivered) packet moves the replies to the new flow source."""

    async def scenario() -> None:
        async with Transceiver(3, capacity=2) as tx:
            client = ClientCall(440)
            HoldingForwarder.held = []
            await client.place(tx, 1, UFRAG_A, HoldingForwarder)
            await client.wait_connected()
            fwd = client.fwd
            await eventually_async(lambda: len(fwd.to_client) >= 10 and len(fwd.to_owner) >= 10,
                                   what="media both ways")
            (old,) = fwd.leg_addrs  # the flow source the owner replies to now
            new_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            new_sock.bind(("127.0.0.1", 0))
            new_sock.setblocking(False)
            new = new_sock.getsockname()
            try:
                with pytest.raises(InvalidRequest, match="has not authenticated"):
                    tx.repoint_call(1, old, new)  # nothing from `new` was ever authenticated
                fwd.hold = True
                await eventually_async(lambda: len(fwd.held) >= 2, 3, "held media")
                fwd.hold = False
                client_packet = fwd.held[-1]
                forged = client_packet[:12] + os.urandom(len(client_packet) - 12)
                assert not await tx.check_media(1, forged, (old, new))
                await asyncio.sleep(0.3)  # nothing must move: a window for replies to reach `new`
                assert _drain(new_sock) == 0  # replies still go to the old source
                assert await tx.check_media(1, client_packet, (old, new))
                drained = [0]

                def moved() -> bool:
                    drained[0] += _drain(new_sock)
                    return drained[0] > 10

                # The owner's media now goes to the new source.
                await eventually_async(moved, what="10 of the owner's packets at the new source")
                assert tx._get(1).replies_to() == new
            finally:
                new_sock.close()
            await client.close()

    run(scenario())


def _drain(sock: socket.socket) -> int:
    n = 0
    while True:
        try:
            sock.recv(2048)
        except BlockingIOError:
            return n
        n += 1
