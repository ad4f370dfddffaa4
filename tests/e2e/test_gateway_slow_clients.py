"""Clients that hold connections: a body that trickles, a response never read, a flood of
slow uploads against one backend; and a client that names a policy's field hop-by-hop."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import httpx
from gateway_e2e_support import TIMEOUT, wait_for
from harness import echo_upstream, example_product, gateway_config, run_gateway

OPEN = [{"name": "basic", "limits": [{"metric": "hits", "period": "eternity", "value": 10**9}]}]


def product(port: int, **overrides: Any) -> dict[str, Any]:
    return example_product(port, plans=OPEN, **overrides)


def read_head(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


POST = b"POST /echo/upload HTTP/1.1\r\nHost: x\r\nX-API-Key: k1\r\nContent-Length: 1000\r\n\r\n"


def test_a_trickling_body_gets_408_at_the_whole_body_deadline(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        config = gateway_config(
            [product(upstream)], timeouts={"client_body": 1.5, "client_body_total": 2.5}
        )
        with run_gateway(config, tmp_path) as gw:
            with socket.create_connection(("127.0.0.1", gw.port)) as sock:
                started = time.monotonic()
                sock.sendall(POST)
                reply = b""
                sock.settimeout(0.4)
                # A byte every 0.4 s: never quiet for client_body, never complete.
                while time.monotonic() - started < 8 and not reply:
                    try:
                        sock.sendall(b"x")
                        reply = sock.recv(65536)
                    except TimeoutError:
                        continue
                    except (BrokenPipeError, ConnectionResetError):
                        break
                took = time.monotonic() - started
            assert reply.startswith(b"HTTP/1.1 408"), reply[:300]
            assert b"not complete within 2.5s" in reply
            assert 2.3 < took < 4.0, took


def test_upstream_connections_are_capped_per_backend_with_a_fast_503(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        config = gateway_config([product(upstream, max_upstream_connections=2)])
        with run_gateway(config, tmp_path) as gw:
            holders = []
            try:
                for _ in range(2):
                    sock = socket.create_connection(("127.0.0.1", gw.port))
                    sock.sendall(POST + b"partial")  # holds an upstream connection
                    holders.append(sock)
                time.sleep(0.5)
                started = time.monotonic()
                r = httpx.get(f"{gw.url}/echo/x", headers={"X-API-Key": "k1"}, timeout=TIMEOUT)
                assert r.status_code == 503, r.text
                assert "2 connections open" in r.json()["detail"]
                assert time.monotonic() - started < 1.0
            finally:
                for sock in holders:
                    sock.close()
            # Released connections make room again.
            wait_for(
                lambda: (
                    httpx.get(
                        f"{gw.url}/echo/x", headers={"X-API-Key": "k1"}, timeout=TIMEOUT
                    ).status_code
                    == 200
                ),
                what="a free upstream connection",
            )


def test_a_client_that_reads_nothing_is_cut_off_after_the_send_timeout(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        config = gateway_config([product(upstream)], timeouts={"client_send": 1})
        with run_gateway(config, tmp_path) as gw:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", gw.port))
            sock.sendall(b"GET /echo/bytes/20000000 HTTP/1.1\r\nHost: x\r\nX-API-Key: k1\r\n\r\n")
            try:
                entry = wait_for(
                    lambda: [e for e in gw.access_log() if "/bytes/" in e["path"]],
                    timeout=10,
                    what="the exchange to end",
                )[0]
            finally:
                sock.close()
            assert "read nothing for 1.0s" in entry["error"], entry
            assert entry["bytes_out"] < 20_000_000


def test_a_client_cannot_strip_a_field_a_policy_sets(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        policies = [{"headers": {"request": {"set": {"X-Gateway-Verified": "yes"}}}}]
        config = gateway_config([product(upstream, policies=policies)])
        with run_gateway(config, tmp_path) as gw:
            r = httpx.get(
                f"{gw.url}/echo/x",
                headers={
                    "X-API-Key": "k1",
                    "Connection": "keep-alive, X-Gateway-Verified, X-Own",
                    "X-Own": "dropped",
                },
                timeout=TIMEOUT,
            )
            seen = r.json()["headers"]
            assert seen["x-gateway-verified"] == "yes"
            assert "x-own" not in seen


def read_until_closed(sock: socket.socket, timeout: float = 20.0) -> bytes:
    sock.settimeout(timeout)
    data = bytearray()
    while chunk := sock.recv(1 << 20):
        data += chunk
    return bytes(data)


def test_a_client_that_reads_nothing_after_a_close_is_cut_off(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        config = gateway_config([product(upstream)], timeouts={"client_send": 1})
        with run_gateway(config, tmp_path) as gw:
            before = len(os.listdir(f"/proc/{gw.proc.pid}/fd"))
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", gw.port))
            sock.sendall(
                b"GET /echo/bytes/20000000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"X-API-Key: k1\r\n\r\n"
            )
            try:
                wait_for(
                    lambda: len(os.listdir(f"/proc/{gw.proc.pid}/fd")) <= before,
                    timeout=10,
                    what="the gateway to let go of a client that reads nothing",
                )
            finally:
                sock.close()


def test_an_h2c_upgrade_is_served_as_a_plain_request(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        config = gateway_config([product(upstream)])
        with run_gateway(config, tmp_path) as gw:
            with socket.create_connection(("127.0.0.1", gw.port)) as sock:
                sock.sendall(
                    b"GET /echo/first HTTP/1.1\r\nHost: x\r\nX-API-Key: k1\r\n"
                    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                    b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
                    b"GET /echo/second HTTP/1.1\r\nHost: x\r\nX-API-Key: k1\r\n"
                    b"Connection: close\r\n\r\n"
                )
                data = read_until_closed(sock, 10)
            assert data.count(b"HTTP/1.1 200") == 2, data[:500]
            assert b"HTTP/1.1 101" not in data
            first = json.loads(data.split(b"\r\n\r\n", 2)[1].split(b"HTTP/1.1")[0])
            assert first["path"] == "/first"
            assert {"upgrade", "http2-settings", "connection"}.isdisjoint(first["headers"])
