"""The client side of the engine: an asyncio protocol fed by httptools, one per connection.

Requests on a connection are served one at a time, in order; pipelined requests wait
in a queue with reading paused. Bodies stream straight between the two transports:
whichever side cannot keep up pauses reading on the other (``pause_writing``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from collections import deque
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus

import httptools

from meshgate.proxy._exchange import Exchange, Handler, Headers, Request, Response, problem
from meshgate.proxy._path import BadTarget, split_target, target_authority
from meshgate.proxy._upstream import (
    FRAMING_CHUNKED,
    FRAMING_CLOSE,
    FRAMING_NONE,
    UpstreamConnection,
    UpstreamError,
)

__all__ = ["Server", "ServerSettings"]

log = logging.getLogger("meshgate.proxy")
_now = time.perf_counter

# RFC 9110 7.6.1: connection-specific fields a proxy must not forward; framing fields
# are regenerated, and Expect is answered here.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"expect",
        b"host",
    }
)
# The gateway's X-Request-Id is the one returned, whatever the upstream says.
_RESPONSE_DROP = frozenset(
    {
        b"x-request-id",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"transfer-encoding",
    }
)
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,200}$")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# Reasons to stop reading from the client, as bits: any set keeps reading paused.
_PAUSE_UPSTREAM = 1  # the upstream's write buffer is full
_PAUSE_QUEUE = 2  # a pipelined request waits for the one in front of it
_PAUSE_BUFFER = 4  # body bytes wait for the handler's decision


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else f"HTTP/1.1 {status} Status\r\n".encode()


class _Clock:
    """The Date header value, computed at most once a second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = 0
        self._value = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


_clock = _Clock()


@dataclass(slots=True)
class ServerSettings:
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    body_timeout: float = 60.0
    max_header_size: int = 16384
    scheme: str = "http"


class _HeaderTooLarge(Exception):
    pass


class _Cycle:
    """One request on a connection, from its head to the last byte of its response."""

    __slots__ = (
        "exchange",
        "keep_alive",
        "expect_continue",
        "body_done",
        "buffered",
        "buffered_size",
        "forwarding",
        "upstream",
        "upstream_chunked",
        "response_started",
        "response_chunked",
        "head_received",
        "waiter",
        "finished",
        "failure",
        "upstream_reusable",
        "timer",
        "bytes_seen",
        "handler",
    )

    def __init__(self, exchange: Exchange, keep_alive: bool, expect_continue: bool) -> None:
        self.exchange = exchange
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.body_done = False
        self.buffered: list[bytes] = []
        self.buffered_size = 0
        self.forwarding = False
        self.upstream: UpstreamConnection | None = None
        self.upstream_chunked = False
        self.response_started = False
        self.response_chunked = False
        self.head_received = False
        self.waiter: asyncio.Future[Response | None] | None = None
        self.finished: asyncio.Future[None] | None = None
        self.failure: Response | None = None
        self.upstream_reusable = False
        self.timer: asyncio.TimerHandle | None = None
        self.bytes_seen = 0
        self.handler: Handler | None = None


