"""Graceful stop: SIGTERM lets in-flight requests finish, refuses new connections, and
the process exits 0 within the grace time."""

from __future__ import annotations

import signal
import socket
import threading
import time

from harness import echo_upstream, gateway_config, run_gateway
from proxy_helpers import RawClient, Reply, get, plain_product


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except ConnectionRefusedError:
        return True


def _in_flight(port: int, path: str, out: dict[str, object]) -> threading.Thread:
    def run() -> None:
        try:
            with RawClient(port, timeout=10) as client:
                out["reply"] = client.exchange(get(path))
        except Exception as exc:  # reported by the test
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_sigterm_drains_in_flight_requests_and_exits_zero(tmp_path):
    with echo_upstream(tmp_path) as upstream:
        config = gateway_config(
            [plain_product("echo", "/echo", upstream)], timeouts={"shutdown_grace": 5}
        )
        with run_gateway(config, tmp_path) as gw:
            idle = RawClient(gw.port)
            assert idle.exchange(get("/echo/idle")).status == 200
            out: dict[str, object] = {}
            thread = _in_flight(gw.port, "/echo/delay/2", out)
            time.sleep(0.3)
            start = time.monotonic()
            gw.proc.signal(signal.SIGTERM)
            deadline = time.monotonic() + 1.0
            while not _refused(gw.port) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _refused(gw.port), "new connections must be refused while draining"
            assert idle.closed(timeout=1.0), "idle keep-alive connections close at once"
            idle.close()
            thread.join(5)
            reply = out.get("reply")
            assert isinstance(reply, Reply), out
            assert reply.status == 200
            assert reply.json() == {"delayed": True}
            assert reply.get("connection") == "close"
            assert gw.proc.popen.wait(5) == 0
            assert time.monotonic() - start < 3.0, "exit once the last request is done"


def test_sigterm_cuts_requests_that_outlast_the_grace_time(tmp_path):
    with echo_upstream(tmp_path) as upstream:
        config = gateway_config(
            [plain_product("echo", "/echo", upstream)], timeouts={"shutdown_grace": 0.5}
        )
        with run_gateway(config, tmp_path) as gw:
            out: dict[str, object] = {}
            thread = _in_flight(gw.port, "/echo/delay/5", out)
            time.sleep(0.3)
            start = time.monotonic()
            gw.proc.signal(signal.SIGTERM)
            assert gw.proc.popen.wait(5) == 0
            assert time.monotonic() - start < 2.0
            thread.join(5)
            assert "reply" not in out, "a cut request must not look answered"


def test_a_refused_upload_is_drained_not_reset(proxy_env):
    # The gateway answers 403 before reading the body. Closing at once with the body
    # unread would make the kernel send a reset, which on a real network can destroy
    # the answer before the client reads it: the gateway half-closes and drains instead.
    with socket.create_connection(("127.0.0.1", proxy_env.port), timeout=5) as sock:
        sock.sendall(
            b"POST /api/upload HTTP/1.1\r\nHost: gw.test\r\nX-API-Key: wrong\r\n"
            b"Content-Length: 4000000\r\n\r\n" + b"x" * 100_000
        )
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        assert received.startswith(b"HTTP/1.1 403 ")
        assert b"connection: close" in received.lower()
        # The client goes on sending its body: accepted and dropped, no reset.
        for _ in range(10):
            sock.sendall(b"x" * 20_000)
            time.sleep(0.02)
