"""Control-plane mode: a gateway that pulls its products from a control plane, caches the last
good snapshot on disk, starts from it while the control plane is down, refuses what it cannot
apply and reports it. The control plane here is a small real HTTP server on loopback speaking
the data-plane protocol (GET /dp/v1/snapshot with ETag and long poll, POST /dp/v1/status)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import yaml
from gateway_e2e_support import (
    TIMEOUT,
    drop_keys,
    sample_sum,
    scrape,
    unique_prefix,
    wait_for,
)
from harness import (
    Gateway,
    Proc,
    echo_upstream,
    example_product,
    free_port,
    shared_redis_url,
    wait_port,
)

from meshgate.gateway import cache_file, write_cache
from meshgate.proxy.client import HttpError, HttpResponse, request

TOKEN = "dp-token-for-tests"
KEY = {"X-API-Key": "k1"}
ENV = "production"


def settings() -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{free_port()}",
        "admin_listen": f"127.0.0.1:{free_port()}",
        "limits": {"backend": "memory"},
    }


def snapshot(version: str, upstream: int, **product: Any) -> dict[str, Any]:
    return {"version": version, "products": [example_product(upstream, **product)]}


def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@contextmanager
def cp_gateway(
    workdir: Path, url: str, *extra: str, local: dict[str, Any] | None = None, name: str = "gw"
) -> Iterator[Gateway]:
    local = local or settings()
    path = workdir / f"{name}-settings.yaml"
    path.write_text(yaml.safe_dump(local))
    args = ["gateway", "--control-plane", url, "--token", TOKEN, "--env", ENV]
    args += ["--config", str(path), "--cache-dir", str(workdir / "cache"), *extra]
    proc = Proc(args, workdir, name)
    gw = Gateway(proc, local, path)
    try:
        wait_port(gw.admin_port, timeout=TIMEOUT, proc=proc.popen)
        wait_port(gw.port, timeout=TIMEOUT, proc=proc.popen)
        yield gw
    finally:
        proc.stop()


def admin(gw: Gateway, path: str) -> httpx.Response:
    return httpx.get(f"{gw.admin_url}{path}", timeout=TIMEOUT)


def status(gw: Gateway, path: str = "/echo/hello", key: str = "k1") -> int:
    return httpx.get(f"{gw.url}{path}", headers={"X-API-Key": key}, timeout=TIMEOUT).status_code


class FakeControlPlane:
    """Snapshots per environment with ETags; a poll whose If-None-Match still holds is held
    until a new version or ``wait`` seconds (304). Status reports are recorded."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.lock = threading.Condition()
        self.snapshots: dict[str, tuple[str, bytes]] = {}
        self.served: list[str] = []  # the ETag of every 200
        self.polls: list[dict[str, str]] = []  # headers of every snapshot request
        self.statuses: list[dict[str, Any]] = []
        self.closing = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.count = 0

    def publish(self, env: str, document: dict[str, Any] | bytes) -> str:
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        with self.lock:
            self.count += 1
            etag = f'"{env}-{self.count}"'
            self.snapshots[env] = (etag, body)
            self.lock.notify_all()
            return etag

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        with self.lock:
            self.closing = True
            self.lock.notify_all()
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        plane = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self, code: int, body: bytes = b"", **headers: str) -> None:
                self.send_response(code)
                for name, value in headers.items():
                    self.send_header(name.replace("_", "-"), value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {plane.token}":
                    return True
                problem = {"type": "about:blank", "title": "Unauthorized", "status": 401}
                problem["detail"] = "unknown token"
                body = json.dumps(problem).encode()
                self._answer(401, body, Content_Type="application/problem+json")
                return False

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path != "/dp/v1/snapshot":
                    self._answer(404)
                    return
                with plane.lock:
                    plane.polls.append(dict(self.headers.items()))
                if not self._authorized():
                    return
                query = parse_qs(url.query)
                env, wait = query["env"][0], min(float(query.get("wait", ["0"])[0]), 60)
                deadline = time.monotonic() + wait
                with plane.lock:
                    while True:
                        current = plane.snapshots.get(env)
                        if current is None:
                            break
                        if self.headers.get("If-None-Match") != current[0]:
                            plane.served.append(current[0])
                            break
                        left = deadline - time.monotonic()
                        if left <= 0 or plane.closing:
                            break
                        plane.lock.wait(left)
                if current is None:
                    self._answer(503, b'{"title": "no snapshot yet"}')
                elif self.headers.get("If-None-Match") == current[0]:
                    self._answer(304, ETag=current[0])
                else:
                    self._answer(200, current[1], ETag=current[0], Content_Type="application/json")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                if self.path != "/dp/v1/status":
                    self._answer(404)
                    return
                if not self._authorized():
                    return
                with plane.lock:
                    plane.statuses.append(json.loads(body))
                self._answer(204)

        return Handler


@contextmanager
def control_plane() -> Iterator[FakeControlPlane]:
    plane = FakeControlPlane()
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


def test_starts_from_the_cache_while_the_control_plane_is_down(tmp_path: Path) -> None:
    url = closed_url()
    with echo_upstream(tmp_path) as upstream:
        cached = snapshot("7", upstream)
        write_cache(cache_file(tmp_path / "cache", ENV), cached, '"production-7"', ENV, url)
        with cp_gateway(tmp_path, url) as gw:
            assert status(gw) == 200
            assert status(gw, key="nope") == 403
            doc = admin(gw, "/config").json()
            assert doc["version"] == "7" and doc["source"] == "cache"
            assert doc["products"] == ["echo"]
            assert doc["control_plane"]["last_contact"] is None
            assert "cannot reach" in doc["control_plane"]["contact_error"]
            ready = admin(gw, "/readyz")
            assert ready.status_code == 200
            assert ready.json()["source"] == "cache" and ready.json()["config_version"] == "7"
            # The control plane being down stops nothing: still serving a while later.
            time.sleep(1.5)
            assert status(gw) == 200
        assert "serving the cached snapshot 7" in gw.proc.stderr()


def test_starts_with_no_products_without_a_cache(tmp_path: Path) -> None:
    with cp_gateway(tmp_path, closed_url()) as gw:
        response = httpx.get(f"{gw.url}/echo/hello", headers=KEY, timeout=TIMEOUT)
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
        ready = admin(gw, "/readyz")
        assert ready.status_code == 503
        assert ready.json()["reason"] == "no configuration snapshot applied yet"
        doc = admin(gw, "/config").json()
        assert doc["version"] is None and doc["source"] is None and doc["products"] == []
        assert admin(gw, "/healthz").status_code == 200


def test_refuses_local_settings_with_products(tmp_path: Path) -> None:
    local = settings()
    local["products"] = [example_product(9)]
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(local))
    args = ["gateway", "--control-plane", closed_url(), "--token", TOKEN, "--config", str(path)]
    proc = Proc(args, tmp_path, "refused")
    try:
        assert proc.popen.wait(TIMEOUT) == 1
    finally:
        proc.stop()
    err = proc.stderr()
    assert "holds products (echo)" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_refuses_a_missing_token(tmp_path: Path) -> None:
    proc = Proc(["gateway", "--control-plane", closed_url()], tmp_path, "no-token")
    try:
        assert proc.popen.wait(TIMEOUT) == 1
    finally:
        proc.stop()
    assert "needs --token" in proc.stderr()


