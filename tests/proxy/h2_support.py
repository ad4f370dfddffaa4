"""HTTP/2 tools for the engine's tests: a raw client, an engine in a thread, a certificate.

- :class:`H2Client` speaks HTTP/2 over a plain (or TLS) socket with the ``h2`` library
  as its protocol core, so a test decides every frame: when to end a stream, when to
  reset it, whether to acknowledge received data (a slow reader does not).
  :meth:`H2Client.send_raw` writes bytes h2 would never write (invalid frames, floods).
- :class:`EngineThread` runs an event loop in a thread, for servers and pools of the
  engine started in this process.
- :func:`localhost_certificate` writes a CA and a certificate for ``localhost`` / 127.0.0.1.
- :func:`running_engine` starts the engine under test: a server whose handler answers
  by path (:class:`StreamHandler`), the recording upstream, and a second engine server
  as an h2c origin that echoes what it receives (:class:`OriginHandler`).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import uvloop
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.settings import SettingCodes
from proxy_helpers import RecordingUpstream

from meshgate.demo.tls import demo_certificates
from meshgate.proxy import (
    Exchange,
    H2UpstreamPool,
    Headers,
    Response,
    Server,
    ServerSettings,
    UpstreamPool,
    problem,
)
from meshgate.proxy._h2conn import GracefulStates
from meshgate.proxy._http2 import serve_h2

T = TypeVar("T")


@dataclass
class H2Response:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    ended: bool = False
    reset: ErrorCodes | None = None

    def get(self, name: str) -> str | None:
        key = name.encode()
        for k, v in self.headers:
            if k == key:
                return v.decode("latin-1")
        return None

    def trailer(self, name: str) -> str | None:
        key = name.encode()
        for k, v in self.trailers:
            if k == key:
                return v.decode("latin-1")
        return None

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None


class H2Client:
    """One HTTP/2 client connection; responses are gathered per stream as frames arrive."""

    def __init__(
        self,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        acknowledge: bool = True,
        settings: dict[int, int] | None = None,
        timeout: float = 10.0,
    ) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="localhost")
        self.sock = sock
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        # After the server's GOAWAY the streams it covers still finish (h2 would end them).
        self.conn.state_machine = GracefulStates()
        if settings:
            self.conn.local_settings.update(settings)
        self.conn.initiate_connection()
        self.acknowledge = acknowledge
        self.responses: dict[int, H2Response] = {}
        self.goaway: ConnectionTerminated | None = None
        self.closed = False
        self.received = 0  # DATA bytes received, acknowledged or not
        self.unacknowledged: list[tuple[int, int]] = []
        # Request bodies waiting for window: stream -> (bytes left, end the stream after).
        self.pending: dict[int, tuple[bytes, bool]] = {}
        self.flush()

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self,
        path: str,
        method: str = "GET",
        headers: list[tuple[str, str]] | None = None,
        body: bytes | None = None,
        end: bool = True,
        authority: str = "gw.test",
    ) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        fields = [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
        ]
        fields += [(k.lower().encode(), v.encode()) for k, v in headers or []]
        self.responses[stream_id] = H2Response()
        self.conn.send_headers(stream_id, fields, end_stream=end and not body)
        if body:
            sent = self.send_body(stream_id, body, end=end)
            if sent < len(body):
                self.pending[stream_id] = (body[sent:], end)  # sent as windows open
        self.flush()
        return stream_id

    def send_body(self, stream_id: int, body: bytes, end: bool = True) -> int:
        """Send as much of ``body`` as the windows admit now; the count sent."""
        sent = 0
        while sent < len(body):
            room = min(
                self.conn.local_flow_control_window(stream_id),
                self.conn.max_outbound_frame_size,
                len(body) - sent,
            )
            if room <= 0:
                break
            self.conn.send_data(stream_id, body[sent : sent + room])
            sent += room
        if end and sent == len(body):
            self.conn.end_stream(stream_id)
        self.flush()
        return sent

    def reset(self, stream_id: int, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        self.conn.reset_stream(stream_id, code)
        self.flush()

    def pump(self, timeout: float = 5.0) -> bool:
        """Read once and handle what arrived; False when the server closed the connection."""
        if self.closed:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return True
        except (ConnectionResetError, ssl.SSLError, OSError):
            data = b""
        if not data:
            self.closed = True
            return False
        for event in self.conn.receive_data(data):
            self._event(event)
        for stream_id, (left, end) in list(self.pending.items()):
            if self.responses[stream_id].done:
                del self.pending[stream_id]
                continue
            sent = self.send_body(stream_id, left, end=end)
            if sent == len(left):
                del self.pending[stream_id]
            else:
                self.pending[stream_id] = (left[sent:], end)
        self.flush()
        return True

    def _event(self, event: Any) -> None:
        if isinstance(event, ResponseReceived):
            response = self.responses.setdefault(event.stream_id, H2Response())
            for name, value in event.headers:
                if name == b":status":
                    response.status = int(value)
                else:
                    response.headers.append((name, value))
        elif isinstance(event, DataReceived):
            self.responses.setdefault(event.stream_id, H2Response()).body += event.data
            self.received += len(event.data)
            if self.acknowledge:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                self.unacknowledged.append((event.flow_controlled_length, event.stream_id))
        elif isinstance(event, TrailersReceived):
            self.responses.setdefault(event.stream_id, H2Response()).trailers += event.headers
        elif isinstance(event, StreamEnded):
            self.responses.setdefault(event.stream_id, H2Response()).ended = True
        elif isinstance(event, StreamReset):
            self.responses.setdefault(event.stream_id, H2Response()).reset = event.error_code
        elif isinstance(event, ConnectionTerminated):
            self.goaway = event

    def acknowledge_all(self) -> None:
        """A slow reader catches up: hand back every window it held."""
        self.acknowledge = True
        for size, stream_id in self.unacknowledged:
            self.conn.acknowledge_received_data(size, stream_id)
        self.unacknowledged.clear()
        self.flush()

    def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0 or not self.pump(min(left, 0.5)):
                return predicate()
        return True

    def response(self, stream_id: int, timeout: float = 10.0) -> H2Response:
        response = self.responses[stream_id]
        assert self.wait(lambda: response.done, timeout), f"stream {stream_id}: {response}"
        return response

    def closed_within(self, timeout: float) -> bool:
        """True when the server closes the connection within ``timeout``."""
        self.wait(lambda: self.closed, timeout)
        return self.closed


def window_settings(size: int) -> dict[int, int]:
    return {SettingCodes.INITIAL_WINDOW_SIZE: size}


class EngineThread:
    """An event loop running in a thread; servers and pools live on it."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        async def call() -> T:
            return fn()

        return self.run(call(), timeout)

    def stop(self) -> None:
        """Cancel what still runs (handlers sleeping on), stop and close the loop, and
        collect its garbage now rather than in a later test."""

        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()
        gc.collect()


