"""``http``: routes served by the project's HTTP engine, and calls to HTTP services.

``from: http:/orders?method=POST`` is served by one :class:`meshgate.proxy.Server` per
context (``http_listen`` setting, default 127.0.0.1:8088): the request body, read whole
through the engine (``max_body_size``, default 1 MiB, else 413), is the message body;
the message at the route's end is the reply. ``to: http://host:port/path`` calls a
service over the engine's pooled keep-alive upstream connections.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from meshgate.integration._component import Component, Consumer, Endpoint, Processor, Producer
from meshgate.integration._errors import (
    CircuitOpenError,
    EndpointError,
    HttpOperationFailed,
    IntegrationError,
    NoConsumerError,
    PayloadError,
    SchemaValidationError,
)
from meshgate.integration._message import Exchange, ExchangePattern, Message
from meshgate.integration._uri import EndpointUri, Options
from meshgate.proxy import Exchange as HttpExchange
from meshgate.proxy import (
    Headers,
    Response,
    Server,
    ServerSettings,
    UpstreamError,
    UpstreamPool,
    problem,
)

if TYPE_CHECKING:
    from meshgate.integration._context import IntegrationContext

__all__ = ["HttpComponent"]

DEFAULT_LISTEN = "127.0.0.1:8088"
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# Request bodies are read whole into the message: bounded (413 above), per endpoint.
DEFAULT_MAX_BODY = 1024 * 1024
# Seconds the requests in flight get when a listener closes without a drain deadline.
_CLOSE_GRACE = 5.0
MAX_RESPONSE_BODY = 64 * 1024 * 1024
# Fields that belong to one connection or are regenerated from the body, never copied.
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
        "expect",
    }
)
# Message headers the http component sets itself; not sent as HTTP fields.
_INTERNAL = ("http_", "dead_letter_")
_STATUS_BY_ERROR: tuple[tuple[type[BaseException], int], ...] = (
    (PayloadError, 400),
    (SchemaValidationError, 422),
    (HttpOperationFailed, 502),
    (CircuitOpenError, 503),
    (NoConsumerError, 503),
)


class HttpComponent(Component):
    def __init__(self) -> None:
        self._servers: dict[str, _Listener] = {}
        self._pools: dict[tuple[str, int], UpstreamPool] = {}

    def create_endpoint(self, uri: EndpointUri, context: IntegrationContext) -> Endpoint:
        if uri.path.startswith("//"):
            return _ClientEndpoint(uri, context, self)
        return _ServerEndpoint(uri, context, self)

    def listener(self, context: IntegrationContext) -> _Listener:
        listen = str(context.settings.get("http_listen", DEFAULT_LISTEN))
        listener = self._servers.get(listen)
        if listener is None:
            listener = self._servers[listen] = _Listener(listen)
        return listener

    def pool(
        self, host: str, port: int, connect_timeout: float, response_timeout: float
    ) -> UpstreamPool:
        pool = self._pools.get((host, port))
        if pool is None:
            pool = UpstreamPool(
                host,
                port,
                connect_timeout=connect_timeout,
                response_timeout=response_timeout,
                loop=asyncio.get_running_loop(),
            )
            self._pools[(host, port)] = pool
        return pool

    async def stop(self) -> None:
        for listener in self._servers.values():
            await listener.close()
        self._servers.clear()
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


class _ServerEndpoint(Endpoint):
    def __init__(self, uri: EndpointUri, context: IntegrationContext, component: HttpComponent):
        super().__init__(uri, context)
        self.component = component
        if not uri.path.startswith("/"):
            raise EndpointError(
                f"{uri.text}: an http consumer path starts with '/', e.g. http:/orders"
            )
        options = Options(uri)
        methods = (options.text("method") or ",".join(METHODS)).upper().split(",")
        unknown = [m for m in methods if m.strip() not in METHODS]
        if unknown:
            raise EndpointError(
                f"{uri.text}: option 'method' must be among {', '.join(METHODS)},"
                f" not {unknown[0]!r}"
            )
        self.methods = frozenset(m.strip() for m in methods)
        self.prefix = options.boolean("match_on_uri_prefix", False)
        self.max_body_size = options.integer("max_body_size", DEFAULT_MAX_BODY, maximum=2**30)
        options.finish()
        self.path = uri.path

    def create_consumer(self, processor: Processor) -> Consumer:
        return _HttpConsumer(self, processor)

    def create_producer(self) -> Producer:
        raise EndpointError(
            f"{self.uri.text}: to call a service write http://host:port/path; http:/path is served"
        )


class _HttpConsumer(Consumer):
    endpoint: _ServerEndpoint

    async def start(self) -> None:
        listener = self.endpoint.component.listener(self.endpoint.context)
        listener.add(self)
        try:
            await listener.open()
        except Exception:
            listener.remove(self)
            raise

    async def stop(self) -> None:
        listener = self.endpoint.component.listener(self.endpoint.context)
        listener.remove(self)
        if not listener.consumers:
            # The requests in flight get until the drain deadline (--grace) to finish.
            grace = _CLOSE_GRACE
            if self.deadline is not None:
                grace = max(0.0, self.deadline - asyncio.get_running_loop().time())
            await listener.close(grace)


class _Listener:
    """One engine server; its handler dispatches each request to the consumer of its path."""

    def __init__(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.consumers: list[_HttpConsumer] = []
        self.server: Server | None = None

    def add(self, consumer: _HttpConsumer) -> None:
        for other in self.consumers:
            same_path = other.endpoint.path == consumer.endpoint.path
            if same_path and other.endpoint.methods & consumer.endpoint.methods:
                raise EndpointError(
                    f"{consumer.endpoint.uri.text}: {other.endpoint.uri.text}"
                    " serves this path already"
                )
        self.consumers.append(consumer)

    def remove(self, consumer: _HttpConsumer) -> None:
        if consumer in self.consumers:
            self.consumers.remove(consumer)

    async def open(self) -> None:
        if self.server is not None:
            return
        server = Server(_Handler(self), ServerSettings(), asyncio.get_running_loop())
        try:
            await server.start(self.host, self.port)
        except OSError as exc:
            raise EndpointError(
                f"http: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        self.server = server
        if self.port == 0:
            self.port = server.port

    async def close(self, grace: float = _CLOSE_GRACE) -> None:
        server, self.server = self.server, None
        if server is not None:
            await server.shutdown(grace)

    def find(self, path: str) -> list[_HttpConsumer]:
        exact = [c for c in self.consumers if c.endpoint.path == path]
        if exact:
            return exact
        return [
            c
            for c in self.consumers
            if c.endpoint.prefix and path.startswith(c.endpoint.path.rstrip("/") + "/")
        ]


class _Handler:
    def __init__(self, listener: _Listener) -> None:
        self.listener = listener

    def handle(self, exchange: HttpExchange) -> Response | None | Awaitable[Response | None]:
        request = exchange.request
        candidates = self.listener.find(request.path)
        if not candidates:
            return problem(404, "Not Found", f"no route serves {request.path}")
        consumer = next((c for c in candidates if request.method in c.endpoint.methods), None)
        if consumer is None:
            allowed = sorted({m for c in candidates for m in c.endpoint.methods})
            response = problem(405, "Method Not Allowed", f"{request.method} is not served here")
            response.headers.set("allow", ", ".join(allowed))
            return response
        return self._run(consumer, exchange)

    async def _run(self, consumer: _HttpConsumer, http: HttpExchange) -> Response:
        request = http.request
        body: bytes | None = None
        if request.has_body:
            # A body over the limit, cut short or too slow raises RequestBodyError: the
            # engine answers it (413, 400, 408) and the route never sees the request.
            body = await http.read_body(consumer.endpoint.max_body_size)
        headers: dict[str, Any] = {}
        for raw_name, raw_value in request.headers.raw():
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            headers[name] = value if name not in headers else f"{headers[name]}, {value}"
        received = headers.copy()
        headers["http_method"] = request.method
        headers["http_path"] = request.path
        headers["http_query"] = request.query
        exchange = Exchange(
            Message(body, headers),
            ExchangePattern.IN_OUT,
            properties={"request_id": request.request_id},
        )
        await consumer.processor(exchange)
        return _response(exchange, received)

    def on_response(self, exchange: HttpExchange, status: int, headers: Headers) -> None:
        pass

    def on_complete(self, exchange: HttpExchange) -> None:
        pass


def _response(exchange: Exchange, received: dict[str, Any]) -> Response:
    failure = exchange.exception or exchange.properties.get("exception_caught")
    if failure is not None:
        status = next((s for cls, s in _STATUS_BY_ERROR if isinstance(failure, cls)), 500)
        detail = str(failure) if status < 500 or isinstance(failure, IntegrationError) else ""
        return problem(status, _TITLES.get(status, "Error"), detail or "the route failed")
    message = exchange.message
    # The message's headers, but those of the request it still carries unchanged, the
    # component's own and the connection's; one field per name, the last value winning.
    fields: dict[bytes, bytes] = {}
    for name, value in message.headers.items():
        if received.get(name) == value:
            continue
        lowered = name.lower()
        if lowered in _HOP or lowered.startswith(_INTERNAL):
            continue
        if isinstance(value, str | int | float) and type(value) is not bool:
            text = str(value)
            try:
                if "\r" in text or "\n" in text or not _is_token(lowered):
                    raise ValueError
                fields[lowered.encode("latin-1")] = text.encode("latin-1")
            except ValueError:  # UnicodeEncodeError too: HTTP field values are latin-1
                detail = f"the reply header {name!r} is not a valid HTTP field"
                return problem(500, "Internal Server Error", detail)
    try:
        body = message.body_bytes()
    except (TypeError, ValueError) as exc:
        return problem(500, "Internal Server Error", f"the reply body cannot be sent: {exc}")
    if b"content-type" not in fields:
        content_type = message.headers.get("content-type") or _content_type(message.body)
        fields[b"content-type"] = str(content_type).encode("latin-1")
    status = message.headers.get("http_response_code", 200 if body else 204)
    if not isinstance(status, int) or not 200 <= status <= 599:
        status = 200
    return Response(status, body, Headers(fields.items()))


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
_TOKENS: set[str] = set()


def _is_token(name: str) -> bool:
    """Whether ``name`` (lowercase) may be an HTTP field name; the good ones are remembered."""
    if name in _TOKENS:
        return True
    if _TOKEN.fullmatch(name) is None:
        return False
    if len(_TOKENS) < 1024:
        _TOKENS.add(name)
    return True


_TITLES = {
    400: "Bad Request",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


def _content_type(body: Any) -> str:
    if isinstance(body, bytes | bytearray | type(None)):
        return "application/octet-stream"
    if isinstance(body, str):
        return "text/plain; charset=utf-8"
    return "application/json"


class _ClientEndpoint(Endpoint):
    """``http://host:port/path?options``: options it knows are taken, the rest is the query."""

    def __init__(self, uri: EndpointUri, context: IntegrationContext, component: HttpComponent):
        super().__init__(uri, context)
        self.component = component
        authority, slash, path = uri.path[2:].partition("/")
        host, colon, port = authority.rpartition(":")
        if not colon or not port.isdigit():
            host, port = authority, "80"
        if not host or not 0 < int(port) < 65536:
            raise EndpointError(f"{uri.text}: write http://host:port/path")
        self.host, self.port = host.strip("[]"), int(port)
        options = Options(uri)
        method = options.text("method")
        if method is not None and method.upper() not in METHODS:
            raise EndpointError(f"{uri.text}: option 'method' must be one of {', '.join(METHODS)}")
        self.method = method.upper() if method else None
        self.connect_timeout = options.duration("connect_timeout", 5.0)
        self.response_timeout = options.duration("response_timeout", 30.0)
        self.throw_on_failure = options.boolean("throw_on_failure", True)
        query = urlencode(options.remaining())
        self.target = (slash + path or "/") + (f"?{query}" if query else "")
        authority_header = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (
            authority_header if self.port == 80 else f"{authority_header}:{self.port}"
        )

    def create_producer(self) -> Producer:
        return _HttpProducer(self)


