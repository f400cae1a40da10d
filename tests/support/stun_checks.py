"""Bare ICE connectivity checks, as a client's ICE agent sends them from a
new address: a STUN Binding request with USERNAME and MESSAGE-INTEGRITY,
sent from a fresh socket, and its answer."""

from __future__ import annotations

import asyncio
import socket

from aioice import stun

Addr = tuple[str, int]


def binding_check(username: str, pwd: str, *, nominate: bool = False) -> stun.Message:
    """A controlling agent's check; `nominate`: with USE-CANDIDATE, as browsers send on their selected pair."""
    msg = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    msg.attributes["USERNAME"] = username
    msg.attributes["PRIORITY"] = 1
    msg.attributes["ICE-CONTROLLING"] = 1
    if nominate:
        msg.attributes["USE-CANDIDATE"] = None
    msg.add_message_integrity(pwd.encode())
    return msg


async def ask(dest: Addr, msg: stun.Message, *, timeout: float = 1.0, bind: str = "0.0.0.0",
              tries: int = 1) -> tuple[stun.Message | None, Addr]:
    """`msg` from a fresh IPv4 socket bound to `bind`: (its answer or None, the socket's address).
    `tries` > 1 resends within `timeout` (a check lost on the way, as ICE retransmits)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((bind, 0))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        for _ in range(tries):
            # A plain send: a UDP datagram does not block, and uvloop (the
            # transceiver's loop, runtime.py) has no loop.sock_sendto.
            sock.sendto(bytes(msg), dest)
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 2048), timeout / tries)
            except TimeoutError:
                continue
            return stun.parse_message(data), sock.getsockname()
        return None, sock.getsockname()
    finally:
        sock.close()
