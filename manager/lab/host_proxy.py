"""A TCP forwarder on this machine's loopback to the lab's signaling port.

Browsers give the microphone only to a secure context, and http://127.0.0.1
is one while http://10.10.1.1 is not: the demo serves the page through
127.0.0.1, and the call's media goes straight to the VIP over the host link
(host_link.add_host_link)."""

from __future__ import annotations

import asyncio
import contextlib
import threading


class LocalProxy:
    """127.0.0.1:`port` (8080, or any free port if taken) → `target`, on a thread of its own."""

    def __init__(self, target: tuple[str, int], port: int = 8080) -> None:
        self.target = target
        self.want_port = port
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="local-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _listen(self) -> asyncio.AbstractServer:
        try:
            return await asyncio.start_server(self._pipe, "127.0.0.1", self.want_port)
        except OSError:  # taken: any free port
            return await asyncio.start_server(self._pipe, "127.0.0.1", 0)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))

    def stop(self) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
