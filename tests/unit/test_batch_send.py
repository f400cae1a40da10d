"""Batched sends (manager/transceiver/batch_send.py) over real loopback sockets:
what is queued during one loop pass arrives, in order, from one sendmmsg; a
full buffer drops the rest of the batch and counts it; a datagram the kernel
refuses is counted and skipped."""

from __future__ import annotations

import asyncio
import socket

import pytest

from manager.transceiver import batch_send
from manager.transceiver.batch_send import BatchSender


def _pair(family: int, host: str) -> tuple[socket.socket, socket.socket]:
    tx, rx = socket.socket(family, socket.SOCK_DGRAM), socket.socket(family, socket.SOCK_DGRAM)
    for s in (tx, rx):
        s.bind((host, 0))
        s.setblocking(False)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # capped by rmem_max: see the counts
    return tx, rx


def _drain(sock: socket.socket) -> list[tuple[bytes, tuple]]:
    out = []
    while True:
        try:
            out.append(sock.recvfrom(2048))
        except BlockingIOError:
            return out


class Counts:
    def __init__(self) -> None:
        self.dropped = 0
        self.errors: list[OSError] = []

    def sender(self, sock: socket.socket, **kwargs) -> BatchSender:
        return BatchSender(sock, self._drop, self.errors.append, **kwargs)

    def _drop(self, n: int) -> None:
        self.dropped += n


async def _one_pass(sender: BatchSender, items) -> None:
    for data, addr in items:
        sender.sendto(data, addr)
    await asyncio.sleep(0)  # the loop pass ends: the flush scheduled with call_soon runs


@pytest.mark.parametrize("use_sendmmsg", [True, False], ids=["sendmmsg", "sendto"])
@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")],
                         ids=["ipv4", "ipv6"])
def test_a_loop_pass_of_datagrams_arrives_in_order(family, host, use_sendmmsg):
    tx, rx = _pair(family, host)
    counts = Counts()
    sender = counts.sender(tx, use_sendmmsg=use_sendmmsg)
    assert sender.use_sendmmsg == use_sendmmsg  # Linux's libc has sendmmsg
    dest = rx.getsockname()[:2]
    items = [(f"datagram {i}".encode() * (1 + i % 7), dest) for i in range(100)]
    asyncio.run(_one_pass(sender, items))
    got = _drain(rx)
    assert [data for data, _ in got] == [data for data, _ in items]
    assert {addr[:2] for _, addr in got} == {tx.getsockname()[:2]}
    assert sender.batches == 1 and sender.sent == 100 and counts.dropped == 0 and not counts.errors
    tx.close()
    rx.close()


def test_more_than_one_sendmmsg_worth_is_sent_in_chunks():
    tx, rx = _pair(socket.AF_INET, "127.0.0.1")
    counts = Counts()
    sender = counts.sender(tx)
    n = batch_send.MAX_BATCH + 10
    asyncio.run(_one_pass(sender, [(i.to_bytes(4, "big"), rx.getsockname()) for i in range(n)]))
    got = [int.from_bytes(data, "big") for data, _ in _drain(rx)]
    assert sender.sent == n and sender.batches == 2
    assert got == sorted(got) and len(got) + counts.dropped <= n  # the receiver may drop, never reorder
    tx.close()
    rx.close()


@pytest.mark.parametrize("use_sendmmsg", [True, False], ids=["sendmmsg", "sendto"])
def test_a_full_buffer_drops_the_rest_of_the_batch_and_counts_it(use_sendmmsg):
    # A Unix datagram pair blocks (EAGAIN) once the unread queue is full,
    # which a UDP socket on loopback never does (the receiver drops instead).
    tx, rx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tx.setblocking(False)
    rx.setblocking(False)
    counts = Counts()
    sender = counts.sender(tx, use_sendmmsg=use_sendmmsg)
    n = 2000
    asyncio.run(_one_pass(sender, [(bytes(100), None)] * n))
    received = len(_drain(rx))
    assert 0 < received < n
    assert counts.dropped == n - sender.sent and sender.sent == received and not counts.errors
    # The socket takes datagrams again once read: the next pass is whole.
    asyncio.run(_one_pass(sender, [(b"after", None)] * 3))
    assert [d for d, _ in _drain(rx)] == [b"after"] * 3
    tx.close()
    rx.close()


@pytest.mark.parametrize("use_sendmmsg", [True, False], ids=["sendmmsg", "sendto"])
def test_a_refused_datagram_is_counted_and_skipped(use_sendmmsg):
    tx, rx = _pair(socket.AF_INET, "127.0.0.1")
    counts = Counts()
    sender = counts.sender(tx, use_sendmmsg=use_sendmmsg)
    dest = rx.getsockname()
    # Broadcast without SO_BROADCAST: the kernel refuses it (EACCES); an
    # IPv6 address on an IPv4 socket has no sockaddr here.
    items = [(b"one", dest), (b"refused", ("255.255.255.255", 9)), (b"two", dest), (b"no address", ("::1", 9)),
             (b"three", dest)]
    asyncio.run(_one_pass(sender, items))
    assert [d for d, _ in _drain(rx)] == [b"one", b"two", b"three"]
    assert len(counts.errors) == 2 and counts.dropped == 0 and sender.sent == 3
    tx.close()
    rx.close()


def test_without_an_event_loop_a_datagram_goes_at_once():
    tx, rx = _pair(socket.AF_INET, "127.0.0.1")
    counts = Counts()
    sender = counts.sender(tx)
    sender.sendto(b"now", rx.getsockname())
    assert [d for d, _ in _drain(rx)] == [b"now"]
    tx.close()
    rx.close()


def test_sockaddr_layouts():
    v4 = batch_send.sockaddr(socket.AF_INET, ("10.1.2.3", 0x1234))
    assert len(v4) == 16 and v4[2:4] == b"\x12\x34" and v4[4:8] == bytes([10, 1, 2, 3])
    v6 = batch_send.sockaddr(socket.AF_INET6, ("::1", 5))
    assert len(v6) == 28 and v6[2:4] == b"\x00\x05" and v6[8:24] == bytes(15) + b"\x01"
