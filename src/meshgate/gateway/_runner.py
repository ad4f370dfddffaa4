"""A gateway process: load, serve, reload on SIGHUP or file change, drain on SIGTERM.

With ``workers > 1`` a supervisor starts that many processes on one port
(SO_REUSEPORT) and forwards signals to them; metrics are aggregated across them.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from meshgate.config import Config, ConfigError, load_config
from meshgate.gateway._admin import AdminHandler
from meshgate.gateway._gateway import Gateway
from meshgate.limits import CounterBackend, create_backend
from meshgate.policies import schemas
from meshgate.proxy import Server, ServerSettings, UpstreamPool
from meshgate.telemetry.access_log import AccessLog
from meshgate.telemetry.metrics import GatewayMetrics

__all__ = ["GatewayProcess", "load_gateway_config", "run_gateway", "GatewayStartError"]

log = logging.getLogger("meshgate.gateway")


class GatewayStartError(Exception):
    """The gateway cannot start as asked; the message says why and what to do."""


def load_gateway_config(path: Path) -> Config:
    return load_config(path, policy_schemas=schemas())


def _split_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def _settings(config: Config, settings: ServerSettings | None = None) -> ServerSettings:
    settings = settings or ServerSettings()
    settings.header_timeout = config.timeouts.client_header
    settings.idle_timeout = config.timeouts.idle_keepalive
    settings.body_timeout = config.timeouts.client_body
    settings.max_header_size = config.max_header_size
    return settings


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


class GatewayProcess:
    """One serving process of the edge gateway."""

    def __init__(
        self,
        config_path: Path,
        *,
        reuse_port: bool = False,
        on_ready: Callable[[GatewayProcess], None] | None = None,
        watch_interval: float = 1.0,
        watch: bool = True,
        supervised: bool = False,
    ) -> None:
        self.config_path = Path(config_path)
        self.watch = watch
        # A worker of a supervisor stops when the supervisor is gone (even after SIGKILL).
        self.parent_pid = os.getppid() if supervised else None
        self.reuse_port = reuse_port
        self.on_ready = on_ready
        self.watch_interval = watch_interval
        self.version = ""
        self.loaded_at = 0.0
        self.last_error: str | None = None
        self.pools: dict[tuple[str, int, float, float], UpstreamPool] = {}
        self.metrics = GatewayMetrics()
        self.access_log = AccessLog()
        self._stop = asyncio.Event()
        self._stamp: tuple[int, int, int, int] | None = None

    def _file_stamp(self) -> tuple[int, int, int, int] | None:
        try:
            st = self.config_path.stat()
        except OSError:
            return None
        # ctime and inode catch an atomic replace or a same-size edit within one mtime tick.
        return st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino

    def _build(self, config: Config, counters: CounterBackend) -> Gateway:
        gateway = Gateway(config, counters, self.metrics, self.pools, self.access_log)
        self.metrics.config_products.set(len(config.products))
        return gateway

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._stamp = self._file_stamp()
        config = load_gateway_config(self.config_path)
        self.version = _digest(self.config_path)
        self.loaded_at = time.time()
        counters = create_backend(
            config.limits.backend,
            config.limits.redis_url,
            config.limits.redis_timeout,
            config.limits.key_prefix,
        )
        self.gateway = self._build(config, counters)
        self.server = Server(self.gateway, _settings(config))
        host, port = _split_listen(config.listen)
        try:
            await self.server.start(host, port, reuse_port=self.reuse_port)
        except OSError as exc:
            raise GatewayStartError(f"cannot listen on {config.listen}: {exc.strerror}") from None
        self.admin: Server | None = None
        if config.admin_listen:
            self.admin = Server(AdminHandler(self), ServerSettings())
            ahost, aport = _split_listen(config.admin_listen)
            try:
                await self.admin.start(ahost, aport, reuse_port=self.reuse_port)
            except OSError as exc:
                raise GatewayStartError(
                    f"cannot listen on {config.admin_listen}: {exc.strerror}"
                ) from None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        watcher = loop.create_task(self._watch())
        flusher = loop.create_task(self._flush_logs())
        log.info(
            "gateway serving on http://%s (admin %s), %d products, config %s",
            config.listen,
            config.admin_listen or "off",
            len(config.products),
            self.version,
        )
        # Startup objects live as long as the process: keep them out of every collection.
        gc.collect()
        gc.freeze()
        if self.on_ready is not None:
            self.on_ready(self)
        await self._stop.wait()
        log.info("draining in-flight requests (up to %ss)", config.timeouts.shutdown_grace)
        watcher.cancel()
        servers = [self.server] + ([self.admin] if self.admin else [])
        await asyncio.gather(
            *(s.shutdown(self.gateway.config.timeouts.shutdown_grace) for s in servers)
        )
        flusher.cancel()
        self.access_log.flush()
        self.gateway.close_pools()
        await self.gateway.counters.close()

    def stop(self) -> None:
        self._stop.set()

    def reload(self) -> bool:
        """Swap in the file's configuration; an invalid file is refused and the old one kept."""
        try:
            config = load_gateway_config(self.config_path)
            version = _digest(self.config_path)
        except (ConfigError, OSError) as exc:
            self.last_error = str(exc)
            self.metrics.reloads.labels("refused").inc()
            log.error("configuration refused, still serving %s: %s", self.version, exc)
            return False
        old = self.gateway
        counters = old.counters
        if config.limits != old.config.limits:
            counters = create_backend(
                config.limits.backend,
                config.limits.redis_url,
                config.limits.redis_timeout,
                config.limits.key_prefix,
            )
            asyncio.get_running_loop().call_later(
                old.config.timeouts.shutdown_grace,
                lambda: asyncio.ensure_future(old.counters.close()),
            )
        try:
            gateway = self._build(config, counters)
        except Exception as exc:  # a policy or credential that fails to build
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.metrics.reloads.labels("refused").inc()
            log.error("configuration refused, still serving %s: %s", self.version, exc)
            return False
        if config.listen != old.config.listen or config.admin_listen != old.config.admin_listen:
            log.warning("listen addresses change only on restart")
        _settings(config, self.server.settings)
        self.server.handler = gateway
        self.gateway = gateway
        self.version = version
        self.loaded_at = time.time()
        self.last_error = None
        self.metrics.reloads.labels("applied").inc()
        log.info("configuration %s applied", version)
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.watch_interval)
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.warning("supervisor %d is gone; stopping", self.parent_pid)
                self._stop.set()
                return
            if not self.watch:
                continue
            stamp = self._file_stamp()
            if stamp is not None and stamp != self._stamp:
                self._stamp = stamp
                self.reload()

    async def _flush_logs(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.access_log.flush()


def _run_one(config_path: Path, reuse_port: bool, watch: bool) -> None:
    import uvloop

    process = GatewayProcess(config_path, reuse_port=reuse_port, watch=watch, supervised=reuse_port)
    uvloop.run(process.run())


def run_gateway(
    config_path: Path, workers: int = 1, reuse_port: bool = False, watch: bool = True
) -> None:
    """Serve until SIGTERM/SIGINT. Raises ConfigError or GatewayStartError with a clear message."""
    config = load_gateway_config(config_path)
    if workers < 1:
        raise GatewayStartError("--workers must be at least 1")
    if workers > 1 and config.limits.backend == "memory":
        raise GatewayStartError(
            "--workers above 1 needs shared counters: set limits.backend to redis "
            "(in-memory counters would let each process allow the full limit)"
        )
    if workers == 1:
        _run_one(config_path, reuse_port, watch)
        return
    for address in (config.listen, config.admin_listen):
        if address is not None:
            _check_bindable(address)
    _supervise(config_path, workers, watch)


def _check_bindable(address: str) -> None:
    """Fail before starting workers on an address they cannot share: each would exit and be
    restarted forever. Bound, never listening, so no connection is ever taken here."""
    host, port = _split_listen(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise GatewayStartError(f"cannot listen on {address}: {exc.strerror}") from None


def _supervise(config_path: Path, workers: int, watch: bool) -> None:
    metrics_dir = tempfile.mkdtemp(prefix="meshgate-metrics-")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=metrics_dir)
    command = [
        sys.executable,
        "-m",
        "meshgate",
        "gateway",
        "--config",
        str(config_path),
        "--reuse-port",
        "--watch" if watch else "--no-watch",
    ]
    children = [subprocess.Popen(command, env=env) for _ in range(workers)]
    stopping = False
    # Restarts within the last minute: a worker that keeps dying is not restarted forever.
    restarts: list[float] = []

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        while True:
            time.sleep(0.2)
            if stopping:
                for child in children:
                    child.wait()
                return
            for i, child in enumerate(children):
                code = child.poll()
                if code is not None:
                    now = time.monotonic()
                    restarts = [t for t in restarts if now - t < 60] + [now]
                    if len(restarts) > 5 * workers:
                        log.error("workers keep exiting (last code %s); stopping", code)
                        stopping = True
                        forward(signal.SIGTERM, None)
                        for other in children:
                            other.wait()
                        raise GatewayStartError("workers keep exiting; see the log above")
                    log.error("worker %d exited with %s; starting a new one", child.pid, code)
                    time.sleep(0.5)
                    children[i] = subprocess.Popen(command, env=env)
    finally:
        for name in os.listdir(metrics_dir):
            os.unlink(os.path.join(metrics_dir, name))
        os.rmdir(metrics_dir)