def localhost_certificate(directory: Path) -> tuple[str, str, str]:
    """The CA, certificate and key files of a certificate for localhost and 127.0.0.1."""
    made = demo_certificates(directory)
    return str(made.ca), str(made.cert), str(made.key)


# The engine under test

SETTINGS = dict(
    header_timeout=1.0,
    idle_timeout=3.0,
    body_timeout=1.0,
    max_header_size=4096,
    max_concurrent_streams=8,
)


@dataclass
class StreamHandler:
    """Answers by the first path segment: ``local``, ``info`` (the request as seen),
    ``read`` (reads the body first), ``slow`` (after a pause), ``deny/<status>``,
    ``raise``; forwards ``up`` (HTTP/1.1), ``h2up`` (h2c origin), ``dead``, ``small``
    (forwarding with max_body_size 1000)."""

    pools: dict[str, Any]
    completed: list[tuple[str, int, str | None]] = field(default_factory=list)
    handled: int = 0

    def handle(self, exchange: Exchange) -> Response | None | Awaitable[Response | None]:
        self.handled += 1
        request = exchange.request
        kind = request.path.split("/")[1]
        if kind == "local":
            return Response(200, b"local " + request.path.encode(), content_type="text/plain")
        if kind == "info":
            return Response(200, json.dumps(_info(exchange)).encode())
        if kind == "deny":
            status = int(request.path.split("/")[2])
            refusal = problem(status, "Refused", f"refused with {status}")
            refusal.headers.set("retry-after", "7")
            return refusal
        if kind == "raise":
            raise RuntimeError("handler bug")
        if kind in ("read", "slow"):
            return self._later(exchange, kind)
        if kind == "small":
            exchange.max_body_size = 1000
            kind = "up"
        exchange.upstream = self.pools[kind]
        exchange.upstream_target = request.path + (f"?{request.query}" if request.query else "")
        return None

    async def _later(self, exchange: Exchange, kind: str) -> Response:
        if kind == "slow":
            await asyncio.sleep(float(exchange.request.path.split("/")[2]))
            return Response(200, b"slow")
        body = await exchange.read_body()
        doc = {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        return Response(200, json.dumps(doc).encode())

    def on_response(self, exchange: Exchange, status: int, headers: Headers) -> None:
        headers.add("x-phase", "response")

    def on_complete(self, exchange: Exchange) -> None:
        self.completed.append((exchange.request.path, exchange.status, exchange.error))

    def completions(self, path: str) -> list[tuple[str, int, str | None]]:
        return [c for c in list(self.completed) if c[0] == path]


def _info(exchange: Exchange) -> dict[str, Any]:
    request = exchange.request
    return {
        "method": request.method,
        "path": request.path,
        "query": request.query,
        "host": request.host,
        "scheme": request.scheme,
        "http_version": request.http_version,
        "alpn": request.tls.alpn if request.tls is not None else None,
        "headers": [[k.decode(), v.decode()] for k, v in request.headers.raw()],
        "content_length": request.content_length,
        "has_body": request.has_body,
    }


class OriginHandler:
    """An h2c origin: echoes the request (method, path, fields, body digest) as JSON."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def handle(self, exchange: Exchange) -> Response:
        body = await exchange.read_body()
        doc = _info(exchange)
        doc["length"] = len(body)
        doc["sha256"] = hashlib.sha256(body).hexdigest()
        self.requests.append(doc)
        return Response(200, json.dumps(doc).encode(), content_type="application/json")

    def on_response(self, exchange: Exchange, status: int, headers: Headers) -> None:
        pass

    def on_complete(self, exchange: Exchange) -> None:
        pass


@dataclass
class Engine:
    thread: EngineThread
    server: Server
    port: int
    handler: StreamHandler
    recorder: RecordingUpstream
    origin: OriginHandler
    origin_connections: list[int]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def assert_serving(self) -> None:
        with H2Client(self.port) as client:
            response = client.response(client.request("/local/still-serving"))
            assert (response.status, bytes(response.body)) == (200, b"local /local/still-serving")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _counting(connections: list[int]) -> Any:
    def serve(server: Server, transport: asyncio.Transport, initial: bytes) -> None:
        connections.append(1)
        serve_h2(server, transport, initial)

    return serve


@contextmanager
def running_engine(**settings: Any) -> Iterator[Engine]:
    """The engine under test on loopback, with the recording upstream and an h2c origin."""
    thread = EngineThread()
    recorder = RecordingUpstream()
    origin_handler = OriginHandler()
    origin_connections: list[int] = []

    async def start() -> tuple[Server, Server, StreamHandler]:
        loop = thread.loop
        origin = Server(origin_handler, ServerSettings(), loop=loop)
        origin.h2 = _counting(origin_connections)
        await origin.start("127.0.0.1", 0)
        pools = {
            "up": UpstreamPool("127.0.0.1", recorder.port, loop=loop, response_timeout=5.0),
            "dead": UpstreamPool("127.0.0.1", _free_port(), loop=loop),
            "h2up": H2UpstreamPool("127.0.0.1", origin.port, loop=loop),
        }
        handler = StreamHandler(pools)
        server = Server(handler, ServerSettings(**{**SETTINGS, **settings}), loop=loop)
        await server.start("127.0.0.1", 0)
        return server, origin, handler

    server, origin, handler = thread.run(start())
    try:
        yield Engine(
            thread, server, server.port, handler, recorder, origin_handler, origin_connections
        )
    finally:
        thread.run(server.shutdown(1.0))
        thread.run(origin.shutdown(1.0))
        thread.stop()
        recorder.close()
