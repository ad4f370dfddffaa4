"""The sidecar's handlers on the engine: outbound calls of the app, inbound calls to it.

Outbound, a request names a service (its ``Host``, the local port it came to, or the
address iptables redirected), is matched against that service's routes, and goes to an
instance its cluster picks, with the route's timeout, retries within the service's retry
budget, faults, mirror and header changes. Inbound, requests go to the local app. Both
report Istio's standard metrics and a JSON access log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from random import Random
from typing import TYPE_CHECKING, Any

from meshgate.config.mesh import DestinationPolicy, Instance, MeshConfig, Service
from meshgate.mesh._authz import Authorizer
from meshgate.mesh._cluster import Cluster, Endpoint
from meshgate.mesh._metrics import MeshMetrics
from meshgate.mesh._mirror import send_copy
from meshgate.mesh._mtls import MUTUAL_TLS, PLAINTEXT, MtlsPool, PeerCheck, peer_identity
from meshgate.mesh._retry_budget import RetryBudget
from meshgate.mesh._routes import CompiledRoute, Target, compile_routes
from meshgate.proxy import Exchange, Headers, Response, UpstreamPool, problem
from meshgate.telemetry.access_log import AccessLog
from meshgate.telemetry.tracing import CLIENT, SERVER

if TYPE_CHECKING:
    from meshgate.config.mesh import SidecarSettings
    from meshgate.identity import Identity
    from meshgate.identity.consumer import Consumer, ConsumerVerifier
    from meshgate.telemetry.tracing import Tracing

__all__ = ["CONSUMER_HEADER", "Inbound", "Mesh", "Outbound", "ServiceRuntime", "tls_principal"]

log = logging.getLogger("meshgate.mesh")

# Bodies up to this size are read before forwarding when a retry or a mirror may need
# them again (Envoy buffers as much for retries); larger ones stream and are not retried.
REPLAY_LIMIT = 65536
# Without a route timeout, an attempt waits this long for the response head.
DEFAULT_RESPONSE_TIMEOUT = 60.0
# Who called, as the caller's sidecar tells the callee's (service/version).
SOURCE_HEADER = "x-meshgate-source"
_SOURCE = re.compile(rb"[a-z0-9][a-z0-9.\-]{0,252}/[A-Za-z0-9_.\-]{0,63}")
# The API consumer's token, as the edge gateway signed it (see meshgate.identity.consumer).
CONSUMER_HEADER = "x-meshgate-consumer"
_CONSUMER = CONSUMER_HEADER.encode()
# Distinct applications that get their own label values in a sidecar's request metrics;
# later ones are counted as "other".
MAX_CONSUMER_LABELS = 256


class ServiceRuntime:
    """A service as the request path uses it: compiled routes, its cluster, its budget."""

    __slots__ = ("name", "config", "routes", "cluster", "budget", "static")

    def __init__(self, config: Service, cluster: Cluster) -> None:
        self.name = config.name
        self.config = config
        self.routes: list[CompiledRoute] = compile_routes(config.name, config.routes)
        self.cluster = cluster
        self.budget = RetryBudget(config.policy.retry_budget)
        self.static = bool(config.instances)


def _pool_factory(
    policy: DestinationPolicy, service: str, protocol: str = "http", mesh: Mesh | None = None
) -> Callable[[Instance], Any]:
    pool_settings = policy.connection_pool

    def make(instance: Instance) -> Any:
        return new_pool(
            instance.address,
            instance.port,
            protocol,
            service,
            connect_timeout=pool_settings.connect_timeout,
            max_idle=pool_settings.idle,
            max_connections=pool_settings.max_connections,
            mesh=mesh,
        )

    return make


def new_pool(
    address: str,
    port: int,
    protocol: str,
    host: str,
    *,
    connect_timeout: float,
    max_idle: int = 64,
    max_connections: int | None = None,
    mesh: Mesh | None = None,
) -> Any:
    """Connections to one instance: HTTP/1.1, or one multiplexed HTTP/2 connection
    (``http2``: gRPC and its trailers pass end to end). The callee sees ``host`` as the
    authority it was called by, as with Istio. With ``mesh`` (an instance of a mesh service)
    each new connection is mutual TLS when the instance's sidecar speaks it (see ``_mtls``)."""
    if protocol == "http2":
        h2: Any
        if mesh is not None:
            from meshgate.mesh._mtls_h2 import MtlsH2Pool

            peer = PeerCheck(mesh, host, (address, port), ("h2",))
            h2 = MtlsH2Pool(
                address,
                port,
                connect_timeout=connect_timeout,
                response_timeout=DEFAULT_RESPONSE_TIMEOUT,
                peer=peer,
            )
        else:
            from meshgate.proxy import H2UpstreamPool

            h2 = H2UpstreamPool(
                address,
                port,
                connect_timeout=connect_timeout,
                response_timeout=DEFAULT_RESPONSE_TIMEOUT,
            )
        h2.host_header = host.encode()
        return h2
    pool: UpstreamPool
    if mesh is not None:
        pool = MtlsPool(
            address,
            port,
            connect_timeout=connect_timeout,
            response_timeout=DEFAULT_RESPONSE_TIMEOUT,
            max_idle=max_idle,
            max_connections=max_connections,
            peer=PeerCheck(mesh, host, (address, port), ()),
        )
    else:
        pool = UpstreamPool(
            address,
            port,
            connect_timeout=connect_timeout,
            response_timeout=DEFAULT_RESPONSE_TIMEOUT,
            max_idle=max_idle,
            max_connections=max_connections,
        )
    pool.host_header = host.encode()
    return pool


