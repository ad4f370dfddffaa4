"""A sidecar process: listeners in and out, the app's readiness, the admin port, the drain.

- *inbound* (``settings.inbound``): what other services' sidecars call; forwards to the app.
- *outbound* (``settings.outbound``): the app's HTTP proxy (``http_proxy=http://HOST:PORT``),
  which also takes connections an iptables ``REDIRECT`` sent it: their original destination
  (``SO_ORIGINAL_DST``) names the service by its virtual IP, and a TCP service is relayed
  as TCP.
- one local port per declared upstream (``upstreams``), bound to that service.
- *admin* (``settings.admin``): ``/healthz``, ``/readyz``, ``/metrics``, ``/config``,
  ``/clusters``, and ``POST /quitquitquit`` to drain and exit (batch jobs end).

SIGTERM drains: the instance leaves the registry first (callers stop picking it), requests
in flight finish within ``drain_seconds``, then the process exits. With an app command
(``meshgate sidecar ... -- APP ARGS``) the app starts once the sidecar serves, gets the
SIGTERM, and the sidecar exits with the app's status once it has drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshgate.config.mesh import ConfigError, MeshConfig, SidecarSettings, load_mesh
from meshgate.mesh._controlplane import ControlPlaneLink
from meshgate.mesh._edges import EdgeCollector
from meshgate.mesh._metrics import CONTENT_TYPE, Family, MeshMetrics
from meshgate.mesh._mtls import InboundAcceptor, RequireMtls
from meshgate.mesh._tcp import TcpProxy
from meshgate.mesh._traffic import Inbound, Mesh, Outbound, new_pool
from meshgate.proxy import (
    Exchange,
    Headers,
    Response,
    Server,
    ServerSettings,
    bind_socket,
    problem,
)
from meshgate.proxy._http1 import HttpProtocol
from meshgate.telemetry.access_log import AccessLog

if TYPE_CHECKING:
    from meshgate.identity import Identity, IdentityClient
    from meshgate.telemetry.tracing import Tracing

__all__ = ["ControlPlaneSettings", "Sidecar", "SidecarStartError", "run_sidecar"]

log = logging.getLogger("meshgate.mesh")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
# The engine's settings for mesh listeners: calls are internal, timeouts generous.
_LISTENER = ServerSettings(header_timeout=30.0, idle_timeout=300.0)


class SidecarStartError(Exception):
    """The sidecar cannot start as asked; the message says why."""


class ControlPlaneSettings:
    def __init__(
        self,
        url: str,
        token: str,
        env: str = "production",
        edge_interval: float = 10.0,
        bootstrap_token: str | None = None,
        bundle_interval: float = 15.0,
    ) -> None:
        self.url = url
        self.token = token
        self.env = env
        # Seconds between the reports of this sidecar's calls for the service graph.
        self.edge_interval = edge_interval
        # With it, the sidecar obtains its workload certificate from the control plane's CA.
        self.bootstrap_token = bootstrap_token
        self.bundle_interval = bundle_interval


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def original_destination(sock: socket.socket | None) -> tuple[str, int] | None:
    """Where the client meant to connect before an iptables REDIRECT (IPv4), else None."""
    if sock is None or sock.family != socket.AF_INET:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


class _Capture(asyncio.Protocol):
    """The first moment of an outbound connection: was it redirected, and to which service?
    Hands the transport to the HTTP engine or to the TCP relay, then steps aside."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sidecar = self.sidecar
        protocol: asyncio.Protocol
        sock = transport.get_extra_info("socket")
        own = transport.get_extra_info("sockname")
        target = original_destination(sock)
        service = None
        if target is not None and own is not None and target != (own[0], own[1]):
            service = sidecar.mesh.service_at(*target)
            if service is None:
                service = sidecar.mesh.services_by_instance(*target)
        if service is not None and service.config.protocol == "tcp":
            name = service.name
            protocol = TcpProxy(
                lambda: sidecar.mesh.services.get(name), sidecar.metrics, sidecar.settings.service
            )
        elif service is not None:
            protocol = HttpProtocol(sidecar.server_for(service.name))
        else:
            protocol = HttpProtocol(sidecar.outbound)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)


