"""An imported call's DTLS record layer, attacked from the client's side of
the wire: only records sealed with the session's client keys, in its epoch,
never seen before, reach the SCTP association; our records open with the
client's view of the session and continue its sequence numbers."""

from __future__ import annotations

import asyncio
import os

import pytest

from manager.protocol import dtls_record as dr
from manager.protocol.callstate import DtlsRecordState, SctpState
from manager.transceiver.imported_data import ImportedDataChannels
from tests.support.callstate import CIPHER, association
from tests.support.waiting import eventually_async

MASTER, CLIENT_RANDOM, SERVER_RANDOM = os.urandom(48), os.urandom(32), os.urandom(32)
SUITE = dr.suite(CIPHER)
KEYS = dr.KeyBlock.derive(SUITE, MASTER, CLIENT_RANDOM, SERVER_RANDOM)
CLIENT_SEALS = dr.RecordProtection(SUITE, KEYS.client_key, KEYS.client_iv)  # what the client sends
CLIENT_OPENS = dr.RecordProtection(SUITE, KEYS.server_key, KEYS.server_iv)  # what the client receives
RX_HIGHEST = 100


def _data(sent: list[bytes], closed: list[str]) -> ImportedDataChannels:
    record = DtlsRecordState(epoch=1, tx_seq=77, rx_highest=RX_HIGHEST, rx_window=0b101,  # 100 and 98 seen
                             client_random=CLIENT_RANDOM.hex(), server_random=SERVER_RANDOM.hex(),
                             master_secret=MASTER.hex())

    async def on_closed(reason: str) -> None:
        closed.append(reason)

    return ImportedDataChannels(role="server", cipher=CIPHER, record=record,
                                sctp=SctpState(mid="1", state="connected", port=5000, association=association()),
                                send=sent.append, on_closed=on_closed)


def _sealed(seq: int, payload: bytes = b"sctp", rtype: int = dr.APPLICATION_DATA, epoch: int = 1) -> bytes:
    return CLIENT_SEALS.seal(rtype, epoch, seq, payload).serialise()


def _flip_last_byte(datagram: bytes) -> bytes:
    return datagram[:-1] + bytes([datagram[-1] ^ 1])


# (description, datagram, accepted, the counter that rose)
CASES = [
    ("the next record from the client", _sealed(RX_HIGHEST + 1), True, "rx_records"),
    ("a record far ahead (a gap is not an attack)", _sealed(RX_HIGHEST + 500), True, "rx_records"),
    ("a record below the window but unseen", _sealed(RX_HIGHEST - 1), True, "rx_records"),
    ("the highest record again (replay)", _sealed(RX_HIGHEST), False, "rx_replayed"),
    ("a record the window marks seen", _sealed(RX_HIGHEST - 2), False, "rx_replayed"),
    ("a record older than the window", _sealed(RX_HIGHEST - 64), False, "rx_replayed"),
    ("a tampered record", _flip_last_byte(_sealed(RX_HIGHEST + 1)), False, "rx_unauthenticated"),
    ("a record sealed with our own keys (reflected)",
     CLIENT_OPENS.seal(dr.APPLICATION_DATA, 1, RX_HIGHEST + 1, b"x").serialise(), False, "rx_unauthenticated"),
    ("a record of another epoch", _sealed(RX_HIGHEST + 1, epoch=2), False, "rx_unexpected"),
    ("a handshake record", _sealed(RX_HIGHEST + 1, rtype=dr.HANDSHAKE), False, "rx_unexpected"),
    ("a truncated header", _sealed(RX_HIGHEST + 1)[:10], False, "rx_unexpected"),
    ("a record longer than the datagram", _sealed(RX_HIGHEST + 1)[:-3], False, "rx_unexpected"),
]


@pytest.mark.parametrize(("description", "datagram", "accepted", "counter"), CASES, ids=[c[0] for c in CASES])
def test_inbound_records(description: str, datagram: bytes, accepted: bool, counter: str) -> None:
    async def check() -> None:
        data = _data([], [])
        before = dict(vars(data.stats))
        assert data.datagram_received(datagram) is accepted
        rose = {k for k, v in vars(data.stats).items() if v != before[k]}
        assert rose == {counter}, rose
        await data.close(quiet=True)

    asyncio.run(check())


def test_a_replay_of_an_accepted_record_is_refused() -> None:
    async def check() -> None:
        data = _data([], [])
        record = _sealed(RX_HIGHEST + 3)
        assert data.datagram_received(record)
        assert not data.datagram_received(record)
        assert data.stats.rx_replayed == 1 and data.stats.rx_records == 1
        await data.close(quiet=True)

    asyncio.run(check())


def test_nothing_goes_out_before_activation_then_records_continue_the_sequence() -> None:
    async def check() -> None:
        sent: list[bytes] = []
        data = _data(sent, [])
        data.channels[0].send("held")  # queued in the association, flushed by a task
        await eventually_async(lambda: data.stats.tx_held >= 1, what="the message held before activation")
        assert sent == []
        await data.activate()

        def opened() -> list[bytes]:
            return [CLIENT_OPENS.open(r) for d in sent for r in dr.parse_records(d)]

        await eventually_async(lambda: any(b"held" in p for p in opened()), what="the held message sent")
        records = [r for d in sent for r in dr.parse_records(d)]
        assert [r.seq for r in records] == list(range(77, 77 + len(records))) and records
        await data.close(quiet=True)

    asyncio.run(check())


def test_close_notify_from_the_client_ends_the_call_and_nothing_more_is_sent() -> None:
    async def check() -> None:
        sent: list[bytes] = []
        closed: list[str] = []
        data = _data(sent, closed)
        await data.activate()  # its sends are done when it returns
        assert data.datagram_received(_sealed(RX_HIGHEST + 1, bytes([1, 0]), rtype=dr.ALERT))
        await eventually_async(lambda: closed, what="the call closed by the client's close_notify")
        assert closed == ["client hung up"]
        count = len(sent)
        await data.close(quiet=False)  # no ABORT or close_notify after the client's own
        assert len(sent) == count

    asyncio.run(check())


def test_close_tells_the_client_with_abort_and_close_notify() -> None:
    async def check() -> None:
        sent: list[bytes] = []
        data = _data(sent, [])
        await data.activate()  # its sends are done when it returns
        count = len(sent)
        await data.close(quiet=False)
        records = [r for d in sent[count:] for r in dr.parse_records(d)]
        assert [r.type for r in records] == [dr.APPLICATION_DATA, dr.ALERT]
        assert CLIENT_OPENS.open(records[1]) == bytes([1, 0])
        assert CLIENT_OPENS.open(records[0])[12] == 6  # SCTP ABORT chunk after the common header

    asyncio.run(check())
