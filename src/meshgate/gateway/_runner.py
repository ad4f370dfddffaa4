"""A gateway process: load, serve, reload on SIGHUP or file change, drain on SIGTERM.

The configuration comes from a file, or in control-plane mode from snapshots pulled from
the control plane (see ``_controlplane``) over local settings. With ``workers > 1`` a
supervisor starts that many processes on one port (SO_REUSEPORT) and forwards signals to
them; metrics are aggregated across them.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from meshgate.config import Config, ConfigError, load_config
from meshgate.config.identity import GATEWAY_SERVICE, IdentityFiles
from meshgate.config.tracing import TracingSettings, with_flags
from meshgate.gateway._admin import AdminHandler
from meshgate.gateway._controlplane import (
    ControlPlaneOptions,
    ControlPlaneSync,
    collector_paused,
    default_dataplane_id,
)
from meshgate.gateway._gateway import Gateway, LimitsOutage, Pools, ProductRuntime, build_products
from meshgate.gateway._usage import LocalTally, RedisTally, Tally
from meshgate.gateway._usage_redis import RedisOutbox
from meshgate.gateway._usage_report import (
    LocalSource,
    UsageReporter,
    UsageSource,
    batch_origin,
    spool_directory,
)
from meshgate.gateway._usage_spool import Spool
from meshgate.limits import CounterBackend, RedisCounters, create_backend
from meshgate.policies import schemas
from meshgate.proxy import (
    ALPN,
    CertificateFiles,
    Handler,
    Server,
    ServerSettings,
    ServerTls,
    TlsError,
)
from meshgate.telemetry.access_log import AccessLog
from meshgate.telemetry.metrics import GatewayMetrics
from meshgate.telemetry.tracing import Tracing

if TYPE_CHECKING:
    from meshgate.identity import Identity, IdentityClient
    from meshgate.identity.consumer import ConsumerSigner

__all__ = [
    "GatewayProcess",
    "GatewayStartError",
    "TOKEN_ENV",
    "load_gateway_config",
    "load_local_settings",
    "run_gateway",
]

log = logging.getLogger("meshgate.gateway")

# Where workers of a supervisor find the control plane token (not on their command line).
TOKEN_ENV = "MESHGATE_CONTROL_PLANE_TOKEN"
BOOTSTRAP_TOKEN_ENV = "MESHGATE_BOOTSTRAP_TOKEN"
# How long a start waits for the workload certificate before serving without it (yet).
IDENTITY_START_WAIT = 3.0
_ENV_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class GatewayStartError(Exception):
    """The gateway cannot start as asked; the message says why and what to do."""


def load_gateway_config(path: Path) -> Config:
    return load_config(path, policy_schemas=schemas())


def load_local_settings(path: Path | None) -> Config:
    """Control-plane mode: the gateway's own settings (listen, limits, timeouts...) from
    ``path``, or the defaults; products come from the control plane only."""
    if path is None:
        return Config()
    settings = load_gateway_config(path)
    if settings.products:
        names = ", ".join(p.name for p in settings.products)
        raise GatewayStartError(
            f"{path} holds products ({names}): with --control-plane the products come from "
            "the control plane; keep only local settings (listen, limits, timeouts...) there"
        )
    return settings


def _check_control_plane(options: ControlPlaneOptions) -> None:
    if not re.fullmatch(r"https?://[^/?#\s]+(/[^?#\s]*)?", options.url):
        raise GatewayStartError(
            f"--control-plane must be an http:// or https:// URL, not {options.url!r}"
        )
    if not options.token:
        raise GatewayStartError(f"--control-plane needs --token (or {TOKEN_ENV})")
    if not re.fullmatch(r"[\x21-\x7e]+", options.token):
        raise GatewayStartError("the control plane token must be printable ASCII, no spaces")
    if not _ENV_NAME.fullmatch(options.env):
        raise GatewayStartError(
            f"--env must be a name of letters, digits, '_', '.' and '-', not {options.env!r}"
        )
    if options.name is not None and not re.fullmatch(r"[\x21-\x7e]{1,190}", options.name):
        raise GatewayStartError(
            f"--name must be 1 to 190 printable ASCII characters, no spaces: {options.name!r}"
        )


def _split_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def _settings(config: Config, settings: ServerSettings | None = None) -> ServerSettings:
    settings = settings or ServerSettings()
    settings.header_timeout = config.timeouts.client_header
    settings.idle_timeout = config.timeouts.idle_keepalive
    settings.body_timeout = config.timeouts.client_body
    settings.max_header_size = config.max_header_size
    settings.tunnel_idle_timeout = config.timeouts.tunnel_idle
    settings.http2 = config.http2
    settings.body_total_timeout = config.timeouts.client_body_total
    settings.send_timeout = config.timeouts.client_send
    return settings


def _urls(config: Config) -> list[str]:
    urls = [f"http://{config.listen}"] if config.listen is not None else []
    if config.tls is not None:
        urls.append(f"https://{config.tls.listen}")
    return urls


def _certificate_files(config: Config) -> list[CertificateFiles]:
    """The TLS listener's certificates, each serving its own names, the hosts given with it
    and the hosts of the products that name it."""
    assert config.tls is not None
    named: dict[str, list[str]] = {}
    for product in config.products:
        if product.certificate is not None:
            hosts = [h for h in product.hosts if h != "*"]
            named.setdefault(product.certificate, []).extend(hosts)
    return [
        CertificateFiles(
            c.cert,
            c.key,
            c.name or "",
            tuple(c.hosts) + tuple(named.get(c.name, ()) if c.name else ()),
        )
        for c in config.tls.certificates
    ]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


class GatewayProcess:
    """One serving process of the edge gateway."""

    def __init__(
        self,
        config_path: Path | None,
        *,
        reuse_port: bool = False,
        on_ready: Callable[[GatewayProcess], None] | None = None,
        watch_interval: float = 1.0,
        watch: bool = True,
        supervised: bool = False,
        control_plane: ControlPlaneOptions | None = None,
        tracing: dict[str, object] | None = None,
        identity: IdentityFiles | None = None,
    ) -> None:
        """Serve ``config_path``; with ``control_plane``, serve its snapshots over the local
        settings in ``config_path`` (or the defaults when None). ``tracing``: settings given
        as flags, over the file's ``tracing`` section. ``identity``: the workload identity's
        files, over the configuration's ``identity``."""
        if config_path is None and control_plane is None:
            raise GatewayStartError("give a configuration file or a control plane")
        self.config_path = Path(config_path) if config_path is not None else None
        self.control_plane_options = control_plane
        self.control_plane: ControlPlaneSync | None = None
        # The settings file is not watched in control-plane mode: snapshots replace products.
        self.watch = watch and control_plane is None
        # A worker of a supervisor stops when the supervisor is gone (even after SIGKILL).
        self.parent_pid = os.getppid() if supervised else None
        self.reuse_port = reuse_port
        self.on_ready = on_ready
        self.watch_interval = watch_interval
        self.version = ""
        self.loaded_at = 0.0
        self.last_error: str | None = None
        self.pools: Pools = {}
        self.metrics = GatewayMetrics()
        self.access_log = AccessLog()
        self.outage = LimitsOutage()
        self._stop = asyncio.Event()
        self._stamp: tuple[int, int, int, int] | None = None
        self._dismantling: set[asyncio.Task[None]] = set()
        # Usage reported to the control plane (control-plane mode, usage.enabled).
        self.tally: Tally | None = None
        self.reporter: UsageReporter | None = None
        self.identity_files = identity
        self._file_identity: Identity | None = None
        self._signer: ConsumerSigner | None = None
        self.identity_client: IdentityClient | None = None
        self.tracing_flags = tracing or {}
        self.tracing: Tracing | None = None

    @property
    def identity(self) -> Identity | None:
        """The gateway's workload identity (``spiffe://TD/ns/ENV/sa/meshgate-gateway``),
        renewed in place: from files (``identity:`` in the configuration, or
        ``--identity-cert/--identity-key/--trust-bundle``), or from the control plane's CA
        (None without a bootstrap token or until the CA has issued it). It signs the
        consumer tokens sent upstream and calls mesh services (``mesh_service``)."""
        if self._file_identity is not None:
            return self._file_identity
        client = self.identity_client
        return client.identity if client is not None else None

    @property
    def ready(self) -> bool:
        """Whether a configuration is being served: in control-plane mode, a snapshot."""
        return self.control_plane is None or self.control_plane.source is not None

    @property
    def source(self) -> str | None:
        """Where the configuration comes from: the file, or control_plane / cache."""
        if self.control_plane_options is not None:
            return self.control_plane.source if self.control_plane is not None else None
        return str(self.config_path)

    def _file_stamp(self) -> tuple[int, int, int, int] | None:
        if self.config_path is None:
            return None
        try:
            st = self.config_path.stat()
        except OSError:
            return None
        # ctime and inode catch an atomic replace or a same-size edit within one mtime tick.
        return st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino

    def _build(
        self,
        config: Config,
        counters: CounterBackend,
        products: list[ProductRuntime] | None = None,
    ) -> Gateway:
        gateway = Gateway(
            config,
            counters,
            self.metrics,
            self.pools,
            self.access_log,
            products,
            self.outage,
            self.tally,
            self._consumer_tokens(config),
            lambda: self.identity,
            tracing=self.tracing,
        )
        self.metrics.config_products.set(len(config.products))
        return gateway

    def _load_identity(self, config: Config) -> None:
        """The identity of ``--identity-*`` or of the configuration's ``identity``, if any."""
        files = self.identity_files or config.identity
        if files is None or self._file_identity is not None:
            return
        from meshgate.identity import IdentityError, load_identity

        try:
            identity = load_identity(files.cert, files.key, files.bundle)
        except IdentityError as exc:
            raise GatewayStartError(f"identity: {exc}") from None
        if not identity.spiffe_id.is_gateway:
            identity.close()
            raise GatewayStartError(
                f"identity: {identity.spiffe_id} is not an edge gateway's SPIFFE ID (its "
                "service must be meshgate-gateway): sidecars would not trust its tokens"
            )
        self._file_identity = identity

    def _consumer_tokens(self, config: Config) -> ConsumerSigner | None:
        """What signs the consumer tokens under ``config``: None without an identity."""
        settings = config.consumer_token
        identity = self.identity
        if identity is None or not settings.enabled:
            return None
        signer = self._signer
        if signer is None or signer.identity is not identity or signer.ttl != settings.ttl:
            from meshgate.identity.consumer import ConsumerSigner

            signer = self._signer = ConsumerSigner(identity, ttl=settings.ttl)
        return signer

    def _refresh_consumer_tokens(self) -> None:
        """An identity that came (or changed) after the configuration was built signs from
        now on."""
        gateway = self.gateway
        signer = self._consumer_tokens(gateway.config)
        if gateway.consumer_tokens is not signer:
            gateway.consumer_tokens = signer

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        options = self.control_plane_options
        if options is None:
            assert self.config_path is not None
            self._stamp = self._file_stamp()
            config = load_gateway_config(self.config_path)
            self.version = _digest(self.config_path)
            self._load_identity(config)
            counters = _counters(config)
            self.tracing = _tracing(config, self.tracing_flags)
            self.gateway = self._build(config, counters)
        else:
            settings = load_local_settings(self.config_path)
            self._load_identity(settings)
            if options.bootstrap_token:
                # Imported only here: a gateway without an identity does without it.
                from meshgate.identity import IdentityClient

                self.identity_client = IdentityClient(
                    options.url, options.bootstrap_token, bundle_interval=options.bundle_interval
                )
                self.identity_client.start()
            self.tracing = _tracing(settings, self.tracing_flags)
            self.control_plane = ControlPlaneSync(options, settings)
            counters = _counters(settings)
            if settings.usage.enabled:
                self.reporter = self._usage_reporter(settings, counters, self.control_plane)
            self.gateway, self.version = await self.control_plane.initial(
                self, lambda config: self._build(config, counters)
            )
            config = self.gateway.config
            if self.identity_client is not None:
                await self.identity_client.wait(IDENTITY_START_WAIT)
                self._refresh_consumer_tokens()
        self.loaded_at = time.time()
        self.servers: list[Server] = []
        self.tls: ServerTls | None = None
        if config.listen is not None:
            self.servers.append(await self._listen(config.listen, _settings(config)))
        if config.tls is not None:
            try:
                self.tls = ServerTls(
                    _certificate_files(config),
                    client_ca=config.tls.client_ca,
                    client_auth=config.tls.client_auth,
                    min_version=config.tls.min_version,
                    alpn=ALPN if config.http2 else ("http/1.1",),
                )
            except TlsError as exc:
                raise GatewayStartError(f"tls: {exc}") from None
            self.servers.append(await self._listen(config.tls.listen, _settings(config), self.tls))
        self.admin: Server | None = None
        if config.admin_listen:
            self.admin = await self._listen(
                config.admin_listen, ServerSettings(), handler=AdminHandler(self)
            )
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        watcher = loop.create_task(self._watch())
        flusher = loop.create_task(self._flush_logs())
        if self.control_plane is not None:
            self.control_plane.start()
        if self.reporter is not None:
            await self.reporter.start()
        log.info(
            "gateway serving on %s (admin %s), %d products, config %s",
            " and ".join(_urls(config)),
            config.admin_listen or "off",
            len(config.products),
            self.version or "(none yet)",
        )
        # Startup objects live as long as the process: keep them out of every collection.
        gc.collect()
        gc.freeze()
        if self.on_ready is not None:
            self.on_ready(self)
        await self._stop.wait()
        stopping = loop.time()
        log.info("draining in-flight requests (up to %ss)", config.timeouts.shutdown_grace)
        watcher.cancel()
        if self.control_plane is not None:
            await self.control_plane.stop()
        servers = self.servers + ([self.admin] if self.admin else [])
        await asyncio.gather(
            *(s.shutdown(self.gateway.config.timeouts.shutdown_grace) for s in servers)
        )
        flusher.cancel()
        if self.reporter is not None:
            # What the drained requests added is reported too, within what is left of the grace.
            grace = self.gateway.config.timeouts.shutdown_grace
            await self.reporter.stop(max(grace - (loop.time() - stopping), 1.0))
        self.access_log.flush()
        self.gateway.close_pools()
        await self.gateway.counters.close()
        if self._file_identity is not None:
            self._file_identity.close()  # its private directory of key files
        if self.identity_client is not None:
            await self.identity_client.stop()
        if self.tracing is not None:
            # The spans of the drained requests are exported before the process ends.
            await asyncio.to_thread(self.tracing.shutdown)

    def _usage_reporter(
        self, settings: Config, counters: CounterBackend, sync: ControlPlaneSync
    ) -> UsageReporter:
        """Usage summed where the counters are, reported to the control plane ``sync`` pulls
        from, spooled in the cache directory meanwhile."""
        usage = settings.usage
        source: UsageSource
        if isinstance(counters, RedisCounters):
            tally: Tally = RedisTally(counters)
            source = RedisOutbox(counters, usage.interval, usage.spool_max_batches, sync.id)
        else:
            local = LocalTally()
            tally = local
            source = LocalSource(local, batch_origin(sync.id))
        self.tally = tally
        spool = Spool(
            spool_directory(sync.options.cache_dir, sync.id),
            usage.spool_max_batches,
            usage.spool_max_bytes,
        )
        return UsageReporter(
            tally, source, spool, sync.url, sync.headers, usage.interval, self.metrics.registry
        )

    async def _listen(
        self,
        address: str,
        settings: ServerSettings,
        tls: ServerTls | None = None,
        handler: Handler | None = None,
    ) -> Server:
        server = Server(handler or self.gateway, settings, tls=tls)
        host, port = _split_listen(address)
        try:
            await server.start(host, port, reuse_port=self.reuse_port)
        except OSError as exc:
            raise GatewayStartError(f"cannot listen on {address}: {exc.strerror}") from None
        return server

    @property
    def server(self) -> Server:
        """The first listener (cleartext when there is one)."""
        return self.servers[0]

    def stop(self) -> None:
        self._stop.set()

    def reload_certificates(self, config: Config | None = None) -> bool:
        """Read the TLS listener's files again (with ``config``'s certificates and product
        hosts when given); a file that cannot be used is refused and the old set kept."""
        tls = self.tls
        if tls is None:
            return False
        try:
            if config is None or config.tls is None:
                tls.reload()
            else:
                if (config.tls.client_auth, config.tls.min_version) != (
                    tls.client_auth,
                    tls.min_version_name,
                ):
                    log.warning("tls.client_auth and tls.min_version change only on restart")
                tls.reload(_certificate_files(config), client_ca=config.tls.client_ca)
        except TlsError as exc:
            self.refuse(f"tls: {exc}")
            return False
        log.info("TLS certificates reloaded")
        return True

    def reload(self) -> bool:
        """Swap in the file's configuration; an invalid file is refused and the old one kept.
        The TLS listener's certificate files are read again either way."""
        if self.config_path is None or self.control_plane_options is not None:
            log.info("control-plane mode: the configuration comes from the control plane")
            self.reload_certificates()
            return False
        try:
            config = load_gateway_config(self.config_path)
            version = _digest(self.config_path)
        except (ConfigError, OSError) as exc:
            self.refuse(str(exc))
            return False
        return self.apply(config, version)

    def refuse(self, reason: str) -> None:
        """Count and report a configuration that will not be served."""
        self.last_error = reason
        self.metrics.reloads.labels("refused").inc()
        log.error("configuration refused, still serving %s: %s", self.version or "nothing", reason)

    def apply(self, config: Config, version: str) -> bool:
        """Build ``config`` and swap it in; requests in flight finish on the old gateway.
        One that fails to build is refused and the old one kept."""
        counters = self._counters_for(config)
        try:
            with collector_paused():
                gateway = self._build(config, counters)
        except Exception as exc:  # a policy or credential that fails to build
            return self._not_built(exc, counters)
        self._swap(gateway, version)
        return True

    async def apply_async(self, config: Config, version: str) -> bool:
        """:meth:`apply`, building the products one at a time and serving requests between
        them: no single step holds the event loop for long (a control plane's snapshot)."""
        counters = self._counters_for(config)
        try:
            with collector_paused():
                products = await build_products(config, self.pools, lambda: self.identity)
                gateway = self._build(config, counters, products)
        except Exception as exc:  # a policy or credential that fails to build
            return self._not_built(exc, counters)
        old = self.gateway
        self._swap(gateway, version)
        # Freed in pieces too; a reference is kept until done (the loop's is a weak one).
        task = asyncio.get_running_loop().create_task(old.dismantle())
        self._dismantling.add(task)
        task.add_done_callback(self._dismantling.discard)
        return True

    def _counters_for(self, config: Config) -> CounterBackend:
        """The counters of the current gateway, or new ones when the limits settings differ."""
        old = self.gateway
        if config.limits != old.config.limits:
            return _counters(config)
        return old.counters

    def _not_built(self, exc: Exception, counters: CounterBackend) -> bool:
        if counters is not self.gateway.counters:
            asyncio.ensure_future(counters.close())
        self.refuse(f"{type(exc).__name__}: {exc}")
        return False

    def _swap(self, gateway: Gateway, version: str) -> None:
        old = self.gateway
        config = gateway.config
        if gateway.counters is not old.counters:
            asyncio.get_running_loop().call_later(
                old.config.timeouts.shutdown_grace,
                lambda: asyncio.ensure_future(old.counters.close()),
            )
        if (
            config.listen != old.config.listen
            or config.admin_listen != old.config.admin_listen
            or (config.tls is None) != (old.config.tls is None)
            or (config.tls is not None and config.tls.listen != old.config.tls.listen)  # type: ignore[union-attr]
        ):
            log.warning("listen addresses change only on restart")
        if config.tracing != old.config.tracing:
            log.warning("tracing settings change only on restart")
        if self.tls is not None and config.tls is not None:
            self.reload_certificates(config)
        for server in self.servers:
            _settings(config, server.settings)
            server.settings_changed()
            server.handler = gateway
        self.gateway = gateway
        self.version = version
        self.loaded_at = time.time()
        self.last_error = None
        self.metrics.reloads.labels("applied").inc()
        log.info("configuration %s applied", version)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.watch_interval)
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.warning("supervisor %d is gone; stopping", self.parent_pid)
                self._stop.set()
                return
            if self.tls is not None and self.tls.changed():
                self.reload_certificates()
            self._refresh_consumer_tokens()
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


