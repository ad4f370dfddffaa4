"""A small real HTTP/1.1 upstream for the demo, the tests and the benchmarks.

Routes (any prefix before them is ignored, so /echo/bytes/10 works as /bytes/10):
- ``/bytes/N``      N bytes streamed in 64 KiB writes (``?chunked=1`` for chunked encoding)
- ``/status/N``     an empty response with that status
- ``/delay/S``      answers after S seconds
- ``/upload``       reads the body and answers its length and SHA-256
- anything else     JSON echo of method, path, query, headers and body length
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sys

import httptools

_ROUTE = re.compile(rb"/(bytes|status|delay|upload)(?:/([0-9.]+))?(?:\?(.*))?$")
_BLOCK = b"x" * 65536


class EchoProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body_len = 0
        self.sha = hashlib.sha256()
        self.hashing = False
        self.busy = False
        self.paused_write = asyncio.Event()
        self.paused_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            self.transport.close()

    def pause_writing(self) -> None:
        self.paused_write.clear()

    def resume_writing(self) -> None:
        self.paused_write.set()

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body_len = 0
        self.sha = hashlib.sha256()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.hashing = _ROUTE.search(self.url.split(b"?")[0]) is not None and b"/upload" in self.url

    def on_body(self, body: bytes) -> None:
        self.body_len += len(body)
        if self.hashing:
            self.sha.update(body)

    def on_message_complete(self) -> None:
        keep_alive = self.parser.should_keep_alive()
        method = self.parser.get_method()
        path, _, query = self.url.partition(b"?")
        m = _ROUTE.search(path)
        kind = m.group(1) if m else b""
        arg = m.group(2) if m else None
        if kind == b"bytes":
            asyncio.get_running_loop().create_task(
                self._stream(int(arg or 0), b"chunked=1" in query, method == b"HEAD", keep_alive)
            )
            return
        if kind == b"delay":
            asyncio.get_running_loop().call_later(
                float(arg or 0), self._send, 200, b'{"delayed": true}', keep_alive, method
            )
            return
        if kind == b"status":
            self._send(int(arg or 200), b"", keep_alive, method)
            return
        if kind == b"upload":
            doc = {"length": self.body_len, "sha256": self.sha.hexdigest()}
            self._send(200, json.dumps(doc).encode(), keep_alive, method)
            return
        doc = {
            "method": method.decode(),
            "path": path.decode("latin-1"),
            "query": query.decode("latin-1"),
            "headers": {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self.headers},
            "body_length": self.body_len,
        }
        self._send(200, json.dumps(doc).encode(), keep_alive, method)

    def _send(self, status: int, body: bytes, keep_alive: bool, method: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        head = b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\n" % status
        if status not in (204, 304):
            head += b"content-length: %d\r\n" % len(body)
        if not keep_alive:
            head += b"connection: close\r\n"
        payload = head + b"\r\n" + (b"" if method == b"HEAD" or status in (204, 304) else body)
        self.transport.write(payload)
        if not keep_alive:
            self.transport.close()

    async def _stream(self, size: int, chunked: bool, head: bool, keep_alive: bool) -> None:
        assert self.transport is not None
        framing = b"transfer-encoding: chunked\r\n" if chunked else b"content-length: %d\r\n" % size
        conn = b"" if keep_alive else b"connection: close\r\n"
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
            + framing
            + conn
            + b"\r\n"
        )
        left = 0 if head else size
        while left > 0:
            await self.paused_write.wait()
            if self.transport.is_closing():
                return
            block = _BLOCK if left >= len(_BLOCK) else _BLOCK[:left]
            left -= len(block)
            if chunked:
                self.transport.writelines((b"%x\r\n" % len(block), block, b"\r\n"))
            else:
                self.transport.write(block)
        if chunked and not head:
            self.transport.write(b"0\r\n\r\n")
        if not keep_alive:
            self.transport.close()


async def serve(host: str = "127.0.0.1", port: int = 9001) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(EchoProtocol, host, port, backlog=1024)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    host, _, port = (args[0] if args else "127.0.0.1:9001").rpartition(":")

    async def run() -> None:
        server = await serve(host or "127.0.0.1", int(port))
        print(f"echo upstream listening on {host}:{port}", flush=True)
        await server.serve_forever()

    try:
        import uvloop

        uvloop.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