class HttpProtocol(asyncio.Protocol):
    """Serves one client connection."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.settings = server.settings
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = ""
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_size = 0
        self._in_head = False
        self._head_bytes = 0
        self._parsing: _Cycle | None = None
        self._current: _Cycle | None = None
        self._queue: deque[_Cycle] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._paused = 0
        self._write_paused = False
        self._eof = False
        self._closed = False
        self._pending_error: Response | None = None

    # connection events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if isinstance(peer, tuple) else ""
        self.server.connections.add(self)
        self._timer = self.loop.call_later(self.settings.header_timeout, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.server.connections.discard(self)
        self._cancel_timer()
        cycle = self._current
        if cycle is not None:
            if cycle.upstream is not None and not cycle.upstream.closed:
                cycle.upstream.abort()
            cycle.exchange.error = cycle.exchange.error or "client closed the connection"
            if cycle.waiter is not None and not cycle.waiter.done():
                cycle.waiter.set_result(None)
            if cycle.finished is not None and not cycle.finished.done():
                cycle.finished.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        in_head = self._in_head
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The parser stops after the head of the upgrade request: refuse that request.
            cycle = self._queue[-1] if self._queue else self._current
            refusal = problem(501, "Not Implemented", "protocol upgrades are not supported")
            self._parsing = None
            self._pause(_PAUSE_QUEUE)
            if cycle is None:
                self._write_error_and_close(refusal)
            else:
                self._fail(cycle, refusal)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeaderTooLarge):
                self._parse_failed(self._head_too_large())
            else:
                log.exception("parser callback failed", exc_info=exc.__context__)
                self._parse_failed(problem(500, "Internal Server Error"))
        except httptools.HttpParserError as exc:
            reason = str(exc) or "malformed request"
            self._parse_failed(problem(400, "Bad Request", f"malformed HTTP/1.1: {reason}"))
        else:
            if in_head and self._in_head:
                # httptools holds a field until its line ends, out of on_header's sight:
                # bound the bytes of a head that spans reads.
                self._head_bytes += len(data)
                if self._head_bytes > self.settings.max_header_size:
                    self._in_head = False
                    self._parse_failed(self._head_too_large())

    def _head_too_large(self) -> Response:
        return problem(
            431,
            "Request Header Fields Too Large",
            f"the request head exceeds {self.settings.max_header_size} bytes",
        )

    def eof_received(self) -> bool | None:
        # A half-closed client may still read the responses it is waiting for.
        self._eof = True
        return self._current is not None

    def pause_writing(self) -> None:
        self._write_paused = True
        cycle = self._current
        if cycle is not None and cycle.upstream is not None:
            cycle.upstream.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        cycle = self._current
        if cycle is not None and cycle.upstream is not None:
            cycle.upstream.resume_reading()

    # parser callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._header_size = 0
        self._in_head = True
        self._head_bytes = 0
        if self._current is None and self._parsing is None:
            # First byte of a new request: the idle timer becomes the header timer.
            self._cancel_timer()
            self._timer = self.loop.call_later(self.settings.header_timeout, self._header_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_size += len(url)
        if self._header_size > self.settings.max_header_size:
            raise _HeaderTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_size += len(name) + len(value) + 4
        if self._header_size > self.settings.max_header_size:
            raise _HeaderTooLarge
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._current is None:
            self._cancel_timer()
        parser = self.parser
        headers = self._headers
        content_length: int | None = None
        chunked = False
        host = b""
        hosts = 0
        request_id = b""
        expect = False
        failure: Response | None = None
        for name, value in headers:
            if name == b"content-length":
                if content_length is not None:
                    failure = problem(400, "Bad Request", "more than one Content-Length field")
                content_length = int(value)
            elif name == b"transfer-encoding":
                if value.strip().lower() != b"chunked" or chunked:
                    failure = problem(
                        501, "Not Implemented", "only Transfer-Encoding: chunked is supported"
                    )
                chunked = True
            elif name == b"host":
                host = value
                hosts += 1
            elif name == b"x-request-id":
                request_id = value
            elif name == b"expect":
                if value.lower() == b"100-continue":
                    expect = True
                else:
                    failure = problem(417, "Expectation Failed", "only 100-continue is supported")
        version = parser.get_http_version()
        if chunked and (content_length is not None or version == "1.0"):
            # RFC 9112 6.1: either way the framing is ambiguous; refuse, then close.
            failure = problem(
                400,
                "Bad Request",
                "ambiguous framing: Transfer-Encoding with Content-Length or in HTTP/1.0",
            )
        elif version != "1.1" and version != "1.0":
            failure = failure or problem(
                505, "HTTP Version Not Supported", "only HTTP/1.1 and 1.0 are served"
            )
        if hosts > 1 or (hosts == 0 and version == "1.1"):
            failure = failure or problem(400, "Bad Request", "exactly one Host field is required")
        try:
            path, query = split_target(self._url)
        except BadTarget as exc:
            path, query = "/", ""
            failure = failure or problem(400, "Bad Request", str(exc))
        else:
            if self._url[:1] != b"/":
                host = target_authority(self._url) or host
        rid = (
            request_id.decode()
            if request_id and _REQUEST_ID.match(request_id)
            else os.urandom(16).hex()
        )
        request = Request(
            parser.get_method().decode("ascii"),
            self._url,
            path,
            query,
            Headers(headers),
            version,
            self.client_ip,
            self.settings.scheme,
            host.decode("latin-1"),
            content_length,
            chunked,
            rid,
        )
        exchange = Exchange(request, _now())
        keep_alive = parser.should_keep_alive() and not self.server.draining
        cycle = _Cycle(exchange, keep_alive, expect and version == "1.1")
        if failure is not None:
            cycle.failure = failure
            cycle.keep_alive = False
        cycle.body_done = not (chunked or content_length)
        self._parsing = None if cycle.body_done else cycle
        if self._current is None:
            self._start(cycle)
        else:
            self._queue.append(cycle)
            self._pause(_PAUSE_QUEUE)

    def on_body(self, body: bytes) -> None:
        cycle = self._parsing
        if cycle is None:
            return
        exchange = cycle.exchange
        exchange.bytes_in += len(body)
        limit = exchange.max_body_size
        if limit is not None and exchange.bytes_in > limit:
            self._parsing = None
            self._fail(
                cycle,
                problem(413, "Content Too Large", f"the request body exceeds {limit} bytes"),
            )
            return
        conn = cycle.upstream
        if cycle.forwarding and conn is not None:
            if cycle.upstream_chunked:
                conn.transport.writelines((b"%x\r\n" % len(body), body, b"\r\n"))  # type: ignore[union-attr]
            else:
                conn.write(body)
        else:
            cycle.buffered.append(body)
            cycle.buffered_size += len(body)
            if cycle.buffered_size > 262144:
                self._pause(_PAUSE_BUFFER)

    def on_message_complete(self) -> None:
        cycle = self._parsing
        if cycle is None:
            return
        self._parsing = None
        cycle.body_done = True
        if cycle.forwarding and cycle.upstream is not None:
            if cycle.upstream_chunked:
                cycle.upstream.write(b"0\r\n\r\n")
            if not cycle.head_received and cycle.timer is not None:
                # The response timeout counts from the end of the request.
                cycle.timer.cancel()
                cycle.timer = self.loop.call_later(
                    cycle.exchange.upstream.response_timeout, self._upstream_timeout, cycle
                )

    # serving

    def _start(self, cycle: _Cycle) -> None:
        self._current = cycle
        self.loop.create_task(self._serve(cycle))

    async def _serve(self, cycle: _Cycle) -> None:
        exchange = cycle.exchange
        handler = cycle.handler = self.server.handler
        response = cycle.failure
        if response is None:
            try:
                response = await handler.handle(exchange)
            except Exception:
                log.exception(
                    "handler failed on %s %s", exchange.request.method, exchange.request.path
                )
                response = problem(
                    500, "Internal Server Error", "the gateway failed on this request"
                )
            if cycle.failure is not None:
                response = cycle.failure
            elif response is None and exchange.upstream is not None and not self._closed:
                try:
                    response = await self._forward(cycle, handler)
                except Exception:
                    log.exception("forwarding failed")
                    response = problem(502, "Bad Gateway", "the gateway failed to forward")
                    cycle.keep_alive = False
                    if cycle.response_started and self.transport is not None:
                        self.transport.abort()
            elif response is None and exchange.upstream is None:
                response = problem(500, "Internal Server Error", "no upstream chosen")
        if response is not None and not self._closed and not cycle.response_started:
            self._send_local(cycle, response, handler)
        exchange.end = _now()
        try:
            handler.on_complete(exchange)
        except Exception:
            log.exception("log phase failed")
        self._finish(cycle)

    async def _forward(self, cycle: _Cycle, handler: Handler) -> Response | None:
        exchange = cycle.exchange
        pool = exchange.upstream
        request = exchange.request
        retry_allowed = not request.has_body
        limit = exchange.max_body_size
        if limit is not None and exchange.bytes_in > limit:
            # Bytes that arrived with the head were read before the handler set the limit.
            return problem(413, "Content Too Large", f"the request body exceeds {limit} bytes")
        conn = pool.take_idle()
        exchange.upstream_start = _now()
        while True:
            if conn is None:
                try:
                    conn = await pool.connect()
                except UpstreamError as exc:
                    exchange.error = exchange.error or str(exc)
                    return cycle.failure or problem(502, "Bad Gateway", str(exc))
                if self._closed or cycle.failure is not None:
                    # The client went away or broke the request while we connected.
                    pool.release(conn)
                    return cycle.failure
            cycle.upstream = conn
            cycle.waiter = self.loop.create_future()
            conn.begin(self, request.method == "HEAD")
            if self._write_paused:
                conn.pause_reading()
            conn.write(self._request_head(exchange, pool.host_header, cycle))
            if cycle.expect_continue and not cycle.body_done:
                self.transport.write(_CONTINUE)  # type: ignore[union-attr]
            if cycle.buffered:
                self._flush_buffered(cycle, conn)
            if cycle.body_done and cycle.upstream_chunked:
                conn.write(b"0\r\n\r\n")
            cycle.forwarding = True
            self._resume(_PAUSE_BUFFER)
            wait = pool.response_timeout
            if not cycle.body_done:
                wait = min(wait, self.settings.body_timeout)
            cycle.timer = self.loop.call_later(wait, self._upstream_timeout, cycle)
            result = await cycle.waiter
            if cycle.head_received or self._closed:
                break
            if result is not None:
                return result
            # The upstream closed a reused connection before answering: it was stale.
            if conn.reused and retry_allowed:
                retry_allowed = False
                conn = None
                cycle.forwarding = False
                continue
            return problem(502, "Bad Gateway", exchange.error or "upstream closed the connection")
        finished = cycle.finished = self.loop.create_future()
        if not self._closed and cycle.upstream is not None:
            await finished
        return None

    def _flush_buffered(self, cycle: _Cycle, conn: UpstreamConnection) -> None:
        chunks, cycle.buffered, cycle.buffered_size = cycle.buffered, [], 0
        if cycle.upstream_chunked:
            for chunk in chunks:
                conn.transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))  # type: ignore[union-attr]
        else:
            conn.transport.writelines(chunks)  # type: ignore[union-attr]

    def _request_head(self, exchange: Exchange, host_header: bytes, cycle: _Cycle) -> bytes:
        request = exchange.request
        headers = request.headers.raw()
        drop = _HOP_BY_HOP
        xff = b""
        for name, value in headers:
            if name == b"connection":
                tokens = {t.strip().lower() for t in value.split(b",")}
                drop = drop | tokens
        parts = [
            request.method.encode("ascii"),
            b" ",
            exchange.upstream_target.encode("latin-1"),
            b" HTTP/1.1\r\nhost: ",
            host_header,
            b"\r\n",
        ]
        for name, value in headers:
            if name in drop:
                continue
            if name == b"x-forwarded-for":
                xff += value + b", "
                continue
            if name in (b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id"):
                continue
            parts += (name, b": ", value, b"\r\n")
        parts += (
            b"x-forwarded-for: ",
            xff,
            request.client_ip.encode("ascii"),
            b"\r\nx-forwarded-proto: ",
            request.scheme.encode("ascii"),
            b"\r\nx-request-id: ",
            request.request_id.encode("ascii"),
            b"\r\n",
        )
        if request.host:
            parts += (b"x-forwarded-host: ", request.host.encode("latin-1"), b"\r\n")
        if request.chunked:
            cycle.upstream_chunked = True
            parts.append(b"transfer-encoding: chunked\r\n\r\n")
        elif request.content_length is not None:
            parts += (b"content-length: ", str(request.content_length).encode(), b"\r\n\r\n")
        else:
            parts.append(b"\r\n")
        return b"".join(parts)

    # upstream events (this protocol is the sink of the current cycle's connection)

    def upstream_head(
        self, status: int, raw: list[tuple[bytes, bytes]], framing: int, keep_alive: bool
    ) -> None:
        cycle = self._current
        if cycle is None or cycle.waiter is None or cycle.waiter.done():
            return
        if cycle.timer is not None:
            cycle.timer.cancel()
        exchange = cycle.exchange
        exchange.status = status
        exchange.upstream_headers_at = _now()
        cycle.head_received = True
        cycle.upstream_reusable = keep_alive
        drop = _RESPONSE_DROP
        for name, value in raw:
            if name == b"connection":
                drop = drop | {t.strip().lower() for t in value.split(b",")}
        headers = Headers([(k, v) for k, v in raw if k not in drop])
        exchange.response_headers = headers
        try:
            cycle.handler.on_response(exchange, status, headers)  # type: ignore[union-attr]
        except Exception:
            log.exception("response phase failed")
        http11 = exchange.request.http_version == "1.1"
        if framing in (FRAMING_CHUNKED, FRAMING_CLOSE):
            if http11:
                cycle.response_chunked = True
                headers.raw().append((b"transfer-encoding", b"chunked"))
                if framing == FRAMING_CHUNKED:
                    headers.remove("content-length")
            else:
                cycle.keep_alive = False
        self._write_head(cycle, status, headers)
        cycle.waiter.set_result(None)
        if framing != FRAMING_NONE:
            cycle.timer = self.loop.call_later(
                exchange.upstream.response_timeout, self._body_timeout, cycle
            )

    def upstream_body(self, data: bytes) -> None:
        cycle = self._current
        if cycle is None or self.transport is None:
            return
        cycle.exchange.bytes_out += len(data)
        if cycle.response_chunked:
            self.transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self.transport.write(data)

    def upstream_done(self) -> None:
        cycle = self._current
        if cycle is None:
            return
        if cycle.timer is not None:
            cycle.timer.cancel()
        if cycle.response_chunked and self.transport is not None:
            self.transport.write(b"0\r\n\r\n")
        conn, cycle.upstream = cycle.upstream, None
        if conn is not None:
            if cycle.upstream_reusable and cycle.body_done:
                conn.resume_reading()  # paused by the client's back pressure, now idle
                conn.pool.release(conn)
            else:
                conn.close()
        if cycle.waiter is not None and not cycle.waiter.done():
            cycle.waiter.set_result(None)
        if cycle.finished is not None and not cycle.finished.done():
            cycle.finished.set_result(None)

    def upstream_lost(self, exc: Exception | None) -> None:
        cycle = self._current
        if cycle is None:
            return
        if cycle.timer is not None:
            cycle.timer.cancel()
        cycle.upstream = None
        cycle.exchange.error = str(exc) if exc else "upstream closed the connection"
        if not cycle.response_started:
            if cycle.waiter is not None and not cycle.waiter.done():
                cycle.waiter.set_result(None)
            return
        # The response is cut short: the client must see a broken connection, not a
        # complete-looking truncated body.
        cycle.keep_alive = False
        if self.transport is not None:
            self.transport.abort()
        if cycle.finished is not None and not cycle.finished.done():
            cycle.finished.set_result(None)

    def upstream_pause(self) -> None:
        self._pause(_PAUSE_UPSTREAM)

    def upstream_resume(self) -> None:
        self._resume(_PAUSE_UPSTREAM)

    def _upstream_timeout(self, cycle: _Cycle) -> None:
        if cycle.head_received or cycle.waiter is None or cycle.waiter.done():
            return
        timeout = cycle.exchange.upstream.response_timeout
        body_timeout = self.settings.body_timeout
        if not cycle.body_done and cycle.exchange.bytes_in != cycle.bytes_seen:
            # The request body is still flowing: the upstream is not late yet.
            cycle.bytes_seen = cycle.exchange.bytes_in
            wait = min(timeout, body_timeout)
            cycle.timer = self.loop.call_later(wait, self._upstream_timeout, cycle)
            return
        conn, cycle.upstream = cycle.upstream, None
        if conn is not None:
            conn.abort()
        if not cycle.body_done and not self._paused & _PAUSE_UPSTREAM:
            # The client stopped sending its body; the upstream was waiting for it.
            cycle.exchange.error = f"the request body stalled for {body_timeout}s"
            cycle.waiter.set_result(problem(408, "Request Timeout", cycle.exchange.error))
            return
        cycle.exchange.error = f"upstream sent no response within {timeout}s"
        cycle.keep_alive = cycle.keep_alive and cycle.body_done
        cycle.waiter.set_result(problem(504, "Gateway Timeout", cycle.exchange.error))

    def _body_timeout(self, cycle: _Cycle) -> None:
        conn = cycle.upstream
        if conn is None or self._current is not cycle:
            return
        timeout = cycle.exchange.upstream.response_timeout
        # While paused by back pressure the upstream's silence is the client's doing.
        idle = 0.0 if conn.paused else self.loop.time() - conn.last_activity
        if idle < timeout:
            cycle.timer = self.loop.call_later(timeout - idle, self._body_timeout, cycle)
            return
        conn.abort()
        cycle.upstream = None
        self.upstream_lost(UpstreamError(f"upstream body stalled for {timeout}s"))

    # responses

    def _write_head(self, cycle: _Cycle, status: int, headers: Headers) -> None:
        exchange = cycle.exchange
        parts = [_status_line(status)]
        has_date = False
        for name, value in headers.raw():
            if name == b"date":
                has_date = True
            parts += (name, b": ", value, b"\r\n")
        if not has_date:
            parts += (b"date: ", _clock.date(), b"\r\n")
        parts += (b"x-request-id: ", exchange.request.request_id.encode("ascii"), b"\r\n")
        if not cycle.keep_alive or self.server.draining:
            cycle.keep_alive = False
            parts.append(b"connection: close\r\n\r\n")
        elif exchange.request.http_version == "1.0":
            parts.append(b"connection: keep-alive\r\n\r\n")
        else:
            parts.append(b"\r\n")
        cycle.response_started = True
        self.transport.write(b"".join(parts))  # type: ignore[union-attr]

    def _send_local(self, cycle: _Cycle, response: Response, handler: Handler) -> None:
        exchange = cycle.exchange
        exchange.status = response.status
        headers = response.headers
        exchange.response_headers = headers
        try:
            handler.on_response(exchange, response.status, headers)
        except Exception:
            log.exception("response phase failed")
        body = response.body
        if response.status not in (204, 304) and not (100 <= response.status < 200):
            headers.set("content-length", str(len(body)))
        if not cycle.body_done:
            # The rest of the request body will not be read: the connection cannot be reused.
            cycle.keep_alive = False
        self._write_head(cycle, response.status, headers)
        if body and exchange.request.method != "HEAD":
            exchange.bytes_out += len(body)
            self.transport.write(body)  # type: ignore[union-attr]

    def _fail(self, cycle: _Cycle, response: Response) -> None:
        """End an exchange early with an error, whatever stage it reached."""
        cycle.keep_alive = False
        cycle.exchange.error = cycle.exchange.error or response.body.decode(errors="replace")
        conn, cycle.upstream = cycle.upstream, None
        if conn is not None:
            conn.abort()
        if cycle.timer is not None:
            cycle.timer.cancel()
        if cycle.response_started:
            if self.transport is not None:
                self.transport.abort()
            if cycle.finished is not None and not cycle.finished.done():
                cycle.finished.set_result(None)
        elif cycle.waiter is not None and not cycle.waiter.done():
            cycle.head_received = False
            cycle.waiter.set_result(response)
        else:
            cycle.failure = response

    def _parse_failed(self, response: Response) -> None:
        # The bad bytes belong to the request whose body is being read, else to a new
        # request: requests received before it are still answered, in order.
        cycle, self._parsing = self._parsing, None
        self._pause(_PAUSE_QUEUE)
        if cycle is not None and cycle is self._current:
            self._fail(cycle, response)
        elif self._current is not None:
            if cycle is not None:
                self._queue.remove(cycle)
            self._pending_error = response
        else:
            self._write_error_and_close(response)

    def _write_error_and_close(self, response: Response) -> None:
        if self.transport is None or self._closed:
            return
        head = [_status_line(response.status)]
        for name, value in response.headers.raw():
            head += (name, b": ", value, b"\r\n")
        head += (
            b"content-length: ",
            str(len(response.body)).encode(),
            b"\r\n",
            b"date: ",
            _clock.date(),
            b"\r\nconnection: close\r\n\r\n",
            response.body,
        )
        self.transport.write(b"".join(head))
        self._close()

    def _finish(self, cycle: _Cycle) -> None:
        if cycle.timer is not None:
            cycle.timer.cancel()
        conn, cycle.upstream = cycle.upstream, None
        if conn is not None:
            conn.abort()
        self._current = None
        if self._closed:
            return
        if not cycle.keep_alive or not cycle.body_done or self.server.draining:
            self._close()
            return
        # Pauses that belonged to this exchange's upstream or body must not outlive it.
        self._resume(_PAUSE_UPSTREAM | _PAUSE_BUFFER)
        if self._queue:
            self._start(self._queue.popleft())
            if not self._queue and self._pending_error is None:
                self._resume(_PAUSE_QUEUE)
            return
        if self._pending_error is not None:
            self._write_error_and_close(self._pending_error)
            return
        if self._eof:
            self._close()
            return
        self._resume(_PAUSE_QUEUE)
        if self._in_head:
            # The next request's head started arriving while this one was served.
            self._timer = self.loop.call_later(self.settings.header_timeout, self._header_timeout)
        else:
            self._timer = self.loop.call_later(self.settings.idle_timeout, self._idle_timeout)

    # timers and flow control

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _header_timeout(self) -> None:
        self._timer = None
        if self._current is None and not self._closed:
            self._write_error_and_close(
                problem(
                    408,
                    "Request Timeout",
                    f"no complete request head within {self.settings.header_timeout}s",
                )
            )

    def _idle_timeout(self) -> None:
        self._timer = None
        if self._current is None:
            self._close()

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and self.transport is not None and not self._closed:
                self.transport.resume_reading()

    def _close(self) -> None:
        if not self._closed and self.transport is not None:
            self._closed = True
            self._cancel_timer()
            self.transport.close()
            self.server.connections.discard(self)

    def shutdown(self) -> None:
        """Stop after the current response; close now when idle."""
        if self._current is None:
            self._close()


class Server:
    """Listens on one address and serves every connection with the current handler.

    ``handler`` may be replaced at any time (configuration reload): requests already
    started finish with the handler they began with.
    """

    def __init__(
        self,
        handler: Handler,
        settings: ServerSettings | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.handler = handler
        self.settings = settings or ServerSettings()
        self.loop = loop or asyncio.get_event_loop()
        self.connections: set[HttpProtocol] = set()
        self.draining = False
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        sock = bind_socket(host, port, reuse_port=reuse_port)
        self._server = await self.loop.create_server(
            lambda: HttpProtocol(self), sock=sock, backlog=2048
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, let in-flight requests finish within ``grace`` seconds."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = self.loop.time() + grace
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()


def bind_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket; with ``reuse_port`` several processes share the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock
