"""A stand-in for the control plane's data-plane API on loopback, and a gateway attached to it.

The receiver serves a fixed snapshot, takes status reports, and takes usage batches as the
control plane will (``POST /dp/v1/usage``): the bearer token checked, the body validated
with the contract's own model, batches kept by id (a batch sent again is acknowledged as a
duplicate and not kept twice). It can be told to fail (503), to refuse (400) or to close
connections without answering.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml
from harness import Proc, free_port, wait_port

from meshgate.config.usage import UsageBatch

TOKEN = "dp-token-for-usage-tests"


class Receiver:
    """What the stand-in control plane received; ``mode``: "ok", "fail", "refuse", "close"."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = json.dumps(snapshot).encode()
        self.mode = "ok"
        self.lock = threading.Lock()
        self.batches: dict[str, dict[str, Any]] = {}
        self.attempts: list[str] = []  # every batch id posted, whatever the answer
        self.duplicates = 0
        self.unauthorized = 0
        self.server: ThreadingHTTPServer | None = None
        self.port = free_port()
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, etag: str | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if etag:
                    self.send_header("ETag", etag)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.headers.get("If-None-Match") == '"v1"':
                    self._send(304, b"")
                else:
                    self._send(200, receiver.snapshot, '"v1"')

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != "/dp/v1/usage":
                    self._send(200, b"{}")
                    return
                self._send(*receiver.take(self.headers.get("Authorization"), body))
                if receiver.mode == "close":
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Gone: nothing listens on the port until :meth:`start`."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def take(self, authorization: str | None, body: bytes) -> tuple[int, bytes]:
        if authorization != f"Bearer {TOKEN}":
            self.unauthorized += 1
            return 401, b'{"title": "Unauthorized"}'
        batch = UsageBatch.model_validate_json(body)  # a malformed batch fails the test
        with self.lock:
            self.attempts.append(batch.id)
            if self.mode == "fail":
                return 503, b'{"title": "Service Unavailable"}'
            if self.mode == "refuse":
                return 400, b'{"title": "Bad Request", "detail": "refused by the test"}'
            duplicate = batch.id in self.batches
            if duplicate:
                self.duplicates += 1
            else:
                self.batches[batch.id] = json.loads(body)
        return 200, json.dumps({"accepted": True, "duplicate": duplicate}).encode()

    def usage(self) -> Counter[tuple[str, str, str]]:
        """(product, application, metric) -> value, over every batch kept."""
        out: Counter[tuple[str, str, str]] = Counter()
        with self.lock:
            for batch in self.batches.values():
                for product, app, metric, _minute, value in batch["usage"]:
                    out[(product, app, metric)] += value
        return out

    def responses(self) -> Counter[tuple[str, str, int, str]]:
        """(product, application, status, reason) -> count."""
        out: Counter[tuple[str, str, int, str]] = Counter()
        with self.lock:
            for batch in self.batches.values():
                for product, app, status, reason, _minute, count in batch["responses"]:
                    out[(product, app, status, reason)] += count
        return out

    def latency(self) -> Counter[str]:
        """product -> responses in its histograms."""
        out: Counter[str] = Counter()
        with self.lock:
            for batch in self.batches.values():
                for product, _minute, counts, _ms in batch["latency"]:
                    out[product] += sum(counts)
        return out


def product(backend_port: int, apps: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "echo",
        "hosts": ["*"],
        "path_prefix": "/echo",
        "backend": f"http://127.0.0.1:{backend_port}",
        "auth": {"type": "api_key", "header": "X-API-Key"},
        "metrics": [{"name": "hits"}, {"name": "search", "parent": "hits"}],
        "mapping_rules": [
            {"method": "GET", "pattern": "/search", "metric": "search", "last": True},
            {"method": "GET", "pattern": "/", "metric": "hits"},
        ],
        "plans": [
            {"name": "basic", "limits": [{"metric": "hits", "period": "minute", "value": 5}]},
            {"name": "big", "limits": [{"metric": "hits", "period": "day", "value": 10**9}]},
            {"name": "free", "limits": []},
        ],
        "applications": apps,
    }


class UsageGateway:
    """A ``meshgate gateway`` attached to a :class:`Receiver`."""

    def __init__(self, proc: Proc, port: int, admin_port: int, cache: Path) -> None:
        self.proc = proc
        self.port = port
        self.admin_port = admin_port
        self.cache = cache
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def get(self, path: str, key: str | None = None) -> int:
        headers = {"X-API-Key": key} if key is not None else {}
        return self.client.get(path, headers=headers).status_code

    def metric(self, name: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not exposed")

    def spooled(self) -> list[Path]:
        return sorted((self.cache / "usage").rglob("*.batch"))


@contextmanager
def usage_gateway(
    workdir: Path,
    receiver: Receiver,
    name: str = "gw1",
    usage: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
) -> Iterator[UsageGateway]:
    """A gateway in control-plane mode with usage reported every 0.3 s (unless ``usage``
    says otherwise)."""
    port, admin_port = free_port(), free_port()
    settings = workdir / f"{name}-settings.yaml"
    settings.write_text(
        yaml.safe_dump(
            {
                "listen": f"127.0.0.1:{port}",
                "admin_listen": f"127.0.0.1:{admin_port}",
                "access_log": False,
                "limits": limits or {"backend": "memory"},
                "usage": {"interval": 0.3, **(usage or {})},
                "timeouts": {"shutdown_grace": 5},
            }
        )
    )
    cache = workdir / f"{name}-cache"
    proc = Proc(
        [
            "gateway",
            "--control-plane",
            receiver.url,
            "--token",
            TOKEN,
            "--env",
            "production",
            "--config",
            str(settings),
            "--cache-dir",
            str(cache),
            "--name",
            name,
        ],
        workdir,
        name,
    )
    gw = UsageGateway(proc, port, admin_port, cache)
    try:
        wait_port(admin_port, proc=proc.popen, timeout=30)
        wait_port(port, proc=proc.popen, timeout=30)
        yield gw
    finally:
        gw.client.close()
        proc.stop()