class Mesh:
    """The sidecar's view of the mesh: services from the configuration, instances from the
    registry. Clusters outlive configuration changes, so endpoint state (ejections, load,
    connections) survives a new route table."""

    def __init__(
        self,
        settings: SidecarSettings,
        metrics: MeshMetrics,
        *,
        access_log: AccessLog | None = None,
        rng: Random | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.access_log = access_log
        self.rng = rng or Random()
        self.config = MeshConfig()
        self.services: dict[str, ServiceRuntime] = {}
        # Instances from the registry, by service: they outlive configuration changes.
        self.registered: dict[str, list[Instance]] = {}
        self.by_address: dict[tuple[str, int], str] = {}
        self.source = settings.service
        self.source_version = settings.version or "unknown"
        self.source_header = f"{settings.service}/{settings.version or 'unknown'}"
        self.version = ""
        # The sidecar's tracer, None when tracing is off.
        self.tracing: Tracing | None = None
        # This sidecar's workload identity (mutual TLS), set before listeners need it.
        self.identity: Identity | None = None
        # Per service, the instances (address, port) whose sidecar speaks mutual TLS.
        self.mtls_instances: dict[str, frozenset[tuple[str, int]]] = {}
        # (instance, the identity it answered with) already logged as a mismatch.
        self.mtls_logged: set[tuple[str, str]] = set()
        # The local service's authorization policies, compiled once per configuration.
        self.authorizer = Authorizer(settings.service, (), metrics.authz)

    def apply_config(self, config: MeshConfig) -> None:
        """Use a new (validated) configuration; services not in it keep defaults."""
        old = self.services
        services: dict[str, ServiceRuntime] = {}
        for svc in config.services:
            services[svc.name] = self._runtime(svc, old.get(svc.name))
        for name, runtime in old.items():
            if name not in services and name in self.registered:
                services[name] = self._runtime(Service(name=name), runtime)
        own = config.service(self.settings.service)
        self.authorizer = Authorizer(
            self.settings.service, own.authorization if own else (), self.metrics.authz
        )
        self.config = config
        self.services = services
        self.version = config.version or ""
        self.by_address = {
            (svc.virtual_ip, svc.port): svc.name
            for svc in config.services
            if svc.virtual_ip is not None
        }
        for name, runtime in old.items():
            if name not in services:
                runtime.cluster.set_endpoints(())

    def _runtime(self, config: Service, previous: ServiceRuntime | None) -> ServiceRuntime:
        if previous is not None and (
            previous.config.protocol != config.protocol
            or previous.config.policy.connection_pool != config.policy.connection_pool
        ):
            previous.cluster.set_endpoints(())  # its pools were made with the old settings
            previous = None
        if previous is not None:
            cluster = previous.cluster
            cluster.set_policy(config.policy, config.subsets)
        else:
            cluster = Cluster(
                config.name,
                config.policy,
                config.subsets,
                zone=self.settings.zone,
                pool_factory=_pool_factory(config.policy, config.name, config.protocol, self),
                rng=self.rng,
            )
        runtime = ServiceRuntime(config, cluster)
        instances = self.registered.get(config.name)
        if instances is None:
            instances = list(config.instances)
        cluster.set_endpoints(instances)
        if (
            previous is not None
            and previous.config.policy.retry_budget == config.policy.retry_budget
        ):
            runtime.budget = previous.budget
        return runtime

    def local_app(self) -> ServiceRuntime:
        """The app beside this sidecar as a one-instance service (what inbound TCP uses)."""
        s = self.settings
        config = Service(
            name=s.service,
            protocol=s.app_protocol,
            instances=[Instance(address=s.app_address, port=s.app_port, version=s.version)],
            policy=DestinationPolicy(outlier_detection=None, locality=False),
        )
        cluster = Cluster(
            s.service,
            config.policy,
            [],
            pool_factory=_pool_factory(config.policy, s.service, s.app_protocol),
            rng=self.rng,
        )
        cluster.set_endpoints(config.instances)
        return ServiceRuntime(config, cluster)

    def set_endpoints(self, service: str, instances: list[Instance]) -> None:
        """The registry's current instances of ``service`` (static ones included)."""
        self.registered[service] = instances
        self.mtls_instances[service] = frozenset((i.address, i.port) for i in instances if i.mtls)
        runtime = self.services.get(service)
        if runtime is None:
            runtime = self.services[service] = self._runtime(Service(name=service), None)
        else:
            runtime.cluster.set_endpoints(instances)

    def service_for_host(self, host: str) -> ServiceRuntime | None:
        """The service an authority (``payments``, ``payments:80``) names."""
        services = self.services
        runtime = services.get(host)
        if runtime is not None:
            return runtime
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return services.get(name.lower())

    def services_by_instance(self, address: str, port: int) -> ServiceRuntime | None:
        """The service one of whose instances listens at ``address:port``."""
        for runtime in self.services.values():
            for endpoint in runtime.cluster.endpoints:
                if endpoint.info.port == port and endpoint.info.address == address:
                    return runtime
        return None

    def service_at(self, address: str, port: int) -> ServiceRuntime | None:
        """The service whose virtual IP and port an app called (transparent capture)."""
        name = self.by_address.get((address, port))
        return self.services.get(name) if name is not None else None


class _Call:
    """One outbound request's state across attempts."""

    __slots__ = (
        "route",
        "service",
        "target",
        "endpoint",
        "attempt_start",
        "deadline",
        "retries_left",
        "flags",
        "key",
        "tried",
    )

    def __init__(self, route: CompiledRoute, service: ServiceRuntime, target: Target) -> None:
        self.route = route
        self.service = service
        self.target = target
        self.endpoint: Endpoint | None = None
        self.attempt_start = 0.0
        self.deadline = 0.0
        self.retries_left = route.retries.attempts
        self.flags = "-"
        self.key: bytes | None = None
        # Instances that failed an attempt: a retry goes elsewhere while it can.
        self.tried: list[Endpoint] | None = None


def _classify(status: int, error: str) -> str:
    """The retry condition an attempt that got no response met, from the engine's answer:
    a connection that never opened (nothing was sent) apart from one that broke later
    (the instance may have acted on the request)."""
    if status == 504:
        return "timeout"
    # Before 503: an instance answering with another identity is refused with a 503 too.
    if error.startswith(("cannot connect to", "connecting to ", "the TLS")):
        return "connect-failure"
    if status == 503:
        return "overflow"
    if "REFUSED_STREAM" in error:
        return "refused-stream"
    return "reset"


# Which retry_on conditions retry an attempt that got no response. A reset is retried only
# when asked for (reset, 5xx, gateway-error): the instance may have acted on the request.
_ERROR_RETRIED_BY = {
    "connect-failure": frozenset({"connect-failure", "5xx", "gateway-error"}),
    "refused-stream": frozenset({"refused-stream", "5xx", "gateway-error"}),
    "reset": frozenset({"reset", "5xx", "gateway-error"}),
    "timeout": frozenset({"5xx", "gateway-error", "reset"}),
    "overflow": frozenset({"refused-stream"}),
}
_FLAG = {
    "connect-failure": "UF",
    "refused-stream": "UC",
    "reset": "UC",
    "timeout": "UT",
    "overflow": "UO",
}
# The least time an attempt is given: a shorter one is answered 504 at once (the engine's
# timers never need to run finer than this).
MIN_ATTEMPT_SECONDS = 0.01


class Outbound:
    """The handler of the app's outbound calls; ``service`` fixes the destination (a local
    port declared for one upstream), else the request's authority names it."""

    def __init__(self, mesh: Mesh, service: str | None = None) -> None:
        self.mesh = mesh
        self.service = service
        self.clock = time.monotonic
        # The label values of each (service, version, status, flags) seen: built once.
        self.labels: dict[tuple[str, str, int, str, str], tuple[str, ...]] = {}

    def destination(self, exchange: Exchange) -> ServiceRuntime | None:
        mesh = self.mesh
        if self.service is not None:
            return mesh.services.get(self.service) or mesh.service_for_host(self.service)
        return mesh.service_for_host(exchange.request.host)

    def handle(self, exchange: Exchange) -> Response | None | Awaitable[Response | None]:
        request = exchange.request
        mesh = self.mesh
        if mesh.tracing is not None:
            # The app's call: a client span below the app's context, its id sent on.
            exchange.span = mesh.tracing.http_hop(request.headers.raw(), request.method, CLIENT)
        service = self.destination(exchange)
        if service is None:
            name = self.service or request.host or "(none)"
            return problem(
                404,
                "Not Found",
                f"no service {name!r} in the mesh: name one with the Host header",
                service=name,
            )
        for route in service.routes:
            if route.holds(request):
                break
        else:
            return problem(
                404, "Not Found", f"no route of service {service.name!r} matches this request"
            )
        rng = mesh.rng
        target = route.pick(rng)
        destination = mesh.services.get(target.service, service)
        call = _Call(route, destination, target)
        exchange.state = call
        if route.abort and rng.random() * 100 < route.abort_percent:
            call.flags = "FI"
            mesh.metrics.faults.labels(destination.name, "abort").inc()
            return problem(route.abort, "Fault Injected", "an abort fault of the mesh's route")
        destination.budget.request()
        cluster = destination.cluster
        call.key = cluster.hash_key(request)
        timeout = route.timeout
        if timeout is not None:
            call.deadline = self.clock() + timeout
        headers = request.headers
        if route.request_headers is not None:
            route.request_headers.apply(headers)
        headers.set(SOURCE_HEADER, mesh.source_header)
        exchange.upstream_target = (
            request.path + "?" + request.query if request.query else request.path
        )
        exchange.retry_statuses = route.retry_statuses
        delay = route.delay and rng.random() * 100 < route.delay_percent
        mirror = route.mirror is not None and rng.random() * 100 < route.mirror_percent
        replay = (
            request.has_body
            and (route.retries.attempts > 0 or mirror)
            and request.content_length is not None
            and request.content_length <= REPLAY_LIMIT
        )
        if delay or (mirror and request.has_body) or replay:
            return self._slow_path(exchange, call, bool(delay), mirror, bool(replay))
        if mirror:
            self._mirror(exchange, call, b"")
        return self._attempt(exchange, call)

    async def _slow_path(
        self, exchange: Exchange, call: _Call, delay: bool, mirror: bool, replay: bool
    ) -> Response | None:
        if delay:
            call.flags = "DI"
            self.mesh.metrics.faults.labels(call.service.name, "delay").inc()
            await asyncio.sleep(call.route.delay)
        body = b""
        if replay:
            body = await exchange.read_body(REPLAY_LIMIT)
        if mirror and (replay or not exchange.request.has_body):
            self._mirror(exchange, call, body)
        return self._attempt(exchange, call)

    def _attempt(
        self, exchange: Exchange, call: _Call, avoid: Endpoint | None = None
    ) -> Response | None:
        """Pick an instance and point the exchange at it; a local answer when none can take it."""
        if call.deadline and call.deadline - self.clock() < MIN_ATTEMPT_SECONDS:
            call.flags = "UT"
            timeout = call.route.timeout
            return problem(504, "Gateway Timeout", f"the route's timeout of {timeout}s has passed")
        service = call.service
        cluster = service.cluster
        endpoint = cluster.pick(call.target.subset, key=call.key, avoid=avoid)
        tried = call.tried
        if tried is not None and endpoint in tried:
            for _ in range(len(tried) + 1):
                again = cluster.pick(call.target.subset, key=call.key, avoid=endpoint)
                if again is None or again not in tried:
                    endpoint = again or endpoint
                    break
        if endpoint is None:
            call.flags = "UH"
            subset = f" (subset {call.target.subset})" if call.target.subset else ""
            return problem(
                503,
                "Service Unavailable",
                f"no healthy instance of service {service.name!r}{subset}",
            )
        if not cluster.begin(endpoint):
            call.flags = "UO"
            self.mesh.metrics.overflows.labels(service.name).inc()
            return problem(
                503,
                "Service Unavailable",
                f"service {service.name!r} already has "
                f"{service.config.policy.connection_pool.max_requests} requests in flight",
            )
        now = self.clock()
        call.endpoint = endpoint
        call.attempt_start = now
        exchange.upstream = endpoint.pool
        per_try = call.route.retries.per_try_timeout
        timeout = per_try
        if call.deadline:
            left = call.deadline - now
            timeout = left if timeout is None else min(timeout, left)
        exchange.timeout = timeout
        return None

    def retry(self, exchange: Exchange, status: int, error: str | None) -> bool:
        call: _Call | None = exchange.state
        if call is None or call.endpoint is None:
            return False
        now = self.clock()
        service = call.service
        failed = call.endpoint
        kind = _classify(status, error) if error is not None else None
        allowed = True
        if kind is not None:
            call.flags = _FLAG[kind]
            allowed = bool(_ERROR_RETRIED_BY[kind] & call.route.retry_errors)
            if kind == "overflow":
                # The instance never saw it (the pool was full here): not its failure.
                service.cluster.release(failed)
                call.endpoint = None
        if allowed and call.retries_left <= 0:
            call.flags = "URX"
            allowed = False
        if allowed and call.deadline and now >= call.deadline:
            allowed = False
        if allowed and not service.budget.try_retry():
            self.mesh.metrics.retry_budget_exhausted.labels(service.name).inc()
            allowed = False
        if not allowed:
            # The engine answers with this attempt's outcome; on_complete accounts for it.
            return False
        if call.endpoint is not None:
            service.cluster.end(failed, status, now - call.attempt_start, error=kind is not None)
            call.endpoint = None
        if call.tried is None:
            call.tried = [failed]
        else:
            call.tried.append(failed)
        call.retries_left -= 1
        if self._attempt(exchange, call, avoid=failed) is not None:
            exchange.upstream = failed.pool  # for the engine's own answer to the failure
            return False
        self.mesh.metrics.retries.labels(service.name).inc()
        return True

    def on_response(self, exchange: Exchange, status: int, headers: Headers) -> None:
        call: _Call | None = exchange.state
        if call is not None and call.route.response_headers is not None:
            call.route.response_headers.apply(headers)

    def on_complete(self, exchange: Exchange) -> None:
        call: _Call | None = exchange.state
        mesh = self.mesh
        status = exchange.status
        version = "unknown"
        if call is not None:
            service = call.service.name
            endpoint = call.endpoint
            if endpoint is not None:
                call.endpoint = None
                version = endpoint.info.version or "unknown"
                call.service.cluster.end(
                    endpoint,
                    status,
                    self.clock() - call.attempt_start,
                    error=exchange.error is not None and status >= 500,
                )
            flags = call.flags
        else:
            # Not the Host the client sent: a label of every name asked for would let any
            # client grow the metrics without bound.
            service = self.service or "unknown"
            flags = "NR"
        pool = exchange.upstream
        security = MUTUAL_TLS if pool is not None and pool.tls is not None else PLAINTEXT
        key = (service, version, status, flags, security)
        labels = self.labels.get(key)
        if labels is None:
            labels = (
                "source",
                mesh.source,
                mesh.source_version,
                service,
                service,
                service,
                version,
                "http",
                str(status),
                flags,
                security,
                "unknown",
                "unknown",
            )
            if len(self.labels) < 4096:
                self.labels[key] = labels
        duration = exchange.end - exchange.start
        mesh.metrics.request(labels, duration * 1000, exchange.bytes_in, exchange.bytes_out)
        if exchange.span is not None:
            _end_span(mesh, exchange, "outbound", service, flags)
        if mesh.access_log is not None:
            _log(mesh.access_log, exchange, "outbound", service, version, flags, duration)

    def _mirror(self, exchange: Exchange, call: _Call, body: bytes) -> None:
        mirror = call.route.mirror
        assert mirror is not None
        mesh = self.mesh
        service = mesh.services.get(mirror.service)
        if service is None:
            return
        endpoint = service.cluster.pick(mirror.subset)
        if endpoint is None:
            return
        mesh.metrics.mirrored.labels(service.name).inc()
        request = exchange.request
        peer = PeerCheck(mesh, service.name, endpoint.key, ())
        tls = peer.context()
        send_copy(
            endpoint.info.address,
            endpoint.info.port,
            request.method,
            exchange.upstream_target,
            f"{service.name}-shadow",
            request.headers.raw(),
            body,
            tls,
            peer.verify if tls is not None else None,
        )


def tls_principal(exchange: Exchange) -> str | None:
    """The caller's SPIFFE ID (a URI), as the client certificate verified by mutual TLS
    names it; None without mutual TLS."""
    peer = peer_identity(exchange)
    return peer.uri if peer is not None else None


class Inbound:
    """The handler of calls to the local app: the consumer token checked, the service's
    authorization policies applied, then the request forwarded to the app.

    ``principal`` says who called (the SPIFFE ID mutual TLS proved), from the exchange.
    Consumer tokens are verified with the workload's identity (``identity``, the mesh's by
    default); without one they are removed. Over mutual TLS the caller is who its
    certificate names: ``x-meshgate-source`` is rewritten to that workload (with the version
    its sidecar sent, when the header names the same workload)."""

    def __init__(
        self,
        mesh: Mesh,
        app: Any,
        *,
        principal: Callable[[Exchange], str | None] = tls_principal,
        identity: Callable[[], Identity | None] | None = None,
    ) -> None:
        self.mesh = mesh
        self.app = app
        self.principal = principal
        self.identity = identity or (lambda: mesh.identity)
        self._verifier: ConsumerVerifier | None = None
        self.labels: dict[tuple[str, int, str, str, str], tuple[str, ...]] = {}
        self.consumer_labels: set[str] = set()

    @property
    def verifier(self) -> ConsumerVerifier | None:
        """What checks consumer tokens: made from the mesh's identity when it is first needed
        (and again if another identity replaces it; renewals it follows by itself)."""
        identity = self.identity()
        if identity is None:
            return None
        verifier = self._verifier
        if verifier is None or verifier.identity is not identity:
            from meshgate.identity.consumer import ConsumerVerifier

            verifier = self._verifier = ConsumerVerifier(identity)
        return verifier

    def handle(self, exchange: Exchange) -> Response | None:
        request = exchange.request
        if request.tls is not None:
            peer = peer_identity(exchange)
            if peer is not None:
                _name_source(request.headers, peer.service)
        tracing = self.mesh.tracing
        if tracing is not None:
            # A server span below the caller's context; the app gets this span's id.
            exchange.span = tracing.http_hop(request.headers.raw(), request.method, SERVER)
        mesh = self.mesh
        consumer = None
        if request.headers.get_raw(_CONSUMER) is not None:
            consumer, refused = self._consumer(request.headers)
            if refused is not None:
                return refused
            exchange.state = consumer
        authorizer = mesh.authorizer
        principal = self.principal(exchange) if authorizer.uses_principal else None
        denied = authorizer.check(request, principal, consumer)
        if denied is not None:
            return denied
        exchange.upstream = self.app
        exchange.upstream_target = (
            request.path + "?" + request.query if request.query else request.path
        )
        return None

    def _consumer(self, headers: Headers) -> tuple[Consumer | None, Response | None]:
        """The verified consumer, or None with the header removed; or a 401 to answer."""
        counts = self.mesh.metrics.consumer_tokens
        verifier = self.verifier
        tokens = [v for k, v in headers.raw() if k == _CONSUMER]
        if verifier is None or len(tokens) != 1:
            # Unverifiable here, or ambiguous: the app never sees a claim nobody checked.
            headers.remove(CONSUMER_HEADER)
            counts.labels("unverified" if verifier is None else "invalid").inc()
            return None, None
        from meshgate.identity.consumer import ExpiredToken, InvalidToken

        try:
            consumer = verifier.verify(tokens[0])
        except ExpiredToken as exc:
            counts.labels("expired").inc()
            return None, problem(401, "Unauthorized", f"{exc}: call again through the gateway")
        except InvalidToken as exc:
            headers.remove(CONSUMER_HEADER)
            counts.labels("invalid").inc()
            log.debug("consumer token removed: %s", exc)
            return None, None
        counts.labels("valid").inc()
        return consumer, None

    def on_response(self, exchange: Exchange, status: int, headers: Headers) -> None:
        pass

    def on_complete(self, exchange: Exchange) -> None:
        mesh = self.mesh
        status = exchange.status
        request = exchange.request
        # Over mutual TLS, the header was set from the certificate (see handle).
        security = (
            MUTUAL_TLS
            if request.tls is not None and peer_identity(exchange) is not None
            else PLAINTEXT
        )
        source = request.headers.get_raw(b"x-meshgate-source")
        name = "unknown"
        if source is not None and len(source) <= 320 and _SOURCE.fullmatch(source):
            # Anything else a client sends stays out of the metrics' labels.
            name = source.decode("ascii")
        application = plan = "unknown"
        consumer: Consumer | None = exchange.state
        if consumer is not None:
            application, plan = consumer.application, consumer.plan
            known = self.consumer_labels
            if application not in known:
                if len(known) < MAX_CONSUMER_LABELS:
                    known.add(application)
                else:
                    application = plan = "other"
        key = (name, status, security, application, plan)
        labels = self.labels.get(key)
        if labels is None:
            workload, _, version = key[0].partition("/")
            labels = (
                "destination",
                workload,
                version or "unknown",
                mesh.source,
                mesh.source,
                mesh.source,
                mesh.source_version,
                "http",
                str(status),
                "-",
                security,
                application,
                plan,
            )
            if len(self.labels) < 4096:
                self.labels[key] = labels
        duration = exchange.end - exchange.start
        mesh.metrics.request(labels, duration * 1000, exchange.bytes_in, exchange.bytes_out)
        if exchange.span is not None:
            _end_span(mesh, exchange, "inbound", mesh.source, "-", name)
        if mesh.access_log is not None:
            _log(
                mesh.access_log,
                exchange,
                "inbound",
                mesh.source,
                mesh.source_version,
                "-",
                duration,
            )


def _name_source(headers: Headers, workload: str) -> None:
    """``x-meshgate-source`` as the caller's certificate names it: its workload, with the
    version its sidecar sent when the header names that same workload."""
    version = "unknown"
    sent = headers.get_raw(b"x-meshgate-source")
    if sent is not None and len(sent) <= 320 and _SOURCE.fullmatch(sent):
        named, _, sent_version = sent.decode("ascii").partition("/")
        if named == workload and sent_version:
            version = sent_version
    headers.set(SOURCE_HEADER, f"{workload}/{version}")


def _log(
    access_log: AccessLog,
    exchange: Exchange,
    direction: str,
    service: str,
    version: str,
    flags: str,
    duration: float,
) -> None:
    request = exchange.request
    entry: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "direction": direction,
        "request_id": request.request_id,
        "client": request.client_ip,
        "method": request.method,
        "authority": request.host,
        "path": request.path,
        "status": exchange.status,
        "flags": flags,
        "service": service,
        "version": version,
        "upstream": _upstream_address(exchange),
        "attempts": exchange.attempts,
        "bytes_in": exchange.bytes_in,
        "bytes_out": exchange.bytes_out,
        "duration_ms": round(duration * 1000, 3),
    }
    if exchange.error:
        entry["error"] = exchange.error
    access_log.write(json.dumps(entry) + "\n")


