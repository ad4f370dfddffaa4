"""The control-plane client's event streams: every byte of the body reaches the reader,
whether it came in the same read as the head or later, chunked or delimited by the close."""

from __future__ import annotations

import asyncio

import pytest

from meshgate.proxy.client import HttpError, open_stream


async def _serve(writes: list[bytes], pause: float = 0.05) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for data in writes:
            writer.write(data)
            await writer.drain()
            await asyncio.sleep(pause)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _read_all(port: int) -> tuple[int, bytes]:
    stream = await open_stream(f"http://127.0.0.1:{port}/events", timeout=5)
    try:
        body = b"".join([chunk async for chunk in stream.chunks()])
    finally:
        stream.close()
    return stream.status, body


HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def test_the_first_event_in_the_same_read_as_the_head_is_kept() -> None:
    async def main() -> tuple[int, bytes]:
        first = b"event: snapshot\ndata: {}\n\n"
        server, port = await _serve(
            [HEAD + _chunk(first), _chunk(b"event: update\n\n"), b"0\r\n\r\n"]
        )
        async with server:
            return await _read_all(port)

    status, body = asyncio.run(main())
    assert status == 200
    assert body == b"event: snapshot\ndata: {}\n\nevent: update\n\n"


def test_a_body_ended_by_the_close() -> None:
    async def main() -> tuple[int, bytes]:
        server, port = await _serve([b"HTTP/1.1 200 OK\r\n\r\nab", b"cd"])
        async with server:
            return await _read_all(port)

    assert asyncio.run(main()) == (200, b"abcd")


def test_a_chunked_stream_cut_short_is_an_error() -> None:
    async def main() -> None:
        server, port = await _serve([HEAD + _chunk(b"event: x\n\n")])
        async with server:
            await _read_all(port)

    with pytest.raises(HttpError, match="closed in the middle"):
        asyncio.run(main())


def test_no_head_within_the_timeout() -> None:
    async def main() -> None:
        server, port = await _serve([], pause=0)

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(3)

        server.close()
        quiet = await asyncio.start_server(silent, "127.0.0.1", 0)
        async with quiet:
            await open_stream(f"http://127.0.0.1:{quiet.sockets[0].getsockname()[1]}/", timeout=0.3)

    with pytest.raises(HttpError, match="within 0.3s"):
        asyncio.run(main())