class Sidecar:
    """One sidecar process's parts; :meth:`run` serves until stopped."""

    def __init__(
        self,
        settings: SidecarSettings,
        *,
        config: MeshConfig | None = None,
        config_path: Path | None = None,
        control_plane: ControlPlaneSettings | None = None,
        app_command: list[str] | None = None,
        on_ready: Callable[[Sidecar], None] | None = None,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.control_plane_settings = control_plane
        self.app_command = app_command
        self.on_ready = on_ready
        self.metrics = MeshMetrics()
        self.metrics.gauges.append(self._cluster_metrics)
        self.access_log = AccessLog(1) if settings.access_log else None
        self.mesh = Mesh(settings, self.metrics, access_log=self.access_log)
        self.tracing = self.mesh.tracing = _tracing(settings)
        if config is not None:
            self.mesh.apply_config(config)
        self.link: ControlPlaneLink | None = None
        self.identity_client: IdentityClient | None = None
        self.app_ready = False
        self.draining = False
        self.started = time.time()
        self.app_process: asyncio.subprocess.Process | None = None
        self.exit_code = 0
        self._stop = asyncio.Event()
        self._leaving: asyncio.Task[None] | None = None
        self._servers: list[Server] = []
        self._listeners: list[asyncio.base_events.Server] = []
        self._by_service: dict[str, Server] = {}
        self._acceptor: InboundAcceptor | None = None
        self._file_identity: Identity | None = None
        self.ports: dict[str, int] = {}
        app = new_pool(
            settings.app_address,
            settings.app_port,
            settings.app_protocol,
            settings.service,
            connect_timeout=5.0,
        )
        self.app_pool = app
        self.inbound = Server(Inbound(self.mesh, app, identity=lambda: self.identity), _settings())
        self.outbound = Server(Outbound(self.mesh), _settings())
        # Answers plaintext callers of a strict service, one answer per connection.
        self.refusing = Server(RequireMtls(settings.service), _settings())
        self.refusing.draining = True

    @property
    def identity(self) -> Identity | None:
        """This instance's workload identity (certificate, key, bundle; renewed in place with
        ``identity.update(material)``): the files an operator brings, or the control plane
        CA's; None without either, or none obtained yet. Once set, calls in and out are
        mutual TLS (as the modes say) and it verifies consumer tokens."""
        return self.mesh.identity

    @identity.setter
    def identity(self, identity: Identity | None) -> None:
        self.mesh.identity = identity
        if self.link is not None:
            self.link.set_mtls(self.speaks_mtls)

    @property
    def speaks_mtls(self) -> bool:
        """Whether this instance takes mutual TLS (what it registers): an identity, HTTP."""
        return self.mesh.identity is not None and self.settings.app_protocol != "tcp"

    def mtls_mode(self) -> str:
        """The mode of this sidecar's own service (permissive when the mesh names none)."""
        runtime = self.mesh.services.get(self.settings.service)
        if runtime is not None:
            return runtime.config.mtls.mode
        config = self.mesh.config.service(self.settings.service)
        return config.mtls.mode if config is not None else "permissive"

    async def _adopt_identity(self, client: IdentityClient) -> None:
        """The CA's certificate, once it comes, is this sidecar's identity (unless the
        operator's files gave one); renewals update the same object in place."""
        await client.obtained.wait()
        if self.mesh.identity is None and client.identity is not None:
            self.identity = client.identity
            if self.link is not None and self.app_ready and not self.draining:
                self.link.set_ready(True)  # now, not at the next probe

    def load_identity_files(self) -> None:
        """Read the identity the operator brings (``identity_cert``, ``identity_key``,
        ``trust_bundle``) and use it: at start, and again on SIGHUP (rotation). Raises
        SidecarStartError saying what is wrong; a running sidecar keeps its identity then."""
        s = self.settings
        if s.identity_cert is None or s.identity_key is None or s.trust_bundle is None:
            return
        from meshgate.identity import Identity, IdentityError, Material

        try:
            material = Material.from_pem(
                Path(s.identity_cert).read_bytes(),
                Path(s.identity_key).read_bytes(),
                Path(s.trust_bundle).read_bytes(),
            )
        except OSError as exc:
            raise SidecarStartError(
                f"identity: cannot read {exc.filename}: {exc.strerror}"
            ) from None
        except IdentityError as exc:
            raise SidecarStartError(f"identity: {exc}") from None
        if material.spiffe_id.service != s.service:
            raise SidecarStartError(
                f"identity: the certificate names {material.spiffe_id.uri}, but this sidecar "
                f"fronts service {s.service!r}"
            )
        if material.lifetime_left() <= 0:
            raise SidecarStartError(
                f"identity: the certificate {s.identity_cert} expired at {material.not_after}"
            )
        current = self.identity
        if current is None:
            self.identity = self._file_identity = Identity(material)
        else:
            current.update(material)
        log.info(
            "identity %s (valid until %s)", material.spiffe_id.uri, material.not_after.isoformat()
        )

    def server_for(self, service: str) -> Server:
        """A listener-less engine server whose handler is bound to ``service``."""
        server = self._by_service.get(service)
        if server is None:
            server = self._by_service[service] = Server(Outbound(self.mesh, service), _settings())
            self._servers.append(server)
        return server

    @property
    def ready(self) -> bool:
        if not self.app_ready or self.draining:
            return False
        if self.identity_client is not None and self.identity is None:
            return False
        link = self.link
        return link is None or link.config_applied.is_set()

    async def _listen(
        self, address: str, factory: Callable[[], asyncio.BaseProtocol], name: str
    ) -> None:
        host, port = _split(address)
        try:
            sock = bind_socket(host, port)
        except OSError as exc:
            raise SidecarStartError(f"{name}: cannot listen on {address}: {exc.strerror}") from None
        listener = await asyncio.get_running_loop().create_server(factory, sock=sock, backlog=2048)
        self._listeners.append(listener)
        self.ports[name] = int(listener.sockets[0].getsockname()[1])

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        settings = self.settings
        # Before any listener: outbound calls need it too (also beside a TCP app).
        self.load_identity_files()
        cp_settings = self.control_plane_settings
        if cp_settings is not None and cp_settings.bootstrap_token:
            # Imported only here: certificates cost megabytes a sidecar without them keeps.
            from meshgate.identity import IdentityClient

            self.identity_client = IdentityClient(
                cp_settings.url,
                cp_settings.bootstrap_token,
                bundle_interval=cp_settings.bundle_interval,
            )
            self.identity_client.start()
            loop.create_task(self._adopt_identity(self.identity_client))
        self._servers += (self.inbound, self.outbound, self.refusing)
        if settings.app_protocol == "tcp":
            app = self.mesh.local_app()
            await self._listen(
                settings.inbound,
                lambda: TcpProxy(lambda: app, self.metrics, settings.service),
                "inbound",
            )
        else:
            host, port = _split(settings.inbound)
            try:
                sock = bind_socket(host, port)
            except OSError as exc:
                raise SidecarStartError(
                    f"inbound: cannot listen on {settings.inbound}: {exc.strerror}"
                ) from None
            self.ports["inbound"] = int(sock.getsockname()[1])
            # One port for mutual TLS and plaintext: each connection's first byte decides.
            self._acceptor = InboundAcceptor(
                sock,
                mode=self.mtls_mode,
                identity=lambda: self.mesh.identity,
                serve=lambda: HttpProtocol(self.inbound),
                refuse=lambda: HttpProtocol(self.refusing),
                metrics=self.metrics,
                handshake_timeout=_LISTENER.header_timeout,
            )
        if settings.outbound is not None:
            await self._listen(settings.outbound, lambda: _Capture(self), "outbound")
        for upstream in settings.upstreams:
            address = f"{upstream.local_address}:{upstream.local_port}"
            name = upstream.service
            await self._listen(address, self._upstream_factory(name), f"upstream:{name}")
        if settings.admin is not None:
            admin = Server(_AdminHandler(self), ServerSettings())
            self._servers.append(admin)
            await self._listen(settings.admin, lambda: HttpProtocol(admin), "admin")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        probe = loop.create_task(self._probe())
        flusher = loop.create_task(self._flush_logs())
        if self.control_plane_settings is not None:
            cp = self.control_plane_settings
            # Registered as other hosts reach the inbound listener: the advertised address
            # (a bare address), or the listener's, or this host's when it listens on all.
            host = settings.advertise or _split(settings.inbound)[0]
            port = self.ports["inbound"]
            if host in ("0.0.0.0", "::", ""):
                host = _default_address()
            self.link = ControlPlaneLink(
                cp.url,
                cp.token,
                cp.env,
                settings,
                (host, port),
                on_config=self._apply,
                on_endpoints=self.mesh.set_endpoints,
                edges=EdgeCollector(self.metrics),
                edge_interval=cp.edge_interval,
            )
            self.link.set_mtls(self.speaks_mtls)
            self.link.start()
        log.info(
            "sidecar of %s serving: inbound %s -> app %s:%s, outbound %s, admin %s",
            settings.service,
            self.ports.get("inbound"),
            settings.app_address,
            settings.app_port,
            self.ports.get("outbound", "off"),
            self.ports.get("admin", "off"),
        )
        gc.collect()
        gc.freeze()
        _return_free_memory()
        if self.on_ready is not None:
            self.on_ready(self)
        app_waiter = None
        if self.app_command:
            app_waiter = loop.create_task(self._run_app())
        await self._stop.wait()
        await self._drain()
        probe.cancel()
        flusher.cancel()
        if app_waiter is not None:
            await app_waiter
        if self.access_log is not None:
            self.access_log.flush()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)
        if self._file_identity is not None:
            self._file_identity.close()  # its private directory of key files
        return self.exit_code

    def _upstream_factory(self, service: str) -> Callable[[], asyncio.BaseProtocol]:
        def make() -> asyncio.BaseProtocol:
            runtime = self.mesh.services.get(service)
            if runtime is not None and runtime.config.protocol == "tcp":
                return TcpProxy(
                    lambda: self.mesh.services.get(service), self.metrics, self.settings.service
                )
            return HttpProtocol(self.server_for(service))

        return make

    def _apply(self, config: MeshConfig) -> None:
        try:
            self.mesh.apply_config(config)
        except Exception:
            log.exception("mesh configuration %s could not be applied", config.version)
            self.metrics.config_updates.labels("refused").inc()
            return
        self.metrics.config_updates.labels("applied").inc()
        log.info("mesh configuration %s applied", config.version or "(file)")

    def reload(self) -> None:
        """SIGHUP: read the identity files and the configuration file again; a bad one is
        refused and logged, and what runs is kept."""
        try:
            self.load_identity_files()
        except SidecarStartError as exc:
            log.error("identity refused, the running one is kept: %s", exc)
            self.metrics.config_updates.labels("refused").inc()
        if self.config_path is None:
            return
        try:
            # The sidecar's own settings are the process's: only services change here.
            config = load_mesh(self.config_path, sidecar=self.settings.model_dump())
        except ConfigError as exc:
            log.error("configuration refused, the running one is kept: %s", exc)
            self.metrics.config_updates.labels("refused").inc()
            return
        self._apply(config)

    def stop(self) -> None:
        """SIGTERM: leave the registry now; with an app, pass the signal on and stop once
        it has exited (it may still call out while it drains)."""
        if self.app_process is not None and self.app_process.returncode is None:
            self.draining = True
            if self.link is not None and self._leaving is None:
                self._leaving = asyncio.get_running_loop().create_task(self.link.stop())
            with contextlib.suppress(ProcessLookupError):
                self.app_process.send_signal(signal.SIGTERM)
            return
        self._stop.set()

    def quit(self) -> None:
        """POST /quitquitquit: drain and exit now (a batch job is done)."""
        self._stop.set()

    async def _run_app(self) -> None:
        assert self.app_command is not None
        if self._stop.is_set():
            return  # stopped before the app was started: nothing to wait for
        try:
            self.app_process = await asyncio.create_subprocess_exec(*self.app_command)
        except OSError as exc:
            log.error("cannot start the app %s: %s", self.app_command[0], exc)
            self.exit_code = 127
            self._stop.set()
            return
        self.exit_code = await self.app_process.wait()
        log.info("the app exited with status %s: draining", self.exit_code)
        self._stop.set()

    async def _drain(self) -> None:
        self.draining = True
        grace = self.settings.drain_seconds
        log.info("draining (up to %ss)", grace)
        if self._leaving is not None:
            await self._leaving
        elif self.link is not None:
            await self.link.stop()
            # Callers learn of the departure through the registry (tens of milliseconds);
            # the inbound side keeps serving while they do.
            await asyncio.sleep(min(1.0, grace))
        for listener in self._listeners:
            listener.close()
        if self._acceptor is not None:
            self._acceptor.close()
        await asyncio.gather(*(s.shutdown(grace) for s in self._servers))
        self.app_pool.close()
        for runtime in self.mesh.services.values():
            runtime.cluster.set_endpoints(())
        if self.identity_client is not None:
            await self.identity_client.stop()

    async def _probe(self) -> None:
        readiness = self.settings.readiness
        while True:
            ready = await self._check_app(readiness.http, readiness.timeout)
            if ready != self.app_ready:
                log.info("the app is %s", "ready" if ready else "not ready")
                self.app_ready = ready
            if self.link is not None:
                # An instance still waiting for its certificate takes no calls yet: callers
                # would find it without mutual TLS.
                waiting = self.identity_client is not None and self.mesh.identity is None
                self.link.set_ready(ready and not self.draining and not waiting)
            await asyncio.sleep(readiness.interval)

    async def _check_app(self, path: str | None, timeout: float) -> bool:
        s = self.settings
        writer = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(s.app_address, s.app_port)
                if path is None:
                    return True
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: {s.service}\r\nConnection: close\r\n"
                    "User-Agent: meshgate-sidecar\r\n\r\n".encode()
                )
                line = await reader.readline()
                parts = line.split()
                return len(parts) >= 2 and parts[1].startswith(b"2")
        except (OSError, TimeoutError):
            return False
        finally:
            if writer is not None:
                writer.close()

    async def _flush_logs(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self.access_log is not None:
                self.access_log.flush()

    def describe(self) -> dict[str, Any]:
        s = self.settings
        doc: dict[str, Any] = {
            "service": s.service,
            "version": s.version,
            "zone": s.zone,
            "config_version": self.mesh.version or None,
            "source": "control plane" if self.link is not None else "file",
            "ports": self.ports,
            "app": f"{s.app_address}:{s.app_port}",
            "app_ready": self.app_ready,
            "services": sorted(self.mesh.services),
        }
        identity = self.identity
        doc["mtls"] = {
            "mode": self.mtls_mode(),
            "identity": identity.spiffe_id.uri if identity is not None else None,
            "not_after": identity.material.not_after.isoformat() if identity else None,
        }
        if self.link is not None:
            doc["control_plane"] = self.link.describe()
        if self.identity_client is not None:
            doc["identity"] = self.identity_client.describe()
        return doc

    def _cluster_metrics(self) -> list[Family]:
        now = time.monotonic()
        endpoints = Family(
            "meshgate_mesh_endpoints",
            "Instances known, by service and state.",
            ["service", "state"],
            "gauge",
        )
        ejections = Family(
            "meshgate_mesh_ejections", "Instances ejected by outlier detection.", ["service"]
        )
        for name, runtime in self.mesh.services.items():
            cluster = runtime.cluster
            ejected = sum(1 for e in cluster.endpoints if e.ejected_until > now)
            endpoints.labels(name, "healthy").set(len(cluster.endpoints) - ejected)
            endpoints.labels(name, "ejected").set(ejected)
            ejections.labels(name).set(cluster.ejections_total)
        return [endpoints, ejections]

    def clusters(self) -> dict[str, Any]:
        now = time.monotonic()
        out: dict[str, Any] = {}
        for name, runtime in sorted(self.mesh.services.items()):
            out[name] = [
                {
                    "address": f"{e.info.address}:{e.info.port}",
                    "version": e.info.version,
                    "zone": e.info.zone,
                    "active": e.active,
                    "ejected": e.ejected_until > now,
                    "ejections": e.ejections,
                }
                for e in runtime.cluster.endpoints
            ]
        return out


def _tracing(settings: SidecarSettings) -> Tracing | None:
    """The sidecar's tracer; the SDK is imported only when tracing is on."""
    if not settings.tracing.enabled:
        return None
    from meshgate.telemetry.tracing import Tracing

    attributes = {"service.version": settings.version} if settings.version else {}
    return Tracing.start(settings.tracing, settings.service, attributes)


def _settings() -> ServerSettings:
    return ServerSettings(
        header_timeout=_LISTENER.header_timeout, idle_timeout=_LISTENER.idle_timeout
    )


def _return_free_memory() -> None:
    """Give the allocator's free pages back to the system: building the models at start
    leaves megabytes of freed heap a sidecar would otherwise keep for its lifetime."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def _default_address() -> str:
    """This host's address as other hosts reach it (the one a default route leaves by)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def _json(status: int, doc: object) -> Response:
    return Response(status, json.dumps(doc).encode(), content_type="application/json")


class _AdminHandler:
    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar

    def handle(self, exchange: Exchange) -> Response:
        request = exchange.request
        sidecar = self.sidecar
        path = request.path
        if path == "/quitquitquit":
            if request.method != "POST":
                return problem(405, "Method Not Allowed", "POST /quitquitquit drains and exits")
            sidecar.quit()
            return _json(200, {"status": "draining"})
        if request.method not in ("GET", "HEAD"):
            return problem(
                405, "Method Not Allowed", "the admin port is read-only but for POST /quitquitquit"
            )
        if path == "/healthz":
            return _json(200, {"status": "ok"})
        if path == "/readyz":
            if sidecar.ready:
                return _json(200, {"status": "ready"})
            reason = (
                "draining"
                if sidecar.draining
                else "the app is not ready"
                if not sidecar.app_ready
                else "no workload certificate from the control plane yet"
                if sidecar.identity_client is not None and sidecar.identity is None
                else "no mesh configuration from the control plane yet"
            )
            return _json(503, {"status": "unavailable", "reason": reason})
        if path == "/metrics":
            return Response(200, sidecar.metrics.render(), content_type=CONTENT_TYPE)
        if path == "/config":
            return _json(200, sidecar.describe())
        if path == "/clusters":
            return _json(200, sidecar.clusters())
        return problem(
            404,
            "Not Found",
            "admin paths: /healthz /readyz /metrics /config /clusters, POST /quitquitquit",
        )

    def on_response(self, exchange: Exchange, status: int, headers: Headers) -> None:
        pass

    def on_complete(self, exchange: Exchange) -> None:
        pass


def run_sidecar(
    settings: SidecarSettings,
    *,
    config: MeshConfig | None = None,
    config_path: Path | None = None,
    control_plane: ControlPlaneSettings | None = None,
    app_command: list[str] | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT (or the app exits); the exit status to use. The mesh
    configuration is ``config`` (read from ``config_path``, which SIGHUP reads again) or
    comes from the control plane."""
    import uvloop

    async def main() -> int:
        sidecar = Sidecar(
            settings,
            config=config,
            config_path=config_path,
            control_plane=control_plane,
            app_command=app_command,
        )
        return await sidecar.run()

    return uvloop.run(main())
