"""Protocol upgrades through the gateway: a WebSocket is authenticated and counted once, then
tunnelled with back pressure both ways and an idle timeout; refusals and hostile upgrades."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_e2e_support import TIMEOUT, usage, wait_for
from harness import example_product, gateway_config, rss_kib, run_gateway
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import InvalidStatus

LIMITS = [{"name": "basic", "limits": [{"metric": "hits", "period": "eternity", "value": 10**9}]}]


class WsUpstream:
    """A real WebSocket server on loopback: ``/echo`` echoes, ``/flood?n=`` sends n MiB."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.handshakes: list[dict[str, str]] = []
        self._ready = threading.Event()
        self._stop: asyncio.Future[None] | None = None
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self._run(),))

    async def _handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.handshakes.append({k.lower(): v for k, v in ws.request.headers.raw_items()})
        path = ws.request.path
        if path.startswith("/flood"):
            mib = int(path.rpartition("=")[2])
            block = b"f" * (1 << 20)
            for _ in range(mib):
                await ws.send(block)
            await ws.close()
            return
        async for message in ws:
            await ws.send(message)

    async def _run(self) -> None:
        self._stop = self.loop.create_future()
        async with serve(self._handler, "127.0.0.1", 0, max_size=None) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            self._ready.set()
            await self._stop

    def __enter__(self) -> WsUpstream:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(10)


def ws_product(port: int, **overrides: Any) -> dict[str, Any]:
    return example_product(port, plans=LIMITS, **overrides)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_websocket_is_authenticated_counted_once_and_echoes(tmp_path: Path) -> None:
    with WsUpstream() as upstream:
        config = gateway_config([ws_product(upstream.port)])
        with run_gateway(config, tmp_path) as gw:
            url = f"ws://127.0.0.1:{gw.port}/echo/chat"

            async def chat() -> list[str]:
                async with connect(url, additional_headers={"X-API-Key": "k1"}) as ws:
                    out = []
                    for i in range(50):
                        await ws.send(f"message {i}")
                        out.append(str(await ws.recv()))
                    return out

            assert run(chat()) == [f"message {i}" for i in range(50)]
            seen = upstream.handshakes[-1]
            assert seen["upgrade"] == "websocket"
            assert seen["x-forwarded-for"] == "127.0.0.1"
            assert "x-request-id" in seen
            # One request counted, however many messages.
            wait_for(lambda: usage(gw, "app1")[("hits", "eternity")]["value"] == 1, what="usage")

            async def refused(headers: dict[str, str]) -> int:
                with pytest.raises(InvalidStatus) as caught:
                    async with connect(url, additional_headers=headers):
                        pass
                return caught.value.response.status_code

            assert run(refused({})) == 401
            assert run(refused({"X-API-Key": "nope"})) == 403
            assert usage(gw, "app1")[("hits", "eternity")]["value"] == 1


def test_websocket_false_refuses_upgrades(tmp_path: Path) -> None:
    with WsUpstream() as upstream:
        config = gateway_config([ws_product(upstream.port, websocket=False)])
        with run_gateway(config, tmp_path) as gw:

            async def attempt() -> Any:
                async with connect(
                    f"ws://127.0.0.1:{gw.port}/echo/chat", additional_headers={"X-API-Key": "k1"}
                ):
                    pass

            with pytest.raises(InvalidStatus) as caught:
                run(attempt())
            response = caught.value.response
            assert response.status_code == 403
            assert b"websocket: false" in response.body
            assert upstream.handshakes == []
            ok = httpx.get(f"{gw.url}/echo/x", headers={"X-API-Key": "k1"}, timeout=TIMEOUT)
            assert ok.status_code in (200, 426)  # a plain request still goes through


def test_100_mb_each_way_with_the_gateway_memory_bounded(tmp_path: Path) -> None:
    with WsUpstream() as upstream:
        config = gateway_config([ws_product(upstream.port)])
        with run_gateway(config, tmp_path) as gw:
            url = f"ws://127.0.0.1:{gw.port}/echo/chat"
            before = rss_kib(gw.proc.pid)
            peak = [before]
            done = threading.Event()

            def watch() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], rss_kib(gw.proc.pid))
                    time.sleep(0.05)

            watcher = threading.Thread(target=watch)
            watcher.start()

            async def pump() -> int:
                block = b"m" * (1 << 20)
                received = 0
                async with connect(
                    url, additional_headers={"X-API-Key": "k1"}, max_size=None
                ) as ws:

                    async def reader() -> None:
                        nonlocal received
                        while received < 100 << 20:
                            received += len(await ws.recv())

                    task = asyncio.create_task(reader())
                    for _ in range(100):
                        await ws.send(block)
                    await asyncio.wait_for(task, 120)
                return received

            try:
                assert run(pump()) == 100 << 20
            finally:
                done.set()
                watcher.join()
            assert peak[0] - before < 32 * 1024, (before, peak[0])

            # A client that reads slowly while the upstream floods it: bounded too.
            async def slow_reader() -> int:
                got = 0
                async with connect(
                    f"ws://127.0.0.1:{gw.port}/echo/flood?n=50",
                    additional_headers={"X-API-Key": "k1"},
                    max_size=None,
                    max_queue=1,
                ) as ws:
                    await asyncio.sleep(2.0)  # the upstream fills every buffer meanwhile
                    async for message in ws:
                        got += len(message)
                return got

            start = rss_kib(gw.proc.pid)
            assert run(slow_reader()) == 50 << 20
            assert rss_kib(gw.proc.pid) - start < 32 * 1024


