"""A connection that closes after its response still delivers the whole response: what is
buffered when the exchange ends goes out before the close (a client that reads nothing is
cut off by the send timeout instead)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from h2_support import EngineThread

from meshgate.proxy import Exchange, Headers, Server, ServerSettings, UpstreamPool

SIZE = 16 << 20


class _Forward:
    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool

    def handle(self, exchange: Exchange) -> None:
        exchange.upstream = self.pool
        exchange.upstream_target = exchange.request.path

    def on_response(self, exchange: Exchange, status: int, headers: Headers) -> None:
        pass

    def on_complete(self, exchange: Exchange) -> None:
        pass


async def _eager_origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # The whole response at once: the proxy reads it faster than its client does.
    try:
        await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % SIZE + b"x" * SIZE)
    await writer.drain()
    writer.close()


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /big HTTP/1.0\r\nHost: x\r\n\r\n",
    ],
    ids=["connection-close", "http-1.0"],
)
def test_a_closing_connection_sends_its_whole_response_to_a_late_reader(
    request_head: bytes,
) -> None:
    thread = EngineThread()

    async def start() -> tuple[asyncio.Server, Server]:
        origin = await asyncio.start_server(_eager_origin, "127.0.0.1", 0)
        pool = UpstreamPool("127.0.0.1", origin.sockets[0].getsockname()[1], loop=thread.loop)
        server = Server(_Forward(pool), ServerSettings(), loop=thread.loop)
        await server.start("127.0.0.1", 0)
        return origin, server

    origin, server = thread.run(start())

    async def late_reader() -> bytes:
        # On the proxy's own loop, as a busy client would be: it reads only when the proxy
        # lets go of the loop, so the end of the response finds the proxy's buffer full.
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", server.port))
            await loop.sock_sendall(sock, request_head)
            await asyncio.sleep(1.0)
            data = bytearray()
            while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), 10):
                data += chunk
            return bytes(data)
        finally:
            sock.close()

    try:
        head, _, body = thread.run(late_reader(), timeout=60).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        assert len(body) == SIZE
    finally:
        origin.close()
        thread.run(server.shutdown(1.0))
        thread.stop()
