"""Real mesh processes on loopback: demo services, sidecars (from a file or a control plane).

Everything is started as a user would (``python -m meshgate sidecar ...``,
``python -m meshgate.demo.service ...``) and stopped with SIGTERM.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml
from harness import free_port, wait_port

TIMEOUT = 15.0


class Process:
    """A child process with its output in files, stopped with SIGTERM."""

    def __init__(self, args: list[str], workdir: Path, name: str) -> None:
        self.name = name
        self.stdout_path = workdir / f"{name}.out"
        self.stderr_path = workdir / f"{name}.err"
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        self.popen = subprocess.Popen(
            [sys.executable, *args], stdout=self._out, stderr=self._err, cwd=workdir
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def kill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
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


class App:
    """A demo service instance."""

    def __init__(self, proc: Process, name: str, version: str, port: int) -> None:
        self.proc = proc
        self.name = name
        self.version = version
        self.port = port
        self.instance = f"{name}-{version}-{port}"
        self.url = f"http://127.0.0.1:{port}"

    def fail(self, status: int = 503) -> None:
        httpx.post(f"{self.url}/admin/fail?status={status}", timeout=5)

    def recover(self) -> None:
        httpx.post(f"{self.url}/admin/recover", timeout=5)

    def slow(self, seconds: float) -> None:
        httpx.post(f"{self.url}/admin/slow?seconds={seconds}", timeout=5)

    def requests(self) -> int:
        return int(httpx.get(f"{self.url}/admin/stats", timeout=5).json()["requests"])


def start_app(
    workdir: Path, name: str, version: str = "v1", port: int | None = None, proxy: int | None = None
) -> App:
    port = port or free_port()
    args = [
        "-m",
        "meshgate.demo.service",
        "--name",
        name,
        "--version",
        version,
        "--port",
        str(port),
    ]
    if proxy is not None:
        args += ["--proxy", f"127.0.0.1:{proxy}"]
    proc = Process(args, workdir, f"app-{name}-{port}")
    wait_port(port, proc=proc.popen)
    return App(proc, name, version, port)


class SidecarProc:
    """A running ``meshgate sidecar``."""

    def __init__(self, proc: Process, ports: dict[str, int], config_path: Path | None) -> None:
        self.proc = proc
        self.ports = ports
        self.config_path = config_path
        self.inbound = ports["inbound"]
        self.outbound = ports["outbound"]
        self.admin = ports["admin"]
        self.admin_url = f"http://127.0.0.1:{self.admin}"
        # The app's HTTP proxy: requests name the service in their URL.
        self.proxy = f"http://127.0.0.1:{self.outbound}"

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(proxy=self.proxy, timeout=TIMEOUT, **kwargs)

    def metrics(self) -> str:
        return httpx.get(f"{self.admin_url}/metrics", timeout=5).text

    def clusters(self) -> dict[str, Any]:
        return httpx.get(f"{self.admin_url}/clusters", timeout=5).json()

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.admin_url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return
            if self.proc.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"sidecar never ready:\n{self.proc.stderr()[-3000:]}")

    def write_config(self, config: dict[str, Any]) -> None:
        assert self.config_path is not None
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config))
        tmp.replace(self.config_path)
        self.proc.popen.send_signal(signal.SIGHUP)

    def access_log(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.proc.stdout().splitlines() if x.startswith("{")]


def start_sidecar(
    workdir: Path,
    service: str,
    app_port: int,
    *,
    config: dict[str, Any] | None = None,
    name: str | None = None,
    extra: list[str] | None = None,
    wait_ready: bool = True,
) -> SidecarProc:
    ports = {"inbound": free_port(), "outbound": free_port(), "admin": free_port()}
    name = name or f"sidecar-{service}-{ports['inbound']}"
    args = [
        "-m",
        "meshgate",
        "sidecar",
        "--service",
        service,
        "--app-port",
        str(app_port),
        "--inbound",
        f"127.0.0.1:{ports['inbound']}",
        "--outbound",
        f"127.0.0.1:{ports['outbound']}",
        "--admin",
        f"127.0.0.1:{ports['admin']}",
    ]
    path = None
    if config is not None:
        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        args += ["--config", str(path)]
    args += extra or []
    proc = Process(args, workdir, name)
    sidecar = SidecarProc(proc, ports, path)
    wait_port(ports["admin"], proc=proc.popen)
    if wait_ready:
        sidecar.wait_ready()
    return sidecar


@contextmanager
def running(*procs: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            (p.proc if hasattr(p, "proc") else p).stop()


def served_by(responses: list[httpx.Response]) -> Counter[str]:
    return Counter(r.headers.get("x-served-by", f"status-{r.status_code}") for r in responses)


def static_service(name: str, apps: list[App], **extra: Any) -> dict[str, Any]:
    """A service whose instances are the given apps, called directly (no sidecar)."""
    return {
        "name": name,
        "instances": [{"address": "127.0.0.1", "port": a.port, "version": a.version} for a in apps],
        **extra,
    }


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


ADMIN_TOKEN = "mesh-test-admin-token-0123456789abcdef"


class ControlPlaneProc:
    """A running ``meshgate control`` on SQLite, and a client of its admin API."""

    def __init__(self, proc: Process, port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.token = ADMIN_TOKEN
        self.api = httpx.Client(
            base_url=f"{self.url}/admin/api",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=30,
        )

    def instances(self, service: str | None = None) -> list[dict[str, Any]]:
        params = {"service": service} if service else {}
        r = self.api.get("/mesh/instances", params={"env": "production", **params})
        r.raise_for_status()
        body = r.json()
        return list(body["items"] if isinstance(body, dict) else body)

    def put_service(self, doc: dict[str, Any], promote: bool = True) -> None:
        r = self.api.put(f"/mesh/services/{doc['name']}", json=doc)
        assert r.status_code in (200, 201), r.text
        if promote:
            r = self.api.post("/mesh/promote")
            assert r.status_code in (200, 201), r.text

    def stop(self) -> int:
        self.api.close()
        return self.proc.stop()


def start_control_plane(workdir: Path, *extra: str) -> ControlPlaneProc:
    port = free_port()
    args = [
        "-m", "meshgate", "control", "--database-url", f"sqlite:///{workdir / 'cp.db'}",
        "--listen", f"127.0.0.1:{port}", "--admin-token", ADMIN_TOKEN, *extra,
    ]  # fmt: skip
    proc = Process(args, workdir, f"control-{port}")
    deadline = time.monotonic() + 30
    while True:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"meshgate control exited: {proc.stderr()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return ControlPlaneProc(proc, port)
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.stop()
            raise TimeoutError(f"meshgate control not up: {proc.stderr()[-2000:]}")
        time.sleep(0.05)


def attached_sidecar(
    workdir: Path, cp: ControlPlaneProc, service: str, app_port: int, *extra: str, **kw: Any
) -> SidecarProc:
    """A sidecar that registers with, and takes its configuration from, ``cp``."""
    return start_sidecar(
        workdir,
        service,
        app_port,
        extra=["--control-plane", cp.url, "--token", cp.token, *extra],
        **kw,
    )