@contextmanager
def raw_upstream(answer: bytes) -> Iterator[tuple[int, list[bytes]]]:
    """A socket upstream that answers every connection's first request with ``answer`` and
    records everything it received, per connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(3)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    conn.sendall(answer)
                    while chunk := conn.recv(65536):
                        data += chunk
                except OSError:
                    pass
                received.append(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], received
    finally:
        listener.close()


UPGRADE = (
    b"GET /echo/ws HTTP/1.1\r\nHost: x\r\nX-API-Key: k1\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def read_all(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def test_an_upstream_that_refuses_the_upgrade_never_sees_the_bytes_after_it(
    tmp_path: Path,
) -> None:
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nno"
    with raw_upstream(answer) as (port, received):
        config = gateway_config([ws_product(port)])
        with run_gateway(config, tmp_path) as gw:
            smuggled = b"GET /echo/admin HTTP/1.1\r\nHost: x\r\n\r\n"
            with socket.create_connection(("127.0.0.1", gw.port)) as sock:
                sock.sendall(UPGRADE + smuggled)
                reply = read_all(sock)
            assert reply.startswith(b"HTTP/1.1 200 OK")
            assert reply.count(b"HTTP/1.1") == 1
            wait_for(lambda: len(received) == 1, what="the upstream's connection to end")
            assert b"/echo/admin" not in received[0]
            assert b"upgrade: websocket" in received[0].lower()


def test_a_101_nobody_asked_for_is_a_502(tmp_path: Path) -> None:
    answer = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\nraw"
    with raw_upstream(answer) as (port, _):
        config = gateway_config([ws_product(port)])
        with run_gateway(config, tmp_path) as gw:
            r = httpx.get(f"{gw.url}/echo/plain", headers={"X-API-Key": "k1"}, timeout=TIMEOUT)
            assert r.status_code == 502
            assert "101" in r.json()["detail"]


def test_invalid_upgrades_are_refused(tmp_path: Path) -> None:
    with WsUpstream() as upstream:
        config = gateway_config([ws_product(upstream.port)])
        with run_gateway(config, tmp_path) as gw:
            with_body = UPGRADE.replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\nhello")
            for bad in (with_body, UPGRADE.replace(b"HTTP/1.1", b"HTTP/1.0")):
                with socket.create_connection(("127.0.0.1", gw.port)) as sock:
                    sock.sendall(bad)
                    reply = read_all(sock)
                assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
            connect_ = b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n"
            with socket.create_connection(("127.0.0.1", gw.port)) as sock:
                sock.sendall(connect_)
                reply = read_all(sock)
            assert reply.split(b" ")[1] in (b"400", b"501"), reply[:200]
            assert upstream.handshakes == []


def test_an_idle_tunnel_is_closed(tmp_path: Path) -> None:
    with WsUpstream() as upstream:
        config = gateway_config([ws_product(upstream.port)], timeouts={"tunnel_idle": 1})
        with run_gateway(config, tmp_path) as gw:
            with socket.create_connection(("127.0.0.1", gw.port)) as sock:
                sock.sendall(UPGRADE.replace(b"/echo/ws", b"/echo/chat"))
                started = time.monotonic()
                reply = read_all(sock)
                took = time.monotonic() - started
            assert reply.startswith(b"HTTP/1.1 101"), reply[:200]
            assert b"sec-websocket-accept" in reply.lower()
            assert 0.9 < took < 4.0
            line = wait_for(
                lambda: [e for e in gw.access_log() if e.get("status") == 101], what="log"
            )[0]
            assert "no bytes either way" in line["error"]


def test_open_tunnels_count_against_the_upstream_connection_cap(tmp_path: Path) -> None:
    with WsUpstream() as upstream:
        config = gateway_config([ws_product(upstream.port, max_upstream_connections=1)])
        with run_gateway(config, tmp_path) as gw:
            url = f"ws://127.0.0.1:{gw.port}/echo/chat"

            async def two() -> int:
                async with connect(url, additional_headers={"X-API-Key": "k1"}) as ws:
                    await ws.send("hold")
                    assert await ws.recv() == "hold"
                    with pytest.raises(InvalidStatus) as caught:
                        async with connect(url, additional_headers={"X-API-Key": "k1"}):
                            pass
                    return caught.value.response.status_code

            assert run(two()) == 503

            async def again() -> str:
                async with connect(url, additional_headers={"X-API-Key": "k1"}) as ws:
                    await ws.send("free")
                    return str(await ws.recv())

            # The closed tunnel gave its connection back.
            assert wait_for(lambda: run(again()) == "free", what="a free connection")


def _settled(count: Callable[[], int], quiet: float = 0.3, limit: float = 5.0) -> int:
    """``count()`` once it has not changed for ``quiet`` seconds (or after ``limit``)."""
    deadline = time.monotonic() + limit
    value, since = count(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = count()
        if now != value:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return value


def test_a_tunnel_whose_client_reads_nothing_is_let_go(tmp_path: Path) -> None:
    with WsUpstream() as upstream:
        config = gateway_config([ws_product(upstream.port)], timeouts={"tunnel_idle": 1})
        with run_gateway(config, tmp_path) as gw:
            fds = f"/proc/{gw.proc.pid}/fd"
            # The start-up probes' connections may still be closing: count once it settles,
            # or a probe closing as the tunnel opens hides the tunnel.
            before = _settled(lambda: len(os.listdir(fds)))
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", gw.port))
            try:
                # The upstream floods 30 MiB at once; the client never reads.
                sock.sendall(UPGRADE.replace(b"/echo/ws", b"/echo/flood?n=30"))
                wait_for(lambda: len(os.listdir(fds)) > before, what="the tunnel to open")
                wait_for(
                    lambda: len(os.listdir(fds)) <= before,
                    timeout=15,
                    what="both of the tunnel's sockets to be closed",
                )
            finally:
                sock.close()
