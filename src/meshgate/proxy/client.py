"""A small HTTP/1.1 client for the control plane: one request per connection, on asyncio.

Only what a data plane needs to pull snapshots, report status and follow a stream of
events: http:// and https://, one overall deadline per request (or, for a stream, for its
head), responses parsed by httptools and bounded in size. Cancelling the calling task
closes the connection at once (a long poll must not hold a shutdown).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from urllib.parse import SplitResult, urlsplit

import httptools

__all__ = ["HttpError", "HttpResponse", "HttpStream", "ResponseTooLarge", "open_stream", "request"]

_READ_SIZE = 65536
_MAX_HEAD = 65536


class HttpError(Exception):
    """The server could not be reached, or its answer was not a usable HTTP response."""


class ResponseTooLarge(HttpError):
    """The response body is larger than allowed; ``headers`` are those received."""

    def __init__(self, message: str, status: int, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


class HttpResponse:
    """A complete response: status, header fields (names lowercased, last one wins), body."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class _Parsed:
    """httptools callbacks collecting one response."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.size = 0
        self.declared = 0
        self.head_done = False
        self.complete = False
        self.framed = False  # Content-Length or chunked: EOF before the end is an error

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.head_done = True
        self.framed = (
            "content-length" in self.headers
            or "chunked" in self.headers.get("transfer-encoding", "").lower()
        )
        length = self.headers.get("content-length", "")
        self.declared = int(length) if length.isdigit() else 0

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size <= self.max_body:
            self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


async def request(
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    timeout: float,
    max_body: int,
) -> HttpResponse:
    """Send one request and read the whole response within ``timeout`` seconds.

    Raises :class:`HttpError` when the server cannot be reached, times out or answers
    something that is not HTTP/1.x, and :class:`ResponseTooLarge` past ``max_body`` bytes.
    """
    parts, host, port, context, head = _prepare(method, url, headers, body)
    try:
        async with asyncio.timeout(timeout):
            return await _exchange(host, port, context, head + body, method, max_body)
    except TimeoutError:
        raise HttpError(f"no complete answer from {parts.netloc} within {timeout:g}s") from None
    except ssl.SSLError as exc:
        raise HttpError(f"TLS with {parts.netloc} failed: {exc.reason or exc}") from None
    except OSError as exc:
        raise HttpError(f"cannot reach {parts.netloc}: {exc.strerror or exc}") from None


def _prepare(
    method: str, url: str, headers: dict[str, str] | None, body: bytes
) -> tuple[SplitResult, str, int, ssl.SSLContext | None, bytes]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpError(f"not an http:// or https:// URL: {url!r}")
    host = parts.hostname
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise HttpError(f"bad port in {url!r}") from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = parts.netloc.rpartition("@")[2]
    lines = [f"{method} {target} HTTP/1.1", f"Host: {authority}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method not in ("GET", "HEAD"):
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    context = ssl.create_default_context() if parts.scheme == "https" else None
    return parts, host, port, context, head


async def _exchange(
    host: str, port: int, context: ssl.SSLContext | None, data: bytes, method: str, max_body: int
) -> HttpResponse:
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    try:
        writer.write(data)
        await writer.drain()
        parsed = _Parsed(max_body)
        parser = httptools.HttpResponseParser(parsed)
        received = 0
        while not parsed.complete:
            chunk = await reader.read(_READ_SIZE)
            if not chunk:
                if parsed.head_done and not parsed.framed:
                    break  # the body ends with the connection
                raise HttpError("the connection closed before the response was complete")
            received += len(chunk)
            if not parsed.head_done and received > _MAX_HEAD:
                raise HttpError(f"response head larger than {_MAX_HEAD} bytes")
            try:
                parser.feed_data(chunk)
            except httptools.HttpParserUpgrade:
                raise HttpError("the server switched protocols") from None
            except httptools.HttpParserError as exc:
                raise HttpError(f"malformed HTTP response: {exc}") from None
            if method == "HEAD" and parsed.head_done:
                break
            if parsed.size > max_body or parsed.declared > max_body:
                status = parser.get_status_code()
                raise ResponseTooLarge(
                    f"response body larger than {max_body} bytes", status, parsed.headers
                )
        return HttpResponse(parser.get_status_code(), parsed.headers, b"".join(parsed.chunks))
    finally:
        writer.close()


class HttpStream:
    """A response whose body is read as it comes (server-sent events): ``status``,
    ``headers``, then :meth:`chunks` until the server ends it. Close it when done."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        # No bound: the events of a stream are bounded by its reader (they may come with the head).
        self._parsed = _Parsed(2**62)
        self._parser = httptools.HttpResponseParser(self._parsed)
        self.status = 0
        self.headers: dict[str, str] = {}
        # A stream quiet for this long is taken for dead (a server pings well within it).
        self.idle = 30.0

    async def _head(self) -> None:
        parsed = self._parsed
        received = 0
        while not parsed.head_done:
            chunk = await self._reader.read(_READ_SIZE)
            if not chunk:
                raise HttpError("the connection closed before the response head")
            received += len(chunk)
            if received > _MAX_HEAD and not parsed.head_done:
                raise HttpError(f"response head larger than {_MAX_HEAD} bytes")
            self._feed(chunk)
        self.status = self._parser.get_status_code()
        self.headers = parsed.headers

    def _feed(self, chunk: bytes) -> None:
        try:
            self._parser.feed_data(chunk)
        except httptools.HttpParserUpgrade:
            raise HttpError("the server switched protocols") from None
        except httptools.HttpParserError as exc:
            raise HttpError(f"malformed HTTP response: {exc}") from None

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive (de-chunked); ends with the response or the connection."""
        parsed = self._parsed
        while True:
            if parsed.chunks:
                pending, parsed.chunks = parsed.chunks, []
                for piece in pending:
                    yield piece
            if parsed.complete:
                return
            try:
                chunk = await asyncio.wait_for(self._reader.read(_READ_SIZE), self.idle)
            except TimeoutError:
                raise HttpError(f"the stream sent nothing for {self.idle:g}s") from None
            except OSError as exc:
                raise HttpError(f"the stream broke: {exc.strerror or exc}") from None
            if not chunk:
                if parsed.framed:
                    raise HttpError("the connection closed in the middle of the stream")
                return
            self._feed(chunk)

    def close(self) -> None:
        self._writer.close()


async def open_stream(
    url: str, *, headers: dict[str, str] | None = None, timeout: float
) -> HttpStream:
    """GET ``url`` and return once the response head is in (within ``timeout`` seconds);
    the body is then read with :meth:`HttpStream.chunks`, with no deadline of its own."""
    parts, host, port, context, head = _prepare("GET", url, headers, b"")
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=context)
            stream = HttpStream(reader, writer)
            try:
                writer.write(head)
                await stream._head()
            except BaseException:
                writer.close()
                raise
            return stream
    except TimeoutError:
        raise HttpError(f"no response head from {parts.netloc} within {timeout:g}s") from None
    except ssl.SSLError as exc:
        raise HttpError(f"TLS with {parts.netloc} failed: {exc.reason or exc}") from None
    except OSError as exc:
        raise HttpError(f"cannot reach {parts.netloc}: {exc.strerror or exc}") from None
