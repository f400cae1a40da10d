"""The one schema of an exported call (manager/protocol/callstate.py): round
trips, exact refusals, secrets left out; and what import builds from it (the
SRTP replay window, the reserved connection id)."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os

import pylibsrtp
import pytest
from aiortc.rtp import RtpPacket

from manager.protocol.callstate import STATE_VERSION, CallState, parse_call_state
from manager.transceiver import aiortc_hooks as hooks
from manager.transceiver.agent import AgentSession, EchoAgent
from manager.transceiver.errors import InvalidRequest
from manager.transceiver.import_plan import ImportPlan
from manager.transceiver.imported_call import ImportedCall
from manager.transceiver.media_engine import MediaEngine
from manager.transceiver.transceiver import Transceiver
from tests.support.callstate import (
    CIPHER,
    association,
)

PROFILE = "SRTP_AES128_CM_SHA1_80"  # 16-byte key + 14-byte salt
LIBSRTP_PROFILE = pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80
TX_KEY = os.urandom(30)
RX_KEY = os.urandom(30)


MASTER = os.urandom(48)






def exported(**over) -> dict:
    """A state as a transceiver exports it (frozen, with secrets)."""
    cand = {"host": "10.10.2.2", "port": 40000, "type": "host", "priority": 2130706431, "foundation": "1",
            "component": 1, "transport": "udp"}
    state = {
        "version": 1, "transceiver_id": 1, "conn_id": 42, "created_at": 1.0e9, "connected_at": 1.0e9 + 1,
        "connection_state": "connected",
        "owner": {"addr4": "10.10.2.2", "port4": 40000, "addr6": None, "port6": 0},
        "ice": {"local_ufrag": "AAAAbbbbCCCCddddEEEEffff", "remote_ufrag": "cli1", "role": "controlled",
                "tie_breaker": 12345, "state": "completed",
                "selected_pair": {"local": cand, "remote": dict(cand, host="10.10.0.1", port=20001, type="prflx")},
                "local_pwd": "p" * 22, "remote_pwd": "q" * 22},
        "dtls": {"role": "client", "state": "connected", "version": "DTLSv1.2", "cipher": CIPHER,
                 "local_fingerprints": [{"algorithm": "sha-256", "value": "AA"}],
                 "remote_fingerprints": [{"algorithm": "sha-256", "value": "BB"}], "srtp_profile": PROFILE,
                 "record": {"epoch": 1, "tx_seq": 12, "rx_highest": 9, "rx_window": 0x1FF,
                            "client_random": "c1" * 32, "server_random": "5e" * 32, "master_secret": MASTER.hex()}},
        "srtp": {"profile": PROFILE, "keying_material": (TX_KEY + RX_KEY).hex(), "tx_key": TX_KEY.hex(),
                 "rx_key": RX_KEY.hex()},
        "media": [{"mid": "0", "kind": "audio", "direction": "sendrecv", "local_ssrc": 1111, "local_rtx_ssrc": 2222,
                   "codecs": [{"mime_type": "audio/opus", "clock_rate": 48000, "channels": 2, "payload_type": 111,
                               "parameters": {}}],
                   "remote_ssrcs": [3333], "header_extensions": [{"id": 1, "uri": "urn:ietf:params:rtp-hdrext:sdes:mid"}]}],
        "rtp": {"tx": {"1111": {"ssrc": 1111, "payload_type": 111, "seq": 10, "timestamp": 960, "roc": 0, "packets": 10,
                                "octets": 800}},
                "rx": {"3333": {"ssrc": 3333, "payload_type": 111, "seq": 5, "timestamp": 480, "roc": 0, "packets": 5,
                                "octets": 400}}},
        "rtcp": {"tx_srtcp_index": {"1111": 2}, "rx_packets": {"3333": 1},
                 "rx_last_sr": {"3333": {"ntp_middle32": 0x12345678, "age": 0.75}},
                 "rx_reception": {"3333": {"base_seq": 1, "received": 4, "jitter": 12.5,
                                           "lost_before": 1, "expected_before": 40}}},
        "sctp": {"mid": "1", "state": "connected", "port": 5000, "association": association(), "not_carried": None},
        "agent": {"session": {"messages_in": 3}, "state": {"frames_echoed": 7}},
        "frozen": {"at": 1.0e9 + 60, "monotonic": 5.0},
        "migrations": 0,
    }
    state.update(over)
    return state


def test_round_trip() -> None:
    data = exported()
    model = parse_call_state(data)
    assert model.to_json() == data
    assert parse_call_state(json.loads(json.dumps(model.to_json()))) == model
    assert model.audio().local_ssrc == 1111


def test_without_secrets_leaves_them_out() -> None:
    shown = parse_call_state(exported()).without_secrets().to_json()
    text = json.dumps(shown)
    for secret in ("local_pwd", "remote_pwd", "tx_key", "rx_key", "keying_material", TX_KEY.hex(), "p" * 22,
                   "master_secret", MASTER.hex(), base64.b64encode(b"hello").decode()):
        assert secret not in text
    assert shown["srtp"] == {"profile": PROFILE}
    assert shown["dtls"]["record"]["tx_seq"] == 12 and shown["sctp"]["association"] is None


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s.pop("ice"), "ice: Field required"),
    (lambda s: s["ice"].update(local_ufrag="no spaces"), "ice.local_ufrag: Value error, is not an ICE ufrag"),
    (lambda s: s["ice"]["selected_pair"]["remote"].update(port=70000), "ice.selected_pair.remote.port: Input should"),
    (lambda s: s["ice"]["selected_pair"]["remote"].update(host="relay"), "ice.selected_pair.remote.host: Value error"),
    (lambda s: s["srtp"].update(tx_key="zz"), "srtp.tx_key: Value error, must be lowercase hex"),
    (lambda s: s["rtp"]["tx"]["1111"].update(seq=65536), "rtp.tx.1111.seq: Input should be less than or equal"),
    (lambda s: s["rtp"]["rx"]["3333"].update(roc=2**32), "rtp.rx.3333.roc: Input should be less than or equal"),
    (lambda s: s["rtp"]["rx"]["3333"].update(roc=-1), "rtp.rx.3333.roc: Input should be greater than or equal"),
    (lambda s: s.update(conn_id=0), "conn_id: Input should be greater than or equal to 1"),
    (lambda s: s.update(surprise=1), "surprise: Extra inputs are not permitted"),
    (lambda s: s.update(version=2), "version: must be 1, got 2"),
    (lambda s: s["rtp"]["tx"]["1111"].update(octets=-1), "rtp.tx.1111.octets: Input should be greater than or equal"),
    (lambda s: s["rtcp"]["rx_last_sr"]["3333"].update(age=-0.1),
     "rtcp.rx_last_sr.3333.age: Input should be greater than or equal"),
    (lambda s: s["rtcp"]["rx_last_sr"]["3333"].update(age=float("inf")), "rtcp.rx_last_sr.3333.age: Input should"),
    (lambda s: s["rtcp"]["rx_reception"]["3333"].update(received=-1),
     "rtcp.rx_reception.3333.received: Input should be greater than or equal"),
    (lambda s: s["rtcp"]["rx_reception"]["3333"].update(jitter=float("nan")),
     "rtcp.rx_reception.3333.jitter: Input should"),
    (lambda s: s["rtcp"]["rx_last_sr"]["3333"].update(ntp_middle32=2**32),
     "rtcp.rx_last_sr.3333.ntp_middle32: Input should be less than or equal"),
    (lambda s: s["dtls"]["record"].update(tx_seq=1 << 48), "dtls.record.tx_seq: Input should be less than or equal"),
    (lambda s: s["dtls"]["record"].update(master_secret="XY"), "dtls.record.master_secret: Value error, must be"),
    (lambda s: s["sctp"]["association"]["sent"][0].update(user_data="!!"),
     "sctp.association.sent.0.user_data: Value error, must be base64"),
    (lambda s: s["sctp"]["association"]["channels"][0].update(id=65535),
     "sctp.association.channels.0.id: Input should be less than or equal"),
    (lambda s: s["sctp"]["association"].pop("local_tsn"), "sctp.association.local_tsn: Field required"),
])
def test_refusals_name_the_field(change, message: str) -> None:
    data = exported()
    change(data)
    with pytest.raises(ValueError) as info:
        parse_call_state(data)
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s["srtp"].pop("tx_key"), "srtp.tx_key: missing"),
    (lambda s: s["ice"].pop("local_pwd"), "ice.local_pwd/remote_pwd: missing"),
    (lambda s: s.update(frozen=None), "state was exported without freeze"),
    (lambda s: s["srtp"].update(profile="SRTP_NOPE"), "srtp.profile: 'SRTP_NOPE' is not supported"),
    (lambda s: s["srtp"].update(tx_key="00" * 29), "srtp.tx_key: wrong length"),
    (lambda s: s.update(media=[]), "media: no audio section"),
    (lambda s: s["dtls"].update(record=None), "dtls.record: missing"),
    (lambda s: s["dtls"]["record"].pop("master_secret"), "dtls.record.master_secret: missing"),
    (lambda s: s["dtls"].update(cipher="ECDHE-ECDSA-AES128-SHA"),
     "dtls.cipher: cipher suite ECDHE-ECDSA-AES128-SHA is not supported"),
])
def test_import_refusals(change, message: str) -> None:
    data = exported()
    change(data)
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        ImportPlan.from_state(parse_call_state(data))


def test_version_is_the_schema_version() -> None:
    assert CallState.model_fields["version"].default == STATE_VERSION == 1


def test_an_older_export_without_the_later_fields_still_imports() -> None:
    """Fields added to version 1 since (octets sent, the client's last SR) have
    defaults: an export from an owner that did not write them imports, and
    its counts start at 0 as they did there."""
    data = exported()
    for stream in (*data["rtp"]["tx"].values(), *data["rtp"]["rx"].values()):
        del stream["octets"]
    del data["rtcp"]["rx_last_sr"]
    del data["rtcp"]["rx_reception"]
    plan = ImportPlan.from_state(parse_call_state(data))
    assert plan.tx is not None and (plan.tx.packets, plan.tx.octets) == (10, 0)
    assert plan.state.rtcp.rx_last_sr == {} and plan.state.rtcp.rx_reception == {}


def _srtp_packet(session: pylibsrtp.Session, seq: int) -> bytes:
    packet = RtpPacket(payload_type=111, sequence_number=seq, timestamp=seq * 960, ssrc=3333, payload=b"\xf8\xff\xfe")
    return session.protect(packet.serialize())


def test_imported_call_keeps_aiortcs_replay_window() -> None:
    """A packet 200 behind the newest is accepted after an import, as aiortc's
    own sessions accept it (window 1024; libsrtp's default is 128)."""

    async def scenario() -> tuple[int, int]:
        plan = ImportPlan.from_state(parse_call_state(exported()))
        call = ImportedCall(plan, AgentSession(42), EchoAgent(), engine=MediaEngine(),
                            on_consent_expired=lambda c: asyncio.sleep(0))  # a no-op coroutine
        client = pylibsrtp.Session(pylibsrtp.Policy(key=RX_KEY, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
                                                    srtp_profile=LIBSRTP_PROFILE))
        packets = {seq: _srtp_packet(client, seq) for seq in range(100, 401)}
        try:
            call.media.receive(packets[400], 0.0)
            call.media.receive(packets[200], 0.0)  # 200 behind, never seen: inside aiortc's window
            return call.media.stats.rx_decrypted, call.media.stats.rx_undecryptable
        finally:
            await call.close()

    decrypted, undecryptable = asyncio.run(scenario())
    assert (decrypted, undecryptable) == (2, 0)


def _imported(sent: list[bytes]) -> ImportedCall:
    plan = ImportPlan.from_state(parse_call_state(exported()))
    call = ImportedCall(plan, AgentSession(42), EchoAgent(), engine=MediaEngine(),
                        on_consent_expired=lambda c: asyncio.sleep(0))  # a no-op coroutine
    call.media._send = sent.append  # what would go to the client
    return call


def test_an_imported_call_goes_on_with_the_rtcp_state_and_exports_it_again() -> None:
    """The SR's counts go on from the exported stream's; the client's last SR
    is held as if it had arrived here, its age grown by the time since the
    freeze (a minute ago here, the most that is counted); the client's
    stream's loss and jitter counts go on; the export carries all on."""

    async def scenario() -> None:
        call = _imported([])
        try:
            assert (call.media.tx_stream.packets, call.media.tx_stream.octets) == (10, 800)
            lsr, _ = call.quality.remote_sr[3333]
            assert lsr == 0x12345678
            again = call.export_state(1, {"addr4": "10.10.2.2", "port4": 40000, "addr6": None, "port6": 0},
                                      include_secrets=False)
            assert again.rtp.tx["1111"].octets == 800
            assert again.rtcp.rx_last_sr["3333"].ntp_middle32 == 0x12345678
            assert 60.75 <= again.rtcp.rx_last_sr["3333"].age < 62
            # The client's stream's counts go on: sequence numbers 1-5, 4 received, 1 lost before the engine.
            block = call.quality.reception_block()
            assert (block.ssrc, block.highest_seq, block.cumulative_lost, block.jitter) == (3333, 5, 2, 12)
            assert again.rtcp.rx_reception == call.spec.state.rtcp.rx_reception
        finally:
            await call.close()

    asyncio.run(scenario())


def test_a_call_says_bye_only_when_it_ends_here() -> None:
    """An engine call's goodbye (RFC 3550 6.6): on a hang-up, not on a
    migration's release (quiet: the SSRC goes on elsewhere), not after consent
    expired (RFC 7675: stop sending)."""

    async def ended(quiet: bool, consent_expired: bool = False) -> int:
        sent: list[bytes] = []
        call = _imported(sent)
        call.activate("api")
        call.consent_expired = consent_expired
        await call.close(quiet=quiet)
        return call.media.stats.tx_bye

    assert asyncio.run(ended(quiet=False)) == 1
    assert asyncio.run(ended(quiet=True)) == 0
    assert asyncio.run(ended(quiet=False, consent_expired=True)) == 0


def test_srtp_session_replays_are_still_refused() -> None:
    tx = hooks.srtp_session(RX_KEY, inbound=False, libsrtp_profile=LIBSRTP_PROFILE)
    rx = hooks.srtp_session(RX_KEY, inbound=True, libsrtp_profile=LIBSRTP_PROFILE)
    p = _srtp_packet(tx, 7)
    rx.unprotect(p)
    with pytest.raises(pylibsrtp.Error):
        rx.unprotect(p)


def test_conn_id_zero_is_refused_on_create_and_import() -> None:
    async def scenario() -> None:
        async with Transceiver(1, capacity=4) as tx:
            with pytest.raises(InvalidRequest, match=r"conn_id must be an integer in 1\.\.4294967295"):
                await tx.create_call(0, "AAAAbbbbCCCCddddEEEEffff", "v=0\r\n")
            state = copy.deepcopy(exported())
            with pytest.raises(InvalidRequest, match=r"conn_id must be an integer in 1\.\.4294967295"):
                await tx.import_call(0, state)

    asyncio.run(scenario())
