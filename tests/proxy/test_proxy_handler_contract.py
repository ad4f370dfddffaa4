"""The Handler contract, with the engine alone: ``handle`` may answer directly or through
an awaitable, ``on_complete`` runs exactly once per exchange, and a response leaves in
one write. A real server on loopback, in a thread of this process, in front of the
recording upstream."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field

import pytest
import uvloop
from proxy_helpers import RawClient, RecordingUpstream, get

from meshgate.proxy import Exchange, Headers, Response, Server, ServerSettings, UpstreamPool
from meshgate.proxy._server import HttpProtocol
from meshgate.proxy._upstream import UpstreamConnection

GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class ContractHandler:
    """Answers by path: ``/sync/...`` and ``/async/...`` locally, ``/up/...`` and
    ``/up-async/...`` by forwarding, ``/future/...`` through a plain future,
    ``/raise/...`` and ``/raise-async/...`` by failing."""

    loop: asyncio.AbstractEventLoop
    pool: UpstreamPool
    dead: UpstreamPool
    completed: list[tuple[str, int, str | None]] = field(default_factory=list)

    def handle(self, exchange: Exchange) -> Response | None | Awaitable[Response | None]:
        path = exchange.request.path
        kind = path.split("/")[1]
        if kind == "sync":
            return Response(200, b"sync " + path.encode())
        if kind == "up":
            return self._forward(exchange, self.pool)
        if kind == "dead":
            return self._forward(exchange, self.dead)
        if kind == "raise":
            raise RuntimeError("handler bug")
        if kind == "future":
            future: asyncio.Future[Response | None] = self.loop.create_future()
            self.loop.call_later(0.01, future.set_result, Response(200, b"future"))
            return future
        return self._later(exchange, kind)

    async def _later(self, exchange: Exchange, kind: str) -> Response | None:
        await asyncio.sleep(0.2 if kind == "slow" else 0)
        if kind == "raise-async":
            raise RuntimeError("handler bug")
        if kind == "up-async":
            return self._forward(exchange, self.pool)
        return Response(200, b"async " + exchange.request.path.encode())

    def _forward(self, exchange: Exchange, pool: UpstreamPool) -> None:
        exchange.upstream = pool
        exchange.upstream_target = exchange.request.path
        return None

    def on_response(self, exchange: Exchange, status: int, headers: Headers) -> None:
        headers.add("x-phase", "response")

    def on_complete(self, exchange: Exchange) -> None:
        self.completed.append((exchange.request.path, exchange.status, exchange.error))

    def completions(self, path: str) -> list[tuple[str, int, str | None]]:
        return [c for c in list(self.completed) if c[0] == path]


@dataclass
class Engine:
    port: int
    handler: ContractHandler
    recorder: RecordingUpstream


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    recorder = RecordingUpstream()
    loop = uvloop.new_event_loop()
    pool = UpstreamPool("127.0.0.1", recorder.port, loop=loop)
    dead = UpstreamPool("127.0.0.1", _free_port(), loop=loop)
    handler = ContractHandler(loop, pool, dead)
    server = Server(handler, ServerSettings(), loop=loop)
    port = _free_port()
    loop.run_until_complete(server.start("127.0.0.1", port))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield Engine(port, handler, recorder)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    recorder.close()


def _wait_completed(engine: Engine, path: str, count: int = 1) -> list[tuple[str, int, str | None]]:
    for _ in range(200):
        done = engine.handler.completions(path)
        if len(done) >= count:
            return done
        threading.Event().wait(0.01)
    return engine.handler.completions(path)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/sync/a", b"sync /sync/a"),
        ("/async/b", b"async /async/b"),
        ("/future/c", b"future"),
    ],
)
def test_local_answer_directly_or_through_an_awaitable(engine, path, body):
    with RawClient(engine.port) as client:
        for _ in range(3):
            reply = client.exchange(get(path))
            assert (reply.status, reply.body) == (200, body)
            assert reply.get("x-phase") == "response"
            assert reply.get("content-length") == str(len(body))
            assert GENERATED_ID.match(reply.get("x-request-id") or "")
    assert _wait_completed(engine, path, 3) == [(path, 200, None)] * 3


@pytest.mark.parametrize("path", ["/up/direct", "/up-async/awaited"])
def test_forwarding_decided_directly_or_through_an_awaitable(engine, path):
    with RawClient(engine.port) as client:
        for _ in range(3):
            reply = client.exchange(get(path))
            assert reply.status == 200
            assert reply.json()["target"] == path
            assert reply.get("x-phase") == "response"
    seen = engine.recorder.requests_for(path)
    assert len(seen) == 3
    assert len({r.connection for r in seen}) == 1, "the upstream connection is reused"
    assert _wait_completed(engine, path, 3) == [(path, 200, None)] * 3


@pytest.mark.parametrize("path", ["/raise/x", "/raise-async/y"])
def test_handler_failure_is_500_and_the_connection_stays_usable(engine, path):
    with RawClient(engine.port) as client:
        reply = client.exchange(get(path))
        assert reply.status == 500
        assert reply.get("content-type") == "application/problem+json"
        assert client.exchange(get("/sync/after-failure")).status == 200
    assert _wait_completed(engine, path) == [(path, 500, None)]


def test_many_pipelined_local_answers_come_back_in_order(engine):
    """Each answer starts the next request: in a loop, never by recursion."""
    count = 3000
    with RawClient(engine.port, timeout=30) as client:
        client.send(b"".join(get(f"/sync/pipe-{i}") for i in range(count)))
        for i in range(count):
            reply = client.read_response()
            assert (reply.status, reply.body) == (200, f"sync /sync/pipe-{i}".encode())
        assert client.exchange(get("/up/after-pipeline")).status == 200


def test_on_complete_runs_once_when_the_upstream_cannot_be_reached(engine):
    with RawClient(engine.port) as client:
        reply = client.exchange(get("/dead/nobody"))
        assert reply.status == 502
        assert client.exchange(get("/sync/after-dead")).status == 200
    ((path, status, error),) = _wait_completed(engine, "/dead/nobody")
    assert status == 502
    assert error is not None and "cannot connect" in error


def test_on_complete_runs_once_after_the_handler_when_the_client_left(engine):
    sock = socket.create_connection(("127.0.0.1", engine.port))
    sock.sendall(get("/slow/gone"))
    threading.Event().wait(0.05)  # the handler is running
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # RST: gone, not half-closed
    done = _wait_completed(engine, "/slow/gone")
    threading.Event().wait(0.3)  # nothing else may follow
    assert engine.handler.completions("/slow/gone") == done
    assert done == [("/slow/gone", 0, "client closed the connection")]


def test_generated_request_ids_are_unique(engine):
    with RawClient(engine.port) as client:
        ids = [client.exchange(get(f"/sync/id-{i}")).get("x-request-id") for i in range(300)]
    assert len(set(ids)) == 300
    assert all(GENERATED_ID.match(i or "") for i in ids)


class _Transport(asyncio.Transport):
    """Counts writes; a write is one syscall on a real socket."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def writelines(self, list_of_data: object) -> None:
        self.writes.append(b"".join(list_of_data))  # type: ignore[arg-type]

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def test_a_proxied_exchange_costs_one_write_each_way():
    """Request head upstream in one write; response head and body back in one write."""
    loop = uvloop.new_event_loop()
    try:
        pool = UpstreamPool("127.0.0.1", 9, loop=loop)
        handler = ContractHandler(loop, pool, pool)
        protocol = HttpProtocol(Server(handler, ServerSettings(), loop=loop))
        client = _Transport()
        protocol.connection_made(client)
        upstream = UpstreamConnection(pool)
        wire = _Transport()
        upstream.connection_made(wire)
        pool.release(upstream)
        response = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello"
        for i in range(3):
            protocol.data_received(get(f"/up/one-write-{i}"))
            assert len(wire.writes) == i + 1
            assert wire.writes[-1].startswith(f"GET /up/one-write-{i} HTTP/1.1\r\n".encode())
            upstream.data_received(response)
            assert len(client.writes) == i + 1
            head, _, body = client.writes[-1].partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"\r\nconnection:" not in head.lower()
            assert body == b"hello"
        assert [c[1] for c in handler.completed] == [200, 200, 200]
    finally:
        loop.close()
