"""Real processes on loopback for end-to-end tests: the echo upstream and the gateway.

Both are started as a user would start them (``python -m meshgate ...``) and stopped
with SIGTERM. Nothing here is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class Proc:
    """A child process whose output goes to files, stopped with SIGTERM."""

    def __init__(
        self, args: list[str], workdir: Path, name: str, module: str | None = "meshgate"
    ) -> None:
        """``python -m MODULE ARGS`` (``python ARGS`` when ``module`` is None)."""
        self.name = name
        self.stdout_path = workdir / f"{name}.out"
        self.stderr_path = workdir / f"{name}.err"
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        self.popen = subprocess.Popen(
            [sys.executable, *(["-m", module] if module else []), *args],
            stdout=self._out,
            stderr=self._err,
            cwd=workdir,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait()

    def stop(self, timeout: float = 20.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._out.close()
        self._err.close()
        return self.popen.returncode


class Gateway:
    """A running ``meshgate gateway`` with its configuration file."""

    def __init__(self, proc: Proc, config: dict[str, Any], path: Path) -> None:
        self.proc = proc
        self.config = config
        self.config_path = path
        self.port = int(config["listen"].rpartition(":")[2])
        self.admin_port = int(config["admin_listen"].rpartition(":")[2])
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"

    def write_config(self, config: dict[str, Any] | str) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    def access_log(self) -> list[dict[str, Any]]:
        return [
            json.loads(line) for line in self.proc.stdout().splitlines() if line.startswith("{")
        ]


def example_product(backend_port: int, **overrides: Any) -> dict[str, Any]:
    """The issue's example product, pointed at ``backend_port``."""
    product: dict[str, Any] = {
        "name": "echo",
        "hosts": ["*"],
        "path_prefix": "/echo",
        "backend": f"http://127.0.0.1:{backend_port}",
        "auth": {"type": "api_key", "header": "X-API-Key"},
        "metrics": [{"name": "hits"}, {"name": "search", "parent": "hits"}],
        "mapping_rules": [
            {"method": "GET", "pattern": "/search", "metric": "search", "last": True},
            {"method": "ANY", "pattern": "/", "metric": "hits"},
        ],
        "plans": [
            {
                "name": "basic",
                "limits": [
                    {"metric": "hits", "period": "minute", "value": 5},
                    {"metric": "search", "period": "day", "value": 1000},
                ],
            }
        ],
        "policies": [{"cors": {"allow_origins": ["*"]}}],
        "applications": [{"id": "app1", "plan": "basic", "keys": ["k1"]}],
    }
    product.update(overrides)
    return product


def gateway_config(products: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "admin_listen": f"127.0.0.1:{free_port()}",
        "limits": {"backend": "memory"},
        "products": products,
    }
    config.update(overrides)
    return config


@contextmanager
def echo_upstream(workdir: Path) -> Iterator[int]:
    port = free_port()
    proc = Proc(["echo", f"127.0.0.1:{port}"], workdir, f"echo-{port}")
    try:
        wait_port(port, proc=proc.popen)
        yield port
    finally:
        proc.stop()


@contextmanager
def run_gateway(
    config: dict[str, Any], workdir: Path, *extra_args: str, name: str = "gateway"
) -> Iterator[Gateway]:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = Proc(["gateway", "--config", str(path), *extra_args], workdir, name)
    gw = Gateway(proc, config, path)
    try:
        wait_port(gw.admin_port, proc=proc.popen)
        wait_port(gw.port, proc=proc.popen)
        yield gw
    finally:
        proc.stop()


def raw_exchange(port: int, data: bytes, timeout: float = 5.0, until_close: bool = False) -> bytes:
    """Send bytes on a new connection; read one response head+body (or until close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not until_close and _complete(b"".join(chunks)):
                break
        return b"".join(chunks)


def _complete(buf: bytes) -> bool:
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def service_url(name: str, default: str) -> str:
    return os.environ.get(f"MESHGATE_{name}_URL", default)


def services_required() -> bool:
    """Whether a missing service must fail the run instead of skipping (CI sets it)."""
    return os.environ.get("MESHGATE_REQUIRE_SERVICES") == "1"


def unavailable(reason: str) -> None:
    """Skip with ``reason``, or fail when MESHGATE_REQUIRE_SERVICES=1."""
    import pytest

    if services_required():
        pytest.fail(f"{reason} (MESHGATE_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


def chromium() -> str:
    """Debian's chromium for Playwright (its own browser download cannot be reached here):
    installed with apt-get when missing and this runs as root, else skipped (or failed)."""
    import shutil

    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        install = ["apt-get", "install", "-y", "-qq", "chromium"]
        if subprocess.run(install, capture_output=True, timeout=900).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
            subprocess.run(install, capture_output=True, timeout=900)
        found = shutil.which("chromium")
    if found is None:
        unavailable("Debian's chromium is not installed (apt-get install chromium)")
        raise AssertionError("unreachable")
    return found


def shared_redis_url() -> str:
    """The shared Redis (MESHGATE_REDIS_URL); tests write only under their own key prefix."""
    import redis

    url = service_url("REDIS", "redis://127.0.0.1:6379/0")
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except (redis.RedisError, OSError) as error:
        unavailable(f"Redis not reachable at {url}: {error}")
    finally:
        client.close()
    return url


def within(seconds: float, check: Any, what: str) -> float:
    """Poll ``check`` until true; the time it took. Fails after ``seconds``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"{what}: not within {seconds}s")
        time.sleep(0.02)
    return time.monotonic() - started