def _end_span(
    mesh: Mesh, exchange: Exchange, direction: str, service: str, flags: str, source: str = ""
) -> None:
    """Close a request's span with the HTTP attributes and the mesh's own."""
    request = exchange.request
    attributes: dict[str, str | int] = {
        "http.request.method": request.method,
        "url.path": request.path,
        "network.protocol.version": request.http_version,
        "meshgate.direction": direction,
        "meshgate.service": service,
        "meshgate.request_id": request.request_id,
    }
    if flags != "-":
        attributes["meshgate.flags"] = flags
    if source and source != "unknown":
        attributes["meshgate.source"] = source
    pool = exchange.upstream
    if pool is not None:
        attributes["server.address"] = pool.host
        attributes["server.port"] = pool.port
    if exchange.attempts > 1:
        attributes["meshgate.attempts"] = exchange.attempts
    tracing = mesh.tracing
    assert tracing is not None
    try:
        tracing.end_http(
            exchange.span,
            exchange.status,
            attributes,
            server=direction == "inbound",
            error=exchange.error,
            name=f"{request.method} {service}",
        )
    except Exception:
        log.exception("ending the request's span failed")


def _upstream_address(exchange: Exchange) -> str | None:
    pool = exchange.upstream
    if pool is None:
        return None
    return f"{pool.host}:{pool.port}"