def _tracing_settings(config: Config, flags: dict[str, object]) -> TracingSettings:
    """The ``tracing`` section with the flags over it."""
    if not flags:
        return config.tracing
    try:
        return with_flags(config.tracing, flags)
    except ValueError as exc:
        raise GatewayStartError(str(exc)) from None


def _tracing(config: Config, flags: dict[str, object]) -> Tracing | None:
    """The process's tracer, None when tracing is off. Its settings change only on restart."""
    return Tracing.start(_tracing_settings(config, flags), GATEWAY_SERVICE)


def _counters(config: Config) -> CounterBackend:
    return create_backend(
        config.limits.backend,
        config.limits.redis_url,
        config.limits.redis_timeout,
        config.limits.key_prefix,
    )


def _run_one(
    config_path: Path | None,
    reuse_port: bool,
    watch: bool,
    control_plane: ControlPlaneOptions | None,
    tracing: dict[str, object] | None = None,
    identity: IdentityFiles | None = None,
) -> None:
    import uvloop

    process = GatewayProcess(
        config_path,
        reuse_port=reuse_port,
        watch=watch,
        supervised=reuse_port,
        control_plane=control_plane,
        tracing=tracing,
        identity=identity,
    )
    uvloop.run(process.run())


def run_gateway(
    config_path: Path | None,
    workers: int = 1,
    reuse_port: bool = False,
    watch: bool = True,
    control_plane: ControlPlaneOptions | None = None,
    tracing: dict[str, object] | None = None,
    identity: dict[str, str] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, from ``config_path`` or, with ``control_plane``, from its
    snapshots over the local settings in ``config_path``. ``tracing``: tracing settings
    given as flags (``endpoint``, ``sample_rate``), over the file's; ``identity`` names the
    files of the workload identity (cert, key, bundle). Raises ConfigError or
    GatewayStartError with a clear message."""
    files = IdentityFiles.model_validate(identity) if identity is not None else None
    if control_plane is None:
        if config_path is None:
            raise GatewayStartError("give --config FILE, or --control-plane URL")
        config = load_gateway_config(config_path)
    else:
        _check_control_plane(control_plane)
        config = load_local_settings(config_path)
    if workers < 1:
        raise GatewayStartError("--workers must be at least 1")
    if workers > 1 and config.limits.backend == "memory":
        raise GatewayStartError(
            "--workers above 1 needs shared counters: set limits.backend to redis "
            "(in-memory counters would let each process allow the full limit)"
        )
    if tracing:
        _tracing_settings(config, tracing)
    if workers == 1:
        _run_one(config_path, reuse_port, watch, control_plane, tracing, files)
        return
    tls_listen = config.tls.listen if config.tls is not None else None
    for address in (config.listen, tls_listen, config.admin_listen):
        if address is not None:
            _check_bindable(address)
    env = dict(os.environ)
    base = [sys.executable, "-m", "meshgate", "gateway", "--reuse-port"]
    if config_path is not None:
        base += ["--config", str(config_path)]
    for flag, key in (("--tracing-endpoint", "endpoint"), ("--trace-sample-rate", "sample_rate")):
        if tracing and tracing.get(key) is not None:
            base += [flag, str(tracing[key])]
    if files is not None:
        base += ["--identity-cert", files.cert, "--identity-key", files.key]
        base += ["--trust-bundle", files.bundle]
    if control_plane is None:
        commands = [[*base, "--watch" if watch else "--no-watch"]] * workers
    else:
        # Each worker polls on its own, under its own data-plane id.
        env[TOKEN_ENV] = control_plane.token
        if control_plane.bootstrap_token:
            # Each worker gets its own certificate: the token must allow several uses.
            env[BOOTSTRAP_TOKEN_ENV] = control_plane.bootstrap_token
            base += ["--bundle-refresh", str(control_plane.bundle_interval)]
        name = control_plane.name or default_dataplane_id(config)
        base += ["--control-plane", control_plane.url, "--env", control_plane.env]
        base += ["--cache-dir", str(control_plane.cache_dir)]
        commands = [[*base, "--name", f"{name}-{i + 1}"] for i in range(workers)]
    _supervise(commands, env)


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


def _supervise(commands: list[list[str]], env: dict[str, str]) -> None:
    """Run one worker per command, restarting those that exit, until SIGTERM/SIGINT."""
    workers = len(commands)
    metrics_dir = tempfile.mkdtemp(prefix="meshgate-metrics-")
    env = dict(env, PROMETHEUS_MULTIPROC_DIR=metrics_dir)
    children = [subprocess.Popen(command, env=env) for command in commands]
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
                    children[i] = subprocess.Popen(commands[i], env=env)
    finally:
        for name in os.listdir(metrics_dir):
            os.unlink(os.path.join(metrics_dir, name))
        os.rmdir(metrics_dir)