def test_pulls_applies_refuses_reports_and_caches(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream, control_plane() as plane:
        first = plane.publish(ENV, snapshot("1", upstream))
        with cp_gateway(tmp_path, plane.url, "--name", "edge-1") as gw:
            assert status(gw) == 200
            doc = admin(gw, "/config").json()
            assert doc["version"] == "1" and doc["source"] == "control_plane"
            assert admin(gw, "/readyz").status_code == 200
            poll = plane.polls[0]
            assert poll["Authorization"] == f"Bearer {TOKEN}"
            assert poll["X-Meshgate-Dataplane"] == "edge-1"
            reported = wait_for(lambda: [s for s in plane.statuses if s["version"] == "1"])
            assert reported[0]["id"] == "edge-1" and reported[0]["env"] == ENV
            assert reported[0]["error"] is None and reported[0]["listen"] == gw.config["listen"]
            assert isinstance(reported[0]["pid"], int) and reported[0]["hostname"]
            # The long poll carries the ETag it has.
            wait_for(lambda: any(p.get("If-None-Match") == first for p in plane.polls))

            # A new application is usable within 2 s.
            two = dict(snapshot("2", upstream))
            two["products"][0]["applications"].append(
                {"id": "app2", "plan": "basic", "keys": ["k2"]}
            )
            plane.publish(ENV, two)
            published = time.monotonic()
            wait_for(lambda: status(gw, key="k2") == 200, what="the new application")
            assert time.monotonic() - published < 2
            assert admin(gw, "/config").json()["version"] == "2"
            cached = json.loads(cache_file(tmp_path / "cache", ENV).read_text())
            assert cached["snapshot"]["version"] == "2"

            # A snapshot with a policy this gateway does not know is refused and reported;
            # version 2 keeps serving, and the refused one is not fetched again and again.
            bad = snapshot("3", upstream, policies=[{"no_such_policy": {}}])
            refused = plane.publish(ENV, bad)
            errors = wait_for(lambda: [s for s in plane.statuses if s["error"]])
            assert "unknown policy 'no_such_policy'" in errors[0]["error"]
            assert errors[0]["version"] == "2"
            assert status(gw, key="k2") == 200
            doc = admin(gw, "/config").json()
            assert doc["version"] == "2" and "no_such_policy" in doc["last_error"]
            assert sample_sum(scrape(gw), "meshgate_config_reloads_total", result="refused") == 1
            time.sleep(2)
            assert plane.served.count(refused) == 1
            assert json.loads(cache_file(tmp_path / "cache", ENV).read_text())["etag"] != refused

            # A good one after it applies and clears the error.
            four = snapshot("4", upstream)
            plane.publish(ENV, four)
            wait_for(lambda: admin(gw, "/config").json()["version"] == "4")
            assert admin(gw, "/config").json()["last_error"] is None
            wait_for(lambda: any(s["version"] == "4" and not s["error"] for s in plane.statuses))
            assert status(gw, key="k2") == 403
            stopping = time.monotonic()
        # SIGTERM ends the process during a long poll without waiting for it.
        assert gw.proc.popen.returncode == 0
        assert time.monotonic() - stopping < 10

        # The control plane gone, a restart serves the last good snapshot from the cache.
        plane.stop()
        with cp_gateway(tmp_path, plane.url, name="restarted") as again:
            assert status(again) == 200
            doc = admin(again, "/config").json()
            assert doc["version"] == "4" and doc["source"] == "cache"
        assert TOKEN not in gw.proc.stderr() + again.proc.stderr()


def test_a_refused_token_is_reported_and_nothing_served(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream, control_plane() as plane:
        plane.publish(ENV, snapshot("1", upstream))
        plane.token = "another-token"
        with cp_gateway(tmp_path, plane.url) as gw:
            assert status(gw) == 404
            doc = admin(gw, "/config").json()
            assert (
                "token was refused (401: Unauthorized: unknown token)"
                in (doc["control_plane"]["contact_error"])
            )
            assert admin(gw, "/readyz").status_code == 503
            # Once the token is accepted, the next poll applies the snapshot.
            plane.token = TOKEN
            wait_for(lambda: status(gw) == 200, what="the snapshot after the token is fixed")
            assert admin(gw, "/readyz").status_code == 200


def test_workers_poll_on_their_own(tmp_path: Path) -> None:
    local = settings()
    local["limits"] = {"backend": "redis", "redis_url": shared_redis_url()}
    local["limits"]["key_prefix"] = prefix = unique_prefix()
    try:
        with echo_upstream(tmp_path) as upstream, control_plane() as plane:
            plane.publish(ENV, snapshot("1", upstream))
            with cp_gateway(
                tmp_path, plane.url, "--workers", "2", "--name", "edge", local=local
            ) as gw:
                wait_for(lambda: status(gw) == 200)

                def reporting() -> set[str]:
                    return {s["id"] for s in plane.statuses if s["version"] == "1"}

                wait_for(lambda: reporting() == {"edge-1", "edge-2"}, what="both workers")
                assert {s["id"] for s in plane.statuses} == {"edge-1", "edge-2"}
                pids = {s["pid"] for s in plane.statuses}
                assert len(pids) == 2 and gw.proc.pid not in pids
                assert TOKEN not in " ".join(
                    Path(f"/proc/{pid}/cmdline").read_text() for pid in pids
                )
    finally:
        drop_keys(local["limits"]["redis_url"], prefix)


def test_a_malformed_snapshot_is_refused_and_reported(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream, control_plane() as plane:
        plane.publish(ENV, snapshot("1", upstream))
        with cp_gateway(tmp_path, plane.url) as gw:
            assert status(gw) == 200
            broken = plane.publish(ENV, b'{"version": "2", "products": [')
            errors = wait_for(lambda: [s["error"] for s in plane.statuses if s["error"]])
            assert "not a JSON document" in errors[0]
            extra = plane.publish(ENV, {"version": "3", "products": [], "listen": "0.0.0.0:1"})
            wait_for(lambda: any("not listen" in (s["error"] or "") for s in plane.statuses))
            assert status(gw) == 200 and admin(gw, "/config").json()["version"] == "1"
            time.sleep(1.5)
            assert plane.served.count(broken) == 1 and plane.served.count(extra) == 1


@contextmanager
def raw_server(answer: bytes, close: bool = True) -> Iterator[str]:
    """A loopback server that answers every connection with ``answer`` bytes."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(answer)
                if not close:
                    stop.wait(5)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/dp/v1/snapshot"
    finally:
        stop.set()
        thread.join()
        listener.close()


def fetch(url: str, max_body: int = 1000, timeout: float = 5.0) -> HttpResponse:
    return asyncio.run(request("GET", url, timeout=timeout, max_body=max_body))


def test_the_client_reads_lengths_chunks_and_close_delimited_bodies() -> None:
    answers = [
        b'HTTP/1.1 200 OK\r\nContent-Length: 5\r\nETag: "e"\r\n\r\nhello',
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\nhello",
    ]
    for answer in answers:
        with raw_server(answer) as url:
            response = fetch(url)
        assert (response.status, response.body) == (200, b"hello")
    with raw_server(b'HTTP/1.1 304 Not Modified\r\nETag: "e"\r\n\r\n', close=False) as url:
        response = fetch(url)
    assert response.status == 304 and response.headers["etag"] == '"e"'


def test_the_client_refuses_what_is_not_a_usable_response() -> None:
    cases = [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n", "larger than 1000 bytes"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n" + b"x" * 2000, "larger"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", "closed before"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "malformed HTTP response"),
    ]
    for answer, message in cases:
        with raw_server(answer) as url, pytest.raises(HttpError, match=message):
            fetch(url)
    with raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", close=False) as url:
        with pytest.raises(HttpError, match="within 0.5s"):
            fetch(url, timeout=0.5)
    with pytest.raises(HttpError, match="cannot reach"):
        fetch(closed_url())