class _HttpProducer(Producer):
    endpoint: _ClientEndpoint

    async def process(self, exchange: Exchange) -> None:
        endpoint = self.endpoint
        message = exchange.message
        body = message.body_bytes()
        method = endpoint.method or str(
            message.headers.get("http_method_out") or ("POST" if body else "GET")
        )
        head = [f"{method} {endpoint.target} HTTP/1.1", f"host: {endpoint.host_header}"]
        for name, value in message.headers.items():
            lowered = name.lower()
            if lowered in _HOP or lowered.startswith(_INTERNAL):
                continue
            if isinstance(value, str | int | float) and not isinstance(value, bool):
                text = str(value)
                if "\r" in text or "\n" in text:
                    raise PayloadError(f"header {name!r} holds a line break; refused")
                head.append(f"{lowered}: {text}")
        if body and "content-type" not in {k.lower() for k in message.headers}:
            head.append(f"content-type: {_content_type(message.body)}")
        head.append(f"content-length: {len(body)}")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        pool = endpoint.component.pool(
            endpoint.host, endpoint.port, endpoint.connect_timeout, endpoint.response_timeout
        )
        status, headers, reply = await self._exchange(pool, data, method == "HEAD")
        if status >= 300 and endpoint.throw_on_failure:
            raise HttpOperationFailed(f"{method} {endpoint.uri.text}", status, reply)
        out: dict[str, Any] = {}
        for raw_name, raw_value in headers:
            key = raw_name.decode("latin-1")
            text = raw_value.decode("latin-1")
            out[key] = text if key not in out else f"{out[key]}, {text}"
        out["http_response_code"] = status
        exchange.message = Message(reply, out)

    async def _exchange(
        self, pool: UpstreamPool, data: bytes, head_request: bool
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        for attempt in range(2):
            conn = pool.take_idle()
            reused = conn is not None
            if conn is None:
                try:
                    conn = await pool.connect()
                except UpstreamError as exc:
                    raise IntegrationError(f"{self.endpoint.uri.text}: {exc}") from None
            sink = _Reply(asyncio.get_running_loop())
            conn.begin(sink, head_request)
            conn.write(data)
            try:
                await asyncio.wait_for(asyncio.shield(sink.done), self.endpoint.response_timeout)
            except TimeoutError:
                conn.abort()
                raise IntegrationError(
                    f"{self.endpoint.uri.text}: no response within"
                    f" {self.endpoint.response_timeout}s"
                ) from None
            except UpstreamError as exc:
                conn.abort()
                # A pooled connection the service had closed: one retry on a new one.
                if reused and attempt == 0 and not sink.status:
                    continue
                raise IntegrationError(f"{self.endpoint.uri.text}: {exc}") from None
            if sink.keep_alive and not conn.closed:
                pool.release(conn)
            else:
                conn.close()
            return sink.status, sink.headers, b"".join(sink.chunks)
        raise AssertionError("unreachable")


class _Reply:
    """Collects one response from an upstream connection (the engine's Sink protocol)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done: asyncio.Future[None] = loop.create_future()
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self.chunks: list[bytes] = []
        self.size = 0

    def upstream_head(
        self, status: int, headers: list[tuple[bytes, bytes]], framing: int, keep_alive: bool
    ) -> None:
        self.status, self.headers, self.keep_alive = status, headers, keep_alive

    def upstream_body(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_RESPONSE_BODY:
            self.upstream_lost(UpstreamError(f"response body over {MAX_RESPONSE_BODY} bytes"))
            return
        self.chunks.append(data)

    def upstream_flush(self) -> None:
        pass

    def upstream_done(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def upstream_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or UpstreamError("upstream closed the connection"))

    def upstream_pause(self) -> None:
        pass

    def upstream_resume(self) -> None:
        pass

    def upstream_switched(
        self, headers: list[tuple[bytes, bytes]], protocol: bytes, rest: bytes
    ) -> None:
        raise AssertionError("the http producer never asks for an upgrade")
