"""The pieces that carry a call's data channels to a new owner, each against
real aiortc peers: the DTLS datagram tap and its record numbers (keys derived
from the session's secrets open what OpenSSL sealed), and aiortc's SCTP
association exported, rebuilt on a stand-in transport and resumed."""

from __future__ import annotations

import asyncio
import base64

from aiortc.rtcsctptransport import DataChunk, RTCSctpTransport, SackChunk, parse_packet, serialize_packet

from manager.protocol import dtls_record as dr
from manager.transceiver import aiortc_hooks as hooks
from manager.transceiver.dtls_tap import DtlsTap
from tests.support.aiortc_pair import _established
from tests.support.waiting import eventually_async


def test_tap_reads_record_numbers_and_authenticates_with_keys_from_the_secrets() -> None:
    async def check(sctp: RTCSctpTransport, channel) -> None:
        tap = DtlsTap()
        dtls = sctp.transport
        tap.install(dtls)
        channel.send("from b")  # our records go out through the tap
        await eventually_async(lambda: tap.tx_highest >= 1, what="a record of ours through the tap")
        record, why = tap.export(include_secrets=True)
        assert why is None and record is not None
        assert record.epoch == 1 and record.tx_seq == tap.tx_highest + 1
        secrets = hooks.dtls_session_secrets(dtls)
        assert secrets is not None and secrets.version == "DTLSv1.2" and len(secrets.master_secret) == 48
        assert record.master_secret == secrets.master_secret.hex()
        assert record.client_random == secrets.client_random.hex()
        assert tap.export(include_secrets=False)[0].master_secret is None

    asyncio.run(_established(check))


def test_tap_window_moves_only_for_records_that_authenticate_and_freeze_drops() -> None:
    async def check(sctp: RTCSctpTransport, channel) -> None:
        tap = DtlsTap()
        tap.install(sctp.transport)
        channel.send("ping")  # the peer's SACK for it is a record the tap authenticates
        await eventually_async(lambda: tap.window.highest >= 1, what="the peer's SACK authenticated by the tap")
        highest = tap.window.highest
        assert tap.rx_unauthenticated == 0
        forged = dr.Record(dr.APPLICATION_DATA, 1, highest + 1000, bytes(40)).serialise()
        assert tap._receiving(forged)  # OpenSSL judges it (and drops it); the tap must not believe it
        assert tap.window.highest == highest and tap.rx_unauthenticated == 1
        tap.freeze()
        channel.send("while frozen")  # its DATA is dropped on the way out
        await eventually_async(lambda: tap.frozen_dropped >= 1, what="the DATA dropped while frozen")
        tap.unfreeze()

    asyncio.run(_established(check))


def test_sctp_export_restore_export_is_the_same_and_resume_sends_what_was_queued() -> None:
    async def check(sctp: RTCSctpTransport, channel):
        channel.send("queued at export")  # handed to the association; its flush runs later
        state = hooks.sctp_export(sctp)
        assert [c.id for c in state.channels] == [channel.id] and state.channels[0].label == "chat"
        assert len(state.queued) == 1 and state.local_tsn == sctp._local_tsn
        sent: list[bytes] = []

        async def send(data: bytes) -> None:
            sent.append(data)

        stand_in = hooks.DtlsStandIn("server" if sctp.is_server else "client", send)
        restored = RTCSctpTransport(stand_in, port=sctp.port)
        channels = hooks.sctp_restore(restored, state)
        assert restored.state == "connected" and [c.readyState for c in channels] == ["open"]
        assert stand_in.receiver is restored
        assert hooks.sctp_export(restored) == state
        await hooks.sctp_resume(restored)
        packets = [parse_packet(p) for p in sent]
        datas = [c for _, _, tag, chunks in packets for c in chunks if isinstance(c, DataChunk)]
        assert {tag for _, _, tag, _ in packets} == {state.remote_verification_tag}
        # What was in flight is sent again (the old owner's freeze may have
        # dropped it), then what was queued, with the next TSN.
        assert [(d.tsn, d.user_data) for d in datas] == [
            *((c.tsn, base64.b64decode(c.user_data)) for c in state.sent), (state.local_tsn, b"queued at export")]
        # A SACK arriving for it is taken like any: the chunk leaves the sent queue.
        sack = SackChunk()
        sack.cumulative_tsn = state.local_tsn
        sack.advertised_rwnd = 1 << 20
        await hooks.sctp_receive(restored, serialize_packet(state.remote_port, state.local_port,
                                                            state.local_verification_tag, sack))
        assert hooks.sctp_export(restored).sent == []
        await restored.stop()

    asyncio.run(_established(check))
