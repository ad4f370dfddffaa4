"""Timeouts as a client sees them: 408 on a slow head, idle connections closed, 502 when
the upstream cannot be reached, 504 when it does not answer in time."""

from __future__ import annotations

import socket
import time

import pytest
from proxy_helpers import Incomplete, RawClient, get, request

# The session gateway: client_header 1.0 s, idle_keepalive 2.0 s; /slow has an upstream
# response timeout of 0.5 s; /blackhole an upstream connect timeout of 0.3 s.


def test_partial_head_gets_408_after_the_header_timeout(proxy_env):
    with RawClient(proxy_env.port) as client:
        start = time.monotonic()
        client.send(b"GET /echo/slowloris HTTP/1.1\r\nHost: gw.test\r\n")
        reply = client.read_response()
        elapsed = time.monotonic() - start
        assert reply.status == 408
        assert reply.get("content-type") == "application/problem+json"
        assert reply.get("connection") == "close"
        assert 0.9 < elapsed < 2.0
        assert client.closed()


def test_trickled_head_does_not_extend_the_header_timeout(proxy_env):
    with RawClient(proxy_env.port) as client:
        start = time.monotonic()
        client.send(b"GET /echo/trickle HTTP/1.1\r\n")
        with pytest.raises((BrokenPipeError, ConnectionResetError)):  # noqa: PT012
            for i in range(30):
                client.send(f"X-Drip-{i}: {i}\r\n".encode())
                time.sleep(0.1)
        assert time.monotonic() - start < 2.0
        assert client.read_response().status == 408


def test_partial_head_behind_a_request_gets_408_not_the_idle_timeout(proxy_env):
    with RawClient(proxy_env.port) as client:
        client.send(get("/echo/delay/0.2") + b"GET /echo/next HTTP/1.1\r\nHost: gw")
        assert client.read_response().status == 200
        start = time.monotonic()
        assert client.read_response().status == 408
        assert time.monotonic() - start < 1.5
        assert client.closed()


def test_connection_that_never_sends_gets_408(proxy_env):
    with RawClient(proxy_env.port) as client:
        assert client.read_response().status == 408


def test_idle_keepalive_connection_is_closed_silently(proxy_env):
    with RawClient(proxy_env.port) as client:
        assert client.exchange(get("/echo/idle-1")).status == 200
        time.sleep(1.0)
        assert client.exchange(get("/echo/idle-2")).status == 200  # still open after 1 s
        start = time.monotonic()
        assert client.closed(timeout=4.0)
        assert 1.5 < time.monotonic() - start < 3.0


def test_unreachable_upstream_port_is_502_fast(proxy_env):
    start = time.monotonic()
    reply = request(proxy_env.port, get("/dead/anything"))
    assert time.monotonic() - start < 0.5
    assert reply.status == 502
    assert reply.get("content-type") == "application/problem+json"
    assert "cannot connect" in reply.json()["detail"]


def test_upstream_that_never_accepts_is_502_after_the_connect_timeout(proxy_env):
    start = time.monotonic()
    reply = request(proxy_env.port, get("/blackhole/anything"))
    elapsed = time.monotonic() - start
    assert reply.status == 502
    assert "longer than 0.3s" in reply.json()["detail"]
    assert 0.25 < elapsed < 1.5


def test_slow_upstream_is_504_and_the_connection_stays_usable(proxy_env):
    with RawClient(proxy_env.port) as client:
        start = time.monotonic()
        reply = client.exchange(get("/slow/delay/5"))
        elapsed = time.monotonic() - start
        assert reply.status == 504
        assert reply.get("content-type") == "application/problem+json"
        assert 0.45 < elapsed < 1.5
        assert client.exchange(get("/slow/delay/0.1")).json() == {"delayed": True}


def test_upload_longer_than_the_response_timeout_is_not_cut(proxy_env):
    """The response timeout runs from the end of the request, not from its head."""
    piece = b"u" * 1000
    with RawClient(proxy_env.port) as client:
        client.send(b"POST /slow/upload HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 10000\r\n\r\n")
        for _ in range(10):
            time.sleep(0.15)
            client.send(piece)
        reply = client.read_response()
        assert reply.status == 200
        assert reply.json()["length"] == 10000


def test_client_stalling_its_body_is_408_not_blamed_on_the_upstream(proxy_env):
    with RawClient(proxy_env.port) as client:
        start = time.monotonic()
        client.send(
            b"POST /rslow/body-stall HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 100\r\n\r\n"
        )
        client.send(b"only part of it")
        reply = client.read_response()
        assert reply.status == 408
        assert "no request body bytes for 1.0s" in reply.json()["detail"]
        assert reply.get("connection") == "close"
        # Exactly the body timeout after the last byte, not up to twice it.
        assert 0.95 < time.monotonic() - start < 1.5
        assert client.closed()
    (seen,) = proxy_env.slow_recorder.requests_for("/body-stall")
    assert not seen.complete


def _stalling_body(req):
    def pieces():
        yield b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"s" * 100
        time.sleep(2)
        yield b"s" * 900

    return pieces(), False


def test_upstream_body_stall_breaks_the_client_connection(proxy_env):
    """A response cut by the timeout must look cut, not complete."""
    proxy_env.slow_recorder.scripts["/stall"] = _stalling_body
    with RawClient(proxy_env.port) as client:
        start = time.monotonic()
        client.send(get("/rslow/stall"))
        with pytest.raises(Incomplete, match="closed after 100 of 1000 bytes"):
            client.read_response()
        assert time.monotonic() - start < 1.5


def test_slow_reader_is_not_mistaken_for_a_stalled_upstream(proxy_env):
    """Back pressure from the client silences the upstream; that is not a stall."""
    size = 32 * 1024 * 1024
    with RawClient(proxy_env.port) as client:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.send(get(f"/slow/bytes/{size}"))
        time.sleep(1.5)  # three upstream response timeouts without reading
        reply = client.read_response()
        assert reply.status == 200
        assert len(reply.body) == size


def test_client_body_timeout_applies_when_the_upstream_would_wait_longer(proxy_env):
    # /rec keeps the default 60 s upstream timeout; timeouts.client_body is 1 s.
    with RawClient(proxy_env.port) as client:
        start = time.monotonic()
        client.send(b"POST /rec/body-idle HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 100\r\n\r\n")
        client.send(b"a few bytes")
        reply = client.read_response()
        assert reply.status == 408
        assert "no request body bytes for 1.0s" in reply.json()["detail"]
        assert 0.8 < time.monotonic() - start < 3.0
