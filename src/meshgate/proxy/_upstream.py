"""Upstream connections: a pool of keep-alive HTTP/1.1 connections per backend address.

An :class:`UpstreamConnection` parses responses with httptools and pushes head, body and
end events to its current *sink* (the client side of an exchange). It never buffers a
body: flow control pauses the faster side (see ``pause_writing`` on both protocols).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import httptools

__all__ = ["UpstreamPool", "UpstreamConnection", "UpstreamError", "Sink"]


class UpstreamError(Exception):
    """The upstream could not be reached or broke the exchange."""


class Sink(Protocol):
    def upstream_head(
        self, status: int, headers: list[tuple[bytes, bytes]], framing: int, keep_alive: bool
    ) -> None: ...
    def upstream_body(self, data: bytes) -> None: ...
    def upstream_done(self) -> None: ...
    def upstream_lost(self, exc: Exception | None) -> None: ...
    def upstream_pause(self) -> None: ...
    def upstream_resume(self) -> None: ...


# Response body framing, as the upstream sent it.
FRAMING_NONE = 0  # no body (HEAD, 204, 304)
FRAMING_LENGTH = 1
FRAMING_CHUNKED = 2
FRAMING_CLOSE = 3  # delimited by the connection closing


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "pool",
        "transport",
        "parser",
        "sink",
        "head_request",
        "_headers",
        "_status",
        "_skip",
        "_framing",
        "_done",
        "closed",
        "reused",
        "last_activity",
        "paused",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sink: Sink | None = None
        self.head_request = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._status = 0
        self._skip = False
        self._framing = FRAMING_LENGTH
        self._done = False
        self.closed = False
        self.reused = False
        self.last_activity = 0.0
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def begin(self, sink: Sink, head_request: bool) -> None:
        """Attach the exchange that receives the next response."""
        self.sink = sink
        self.head_request = head_request
        self._headers = []
        self._done = False
        if self.paused:
            self.paused = False
            assert self.transport is not None
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.pool.loop.time()
        if self.sink is None:
            # Bytes while idle: the upstream broke HTTP; never reuse this connection.
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            sink = self.sink
            self.close()
            if sink is not None and not self._done:
                sink.upstream_lost(UpstreamError(f"invalid response from upstream: {exc}"))
            return
        if self._done and self.head_request:
            # llhttp cannot be told a response has no body; a HEAD response's parser
            # would wait for Content-Length bytes, so start afresh.
            self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            # Interim responses (100 Continue, 103) are not forwarded; the gateway
            # answers Expect itself.
            self._skip = True
            return
        self._skip = False
        self._status = status
        if self.head_request or status in (204, 304):
            framing = FRAMING_NONE
        else:
            framing = FRAMING_CLOSE
            for k, v in self._headers:
                if k == b"content-length":
                    framing = FRAMING_LENGTH
                elif k == b"transfer-encoding" and v.lower().endswith(b"chunked"):
                    framing = FRAMING_CHUNKED
                    break
        self._framing = framing
        keep_alive = self.parser.should_keep_alive() and framing != FRAMING_CLOSE
        assert self.sink is not None
        self.sink.upstream_head(status, self._headers, framing, keep_alive)
        if framing == FRAMING_NONE and self.head_request:
            self._finish()

    def on_body(self, body: bytes) -> None:
        if self.sink is not None and not self._skip:
            self.sink.upstream_body(body)

    def on_message_complete(self) -> None:
        if self._skip:
            self._skip = False
            return
        if not self._done:
            self._finish()

    def _finish(self) -> None:
        self._done = True
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.upstream_done()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        sink, self.sink = self.sink, None
        if sink is None:
            return
        if (
            exc is None
            and self._framing == FRAMING_CLOSE
            and self._status
            and not self._done
            and not self._skip
        ):
            self._done = True
            sink.upstream_done()
        else:
            sink.upstream_lost(
                UpstreamError("upstream closed the connection" if exc is None else str(exc))
            )

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_pause()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_resume()

    def pause_reading(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.last_activity = self.pool.loop.time()  # silence while paused was ours
            self.transport.resume_reading()

    def close(self) -> None:
        self.sink = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            self.pool.forget(self)

    def abort(self) -> None:
        self.sink = None
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self.pool.forget(self)


class UpstreamPool:
    """Connections to one backend address, reused LIFO while they stay healthy."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float = 5.0,
        response_timeout: float = 60.0,
        max_idle: int = 64,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.response_timeout = response_timeout
        self.max_idle = max_idle
        self.loop = loop or asyncio.get_event_loop()
        default_port = port == 80
        authority = f"[{host}]" if ":" in host else host
        self.host_header = (authority if default_port else f"{authority}:{port}").encode()
        self._idle: list[UpstreamConnection] = []

    def __repr__(self) -> str:
        return f"UpstreamPool({self.host}:{self.port}, idle={len(self._idle)})"

    def take_idle(self) -> UpstreamConnection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    async def connect(self) -> UpstreamConnection:
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port),
                self.connect_timeout,
            )
        except TimeoutError:
            raise UpstreamError(
                f"connecting to {self.host}:{self.port} took longer than {self.connect_timeout}s"
            ) from None
        except OSError as exc:
            raise UpstreamError(
                f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        if conn.closed:
            return
        if len(self._idle) >= self.max_idle:
            conn.close()
            return
        conn.sink = None
        self._idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
