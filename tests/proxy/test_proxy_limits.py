"""Size limits: 431 for a request head over max_header_size, 413 for a body over the
product's max_body_size, whether announced by Content-Length or found mid-stream."""

from __future__ import annotations

import socket
import threading
import time

from harness import rss_kib
from proxy_helpers import HEADER_LIMIT, SMALL_LIMIT, RawClient, chunked, get, request


def test_header_over_the_limit_is_431(proxy_env):
    for name, extra in {
        "one-big": [f"X-Big: {'b' * HEADER_LIMIT}"],
        "many-small": [f"X-Small-{i}: {'s' * 40}" for i in range(HEADER_LIMIT // 40)],
    }.items():
        with RawClient(proxy_env.port) as client:
            reply = client.exchange(get(f"/rec/head-{name}", *extra))
            assert reply.status == 431, name
            assert reply.get("content-type") == "application/problem+json"
            assert reply.get("connection") == "close"
            assert client.closed()
        assert proxy_env.recorder.requests_for(f"/head-{name}") == []
    # Just under the limit passes.
    reply = request(proxy_env.port, get("/rec/head-fits", f"X-Fits: {'f' * (HEADER_LIMIT // 2)}"))
    assert reply.status == 200


def test_endless_header_is_cut_at_the_limit_not_buffered(proxy_env):
    """A header line that never ends must not make the gateway buffer it."""
    pid = proxy_env.gateway.proc.pid
    before = rss_kib(pid)
    block = b"e" * 65536
    sent = 0
    with RawClient(proxy_env.port) as client:
        client.send(b"GET /rec/endless HTTP/1.1\r\nHost: gw.test\r\nX-Endless: ")
        try:
            while sent < 256 * 1024 * 1024:
                client.send(block)
                sent += len(block)
        except (BrokenPipeError, ConnectionResetError):
            pass
        grown = rss_kib(pid) - before
    assert sent < 8 * 1024 * 1024, f"the gateway swallowed {sent} bytes of one header"
    assert grown < 32 * 1024, f"RSS grew by {grown} KiB"
    proxy_env.assert_serving()


def test_content_length_over_the_limit_is_413_and_not_forwarded(proxy_env):
    with RawClient(proxy_env.port) as client:
        client.send(
            b"POST /small/too-big HTTP/1.1\r\nHost: gw.test\r\nContent-Length: %d\r\n"
            b"Expect: 100-continue\r\n\r\n" % (SMALL_LIMIT + 1)
        )
        reply = client.read_response(interim=True)
        assert reply.status == 413
        assert reply.get("content-type") == "application/problem+json"
        assert reply.get("connection") == "close"
        assert client.closed()
    assert proxy_env.recorder.requests_for("/too-big") == []


def test_body_at_the_limit_passes(proxy_env):
    body = b"L" * SMALL_LIMIT
    head = b"POST /small/at-limit HTTP/1.1\r\nHost: gw.test\r\nContent-Length: %d\r\n\r\n"
    assert request(proxy_env.port, head % len(body) + body).json()["length"] == SMALL_LIMIT
    chunked_head = b"POST /small/at-limit-chunked HTTP/1.1\r\nHost: gw.test\r\n"
    chunked_head += b"Transfer-Encoding: chunked\r\n\r\n"
    reply = request(proxy_env.port, chunked_head + chunked(body[:1000], body[1000:]))
    assert reply.json()["length"] == SMALL_LIMIT


def test_chunked_body_over_the_limit_in_one_send_is_413_and_not_forwarded(proxy_env):
    body = b"o" * (SMALL_LIMIT + 1)
    head = (
        b"POST /small/over-at-once HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    reply = request(proxy_env.port, head + chunked(body))
    assert reply.status == 413
    assert proxy_env.recorder.requests_for("/over-at-once") == []


def test_body_over_the_limit_while_connecting_upstream_is_413(proxy_env):
    """The limit is crossed while the gateway still waits for the upstream connection."""
    head = b"POST /blackhole/x HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    with RawClient(proxy_env.port) as client:
        client.send(head + chunked(b"a" * 100)[:-5])
        time.sleep(0.1)
        client.send(chunked(b"b" * SMALL_LIMIT)[:-5])
        reply = client.read_response()
        assert reply.status == 413
        assert reply.get("connection") == "close"


def test_chunked_body_crossing_the_limit_mid_stream_is_413(proxy_env):
    """The upstream may have seen the start of the request, never a complete one."""
    piece = b"m" * 2048
    head = (
        b"POST /small/over-streamed HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    with RawClient(proxy_env.port) as client:
        client.send(head)
        stop = threading.Event()

        def feed() -> None:
            try:
                for _ in range(64):
                    if stop.is_set():
                        return
                    client.send(chunked(piece)[:-5])
                    time.sleep(0.01)
                client.send(b"0\r\n\r\n")
            except OSError:
                pass

        feeder = threading.Thread(target=feed)
        feeder.start()
        try:
            reply = client.read_response()
        finally:
            stop.set()
            feeder.join()
        assert reply.status == 413
        assert reply.get("connection") == "close"
    time.sleep(0.2)
    seen = proxy_env.recorder.requests_for("/over-streamed")
    assert all(not r.complete for r in seen), seen
    assert all(len(r.body) <= SMALL_LIMIT + 2048 for r in seen)
    proxy_env.assert_serving()


def test_413_connection_is_closed_cleanly(proxy_env):
    """The 413 arrives even though the client is still sending (lingering close)."""
    head = b"POST /small/linger HTTP/1.1\r\nHost: gw.test\r\nContent-Length: %d\r\n\r\n"
    size = 4 * 1024 * 1024
    sock = socket.create_connection(("127.0.0.1", proxy_env.port), timeout=5)
    with sock:
        sock.sendall(head % size)
        try:
            sock.sendall(b"z" * size)
        except OSError:
            pass
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 413 ")
