"""The edge gateway: the engine's handler that turns a request into a product's decision.

rewrite phase (policies) -> access phase (credential, mapping rules, limits in one
counter call, policies) -> upstream -> response phase (RateLimit fields, policies) -> log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from meshgate.config import Application, Config, Product
from meshgate.config.model import UpstreamTls
from meshgate.gateway._usage import Tally
from meshgate.gateway.credentials import Authenticator, AuthError
from meshgate.gateway.mapping import MappingRules
from meshgate.limits import (
    BackendUnavailable,
    CounterBackend,
    Decision,
    LimitCheck,
    Usage,
    periods,
)
from meshgate.policies import PolicyChain
from meshgate.proxy import (
    BadTarget,
    Exchange,
    H2UpstreamPool,
    Headers,
    Response,
    UpstreamPool,
    client_context,
    problem,
    split_target,
)
from meshgate.telemetry.access_log import AccessLog
from meshgate.telemetry.metrics import GatewayMetrics
from meshgate.telemetry.tracing import SERVER, Tracing

if TYPE_CHECKING:
    from meshgate.identity import Identity
    from meshgate.identity.consumer import ConsumerSigner

# What gives the gateway's workload identity as it is now (None while it has none).
IdentitySource = Callable[[], "Identity | None"]

__all__ = ["Gateway", "LimitsOutage", "Pools", "ProductRuntime", "build_products"]

log = logging.getLogger("meshgate.gateway")

# The consumer token (see meshgate.identity.consumer): only the gateway sets it upstream.
CONSUMER_HEADER = "x-meshgate-consumer"
_CONSUMER = CONSUMER_HEADER.encode()

_WINDOW_SECONDS = {"minute": 60, "hour": 3600, "day": 86400, "week": 604800}

# Upstream pools, shared across products and reloads: one per address, timeouts, connection
# cap, protocol and TLS settings.
Pools = dict[tuple[object, ...], UpstreamPool | H2UpstreamPool]


class _State:
    """What the gateway learned about one request, kept on ``exchange.state``."""

    __slots__ = ("product", "application", "usage", "backend", "presumed")

    def __init__(self, product: ProductRuntime) -> None:
        self.product = product
        self.application = ""
        # Its usage counted its response as a forwarded 200 already (Tally.presumes).
        self.presumed = False
        # The most constrained limit: what the RateLimit fields report.
        self.usage: Usage | None = None
        # With several backends: the one chosen and the path it is sent.
        self.backend: tuple[_Backend, str] | None = None


class _Backend:
    """One of a product's backends: requests under ``path`` go to ``pool`` below ``base``."""

    __slots__ = ("path", "pool", "base")

    def __init__(self, path: str, pool: UpstreamPool | H2UpstreamPool, base: str) -> None:
        self.path = path
        self.pool = pool
        self.base = base


class ProductRuntime:
    """A product compiled for the request path: everything precomputed once per config."""

    def __init__(
        self,
        product: Product,
        pools: Pools,
        config: Config,
        identity: IdentitySource | None = None,
    ):
        self.config = product
        self.name = product.name
        self.prefix = product.path_prefix
        self.strip = product.strip_prefix
        timeouts = config.timeouts
        connect = product.upstream_connect_timeout or timeouts.upstream_connect
        respond = product.upstream_response_timeout or timeouts.upstream_response
        backends = []
        upstream_tls = product.upstream_tls
        for usage in product.backend_usages():
            scheme, host, port, base = _split_backend(usage.url)
            protocol = product.backend_protocol(usage)
            tls_key: tuple[object, ...] = ()
            if scheme == "https":
                tls_key = (
                    (None,) if upstream_tls is None else tuple(upstream_tls.model_dump().values())
                )
            cap = product.max_upstream_connections
            key = (host, port, connect, respond, cap, protocol, *tls_key)
            pool = pools.get(key)
            if pool is None:
                pool = pools[key] = _new_pool(
                    protocol, scheme, host, port, connect, respond, cap, upstream_tls, identity
                )
            pool.max_idle = config.upstream_keepalive
            backends.append(_Backend(usage.path, pool, base.rstrip("/")))
        # One backend at / (the common case) is the hot path: no routing by backend path.
        single = len(backends) == 1 and backends[0].path == "/"
        self.backends: tuple[_Backend, ...] | None = None if single else tuple(backends)
        self.pool = backends[0].pool
        self.base_path = backends[0].base
        self.auth = Authenticator.for_product(product)
        self.hide_credentials = product.hide_credentials
        self.rules = MappingRules(product)
        self.chain = PolicyChain.build(product.policies)
        self.max_body_size = product.max_body_size
        self.websocket = product.websocket
        self.limits: dict[str, dict[str, list[tuple[str, int]]]] = {}
        for plan in product.plans:
            by_metric: dict[str, list[tuple[str, int]]] = {}
            for lim in plan.limits:
                by_metric.setdefault(lim.metric, []).append((lim.period, lim.value))
            self.limits[plan.name] = by_metric
        self.scopes = {app.id: f"{product.name}/{app.id}" for app in product.applications}
        self.plan_of = {app.id: app.plan for app in product.applications}
        # LimitCheck validates on construction: build each (plan, metric, increment) once.
        self._checks: dict[tuple[str, str, int], tuple[LimitCheck, ...]] = {}

    def checks(self, plan: str, deltas: dict[str, int]) -> Sequence[LimitCheck]:
        by_metric = self.limits.get(plan)
        if not by_metric:
            return ()
        cache = self._checks
        if len(deltas) == 1:
            # Most requests count one metric: its checks as built, no list.
            for metric, increment in deltas.items():
                built = cache.get((plan, metric, increment))
                if built is not None:
                    return built
        out: list[LimitCheck] = []
        for metric, increment in deltas.items():
            key = (plan, metric, increment)
            built = cache.get(key)
            if built is None:
                built = cache[key] = tuple(
                    LimitCheck(metric, period, value, increment)
                    for period, value in by_metric.get(metric, ())
                )
            out += built
        return out

    def all_checks(self, plan: str) -> list[LimitCheck]:
        return [
            LimitCheck(metric, period, value, 0)
            for metric, limits in self.limits.get(plan, {}).items()
            for period, value in limits
        ]

    def target(self, route_path: str, query: str, bare_prefix: bool = False) -> str:
        path = self.base_path + self.forwarded_path(route_path, bare_prefix)
        if query:
            return f"{path}?{query}"
        return path or "/"

    def forwarded_path(self, route_path: str, bare_prefix: bool = False) -> str:
        """The path below the backend: without the prefix if stripped, else with it."""
        if self.strip:
            return route_path
        if bare_prefix:
            return self.prefix  # /v1 stays /v1, not /v1/
        return self.prefix.rstrip("/") + route_path

    def route(self, path: str) -> tuple[_Backend, str] | None:
        """The backend whose path is the longest prefix of ``path`` (a forwarded path), and
        what remains of it below that backend; None when no backend serves it."""
        for backend in self.backends or ():
            prefix = backend.path
            if prefix == "/":
                return backend, path
            if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
                return backend, path[len(prefix) :] or "/"
        return None


def _new_pool(
    protocol: str,
    scheme: str,
    host: str,
    port: int,
    connect: float,
    respond: float,
    cap: int,
    upstream_tls: UpstreamTls | None,
    identity: IdentitySource | None = None,
) -> UpstreamPool | H2UpstreamPool:
    if upstream_tls is not None and upstream_tls.mesh_service is not None:
        from meshgate.gateway._mesh_upstream import MeshUpstreamPool

        return MeshUpstreamPool(
            host,
            port,
            connect_timeout=connect,
            response_timeout=respond,
            max_connections=cap,
            service=upstream_tls.mesh_service,
            identity=identity or _no_identity,
        )
    tls = None
    if scheme == "https":
        tls = _client_tls(upstream_tls, alpn=("h2",) if protocol == "h2" else None)
    server_name = upstream_tls.server_name if upstream_tls is not None else None
    if protocol == "http1":
        return UpstreamPool(
            host,
            port,
            connect_timeout=connect,
            response_timeout=respond,
            tls=tls,
            server_name=server_name,
            max_connections=cap,
        )
    # One multiplexed HTTP/2 connection per backend: h2 over TLS (ALPN), h2c in cleartext.
    return H2UpstreamPool(
        host,
        port,
        connect_timeout=connect,
        response_timeout=respond,
        tls=tls,
        server_name=server_name,
    )


def _no_identity() -> Identity | None:
    return None


async def build_products(
    config: Config, pools: Pools, identity: IdentitySource | None = None
) -> list[ProductRuntime]:
    """The runtimes of ``config``'s products, built on the event loop one at a time, serving
    requests between them: a snapshot of 100 products and 100,000 keys takes 0.1 s to build,
    a millisecond or so a product."""
    products = []
    for product in config.products:
        products.append(ProductRuntime(product, pools, config, identity))
        await asyncio.sleep(0)
    return products


def _split_backend(url: str) -> tuple[str, str, int, str]:
    scheme, _, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    if authority.startswith("["):
        host, _, port = authority[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = authority.partition(":")
    return scheme, host, int(port or (443 if scheme == "https" else 80)), slash + path


def _client_tls(
    settings: UpstreamTls | None, alpn: tuple[str, ...] | None = None
) -> ssl.SSLContext:
    if settings is None:
        return client_context(alpn=alpn)
    return client_context(
        ca_file=settings.ca_file,
        verify=settings.verify,
        cert=settings.client_cert,
        key=settings.client_key,
        alpn=alpn,
    )


class _Router:
    """Host, then longest path prefix on a segment boundary."""

    def __init__(self, products: Iterable[ProductRuntime]) -> None:
        exact: dict[str, list[ProductRuntime]] = {}
        suffix: list[tuple[str, ProductRuntime]] = []
        anyhost: list[ProductRuntime] = []
        for p in products:
            for host in p.config.hosts:
                host = host.lower()
                if host == "*":
                    anyhost.append(p)
                elif host.startswith("*."):
                    suffix.append((host[1:], p))
                else:
                    exact.setdefault(host, []).append(p)
        order = lambda ps: sorted(ps, key=lambda p: len(p.prefix), reverse=True)  # noqa: E731
        self.exact = {h: order(ps) for h, ps in exact.items()}
        # The most specific suffix first (*.a.example.com before *.example.com), then prefix.
        self.suffix = sorted(suffix, key=lambda sp: (len(sp[0]), len(sp[1].prefix)), reverse=True)
        self.anyhost = order(anyhost)
        # Host field -> host without port, lowercased: the same few come on every request.
        self._hosts: dict[str, str] = {}

    def match(self, host: str, path: str) -> ProductRuntime | None:
        name = self._hosts.get(host)
        if name is None:
            name = host.rpartition(":")[0] if host.rfind(":") > host.rfind("]") else host
            name = name.lower()
            if len(self._hosts) < 1024:
                self._hosts[host] = name
        host = name
        candidates = self.exact.get(host)
        if candidates:
            found = _by_prefix(candidates, path)
            if found is not None:
                return found
        for sfx, p in self.suffix:
            if host.endswith(sfx) and _prefix_matches(p.prefix, path):
                return p
        return _by_prefix(self.anyhost, path)


def _prefix_matches(prefix: str, path: str) -> bool:
    return prefix == "/" or path == prefix or path.startswith(prefix) and path[len(prefix)] == "/"


def _by_prefix(products: list[ProductRuntime], path: str) -> ProductRuntime | None:
    for p in products:
        if _prefix_matches(p.prefix, path):
            return p
    return None


# (metric, period, limit, window) -> (RateLimit-Policy value, the policy's quoted name).
_POLICY_CACHE: dict[tuple[str, str, int, int | None], tuple[bytes, bytes]] = {}


def _ratelimit_fields(u: Usage) -> tuple[bytes, bytes]:
    """The ``RateLimit-Policy`` and ``RateLimit`` field values of one limit."""
    window = _WINDOW_SECONDS.get(u.period)
    if window is None and u.period != "eternity":
        # Calendar months and years differ in length: give the current window's.
        start, end = periods.window(u.period, time.time())
        window = (end or start) - start
    key = (u.metric, u.period, u.limit, window)
    cached = _POLICY_CACHE.get(key)
    if cached is None:
        if len(_POLICY_CACHE) > 4096:
            _POLICY_CACHE.clear()
        text = f'"{u.metric}-{u.period}";q={u.limit}' + (f";w={window}" if window else "")
        policy = text.encode()
        cached = _POLICY_CACHE[key] = (policy, policy[: policy.index(b";")])
    policy, name = cached
    if u.reset_seconds is None:
        return policy, b"%s;r=%d" % (name, u.remaining)
    return policy, b"%s;r=%d;t=%d" % (name, u.remaining, u.reset_seconds)


class LimitsOutage:
    """While the counter backend fails: one warning when that starts, one when it ends saying
    what became of the requests meanwhile, rather than a line for every request refused.

    One per gateway process, handed from each configuration's gateway to the next, so that
    a reload in the middle of an outage neither ends nor restarts it."""

    __slots__ = ("since", "refused", "allowed")

    def __init__(self) -> None:
        self.since: float | None = None
        self.refused = 0
        self.allowed = 0

    def failed(self, error: BackendUnavailable, deny: bool) -> None:
        """A request found the counter backend unavailable and was refused, or let through."""
        if self.since is None:
            self.since = time.monotonic()
            self.refused = self.allowed = 0
            log.warning(
                "usage limits unavailable, %s until the counter backend answers again: %s",
                "refusing requests (503)" if deny else "letting requests through uncounted",
                error,
            )
        if deny:
            self.refused += 1
        else:
            self.allowed += 1

    def answered(self) -> None:
        """The counter backend answered a request: an outage, if any, is over."""
        if self.since is not None:
            log.warning(
                "usage limits available again after %.1fs; meanwhile %d requests were refused "
                "(503) and %d let through uncounted",
                time.monotonic() - self.since,
                self.refused,
                self.allowed,
            )
            self.since = None


class Gateway:
    """The edge role's handler for the engine, built from one configuration."""

    def __init__(
        self,
        config: Config,
        counters: CounterBackend,
        metrics: GatewayMetrics,
        pools: Pools | None = None,
        access_log: AccessLog | None = None,
        products: list[ProductRuntime] | None = None,
        outage: LimitsOutage | None = None,
        tally: Tally | None = None,
        consumer_tokens: ConsumerSigner | None = None,
        identity: IdentitySource | None = None,
        *,
        tracing: Tracing | None = None,
    ) -> None:
        """``products``: the runtimes of ``config.products`` already built (with ``pools``),
        e.g. by :func:`build_products`; built here when None. ``outage``: the process's, kept
        across configurations. ``tally``: where usage for the control plane's reports is
        summed; None when nothing is reported. ``consumer_tokens``: signs the consumer token
        each request let through carries upstream; None sends none. ``identity``: the
        gateway's workload identity, for products that call the mesh (mesh_service).
        ``tracing``: the process's tracer, None when tracing is off."""
        self.config = config
        self.counters = counters
        self.metrics = metrics
        self.pools = pools if pools is not None else {}
        if products is None:
            products = [ProductRuntime(p, self.pools, config, identity) for p in config.products]
        self.products = products
        self.router = _Router(self.products)
        self.deny_on_backend_error = config.limits.on_backend_error == "deny"
        self.outage = outage if outage is not None else LimitsOutage()
        # Counters that never wait (memory) are called without a coroutine.
        self._check_nowait = getattr(counters, "check_and_increment_nowait", None)
        self.tally = tally
        # With counters that keep usage, it rides in their check (one round trip).
        self._metered = tally is not None and counters.keeps_usage
        self.access_log = (access_log or AccessLog()) if config.access_log else None
        self.tracing = tracing
        self.consumer_tokens = consumer_tokens

    def handle(self, exchange: Exchange) -> Response | None | Awaitable[Response | None]:
        """Decide without a coroutine when nothing has to wait (memory counters, no JWKS
        fetch); otherwise return an awaitable that finishes the decision."""
        request = exchange.request
        if self.tracing is not None:
            # Started or continued here; the upstream gets this span's id as its parent.
            exchange.span = self.tracing.http_hop(request.headers.raw(), request.method, SERVER)
        if request.headers.get_raw(_CONSUMER) is not None:
            # Only this gateway vouches for a consumer: never a client.
            request.headers.remove(CONSUMER_HEADER)
        product = self.router.match(request.host, request.path)
        if product is None:
            return problem(404, "Not Found", "no API product serves this host and path")
        if request.upgrade is not None and not product.websocket:
            return problem(
                403,
                "Forbidden",
                f"API product {product.name!r} does not allow protocol upgrades "
                f"(Upgrade: {request.upgrade}); its configuration says websocket: false",
            )
        exchange.state = _State(product)
        if product.prefix != "/":
            # Relative to the prefix either way: mapping rules and rewrites never see it, and
            # target() puts it back when it is not stripped.
            exchange.route_path = request.path[len(product.prefix) :] or "/"
        exchange.max_body_size = product.max_body_size
        chain = product.chain
        route_path = exchange.route_path
        response = chain.rewrite(exchange)
        if response is not None:
            return response
        if exchange.route_path is not route_path:
            # A rewrite may produce dot segments or // again: match what will be sent.
            try:
                exchange.route_path, _ = split_target(exchange.route_path.encode("latin-1"))
            except (BadTarget, UnicodeEncodeError) as exc:
                return problem(400, "Bad Request", f"the rewritten path is invalid: {exc}")
        if product.backends is not None:
            bare = exchange.route_path == "/" and request.path == product.prefix
            exchange.state.backend = product.route(
                product.forwarded_path(exchange.route_path, bare)
            )
            if exchange.state.backend is None:
                return problem(404, "Not Found", "no backend of this API product serves this path")
        # Body bytes that arrived with the head were read before the limit was known: the
        # engine checks only later ones, so a chunked body's early bytes are checked here.
        if exchange.max_body_size is not None and (
            max(request.content_length or 0, exchange.bytes_in) > exchange.max_body_size
        ):
            return problem(
                413, "Content Too Large", f"the request body exceeds {exchange.max_body_size} bytes"
            )
        try:
            app = product.auth.authenticate_nowait(request)
        except AuthError as exc:
            return exc.response()
        if app is None:
            return self._authenticate_then_count(exchange, product)
        return self._count(exchange, product, app)

    async def _authenticate_then_count(
        self, exchange: Exchange, product: ProductRuntime
    ) -> Response | None:
        try:
            app = await product.auth.authenticate(exchange.request)
        except AuthError as exc:
            return exc.response()
        result = self._count(exchange, product, app)
        if isinstance(result, Response) or result is None:
            return result
        return await result

    def _count(
        self, exchange: Exchange, product: ProductRuntime, app: Application
    ) -> Response | None | Awaitable[Response | None]:
        request = exchange.request
        exchange.state.application = app.id
        deltas = product.rules.match(request.method, exchange.route_path, request.query)
        if deltas is None:
            return problem(404, "Not Found", "no mapping rule matches this method and path")
        checks = product.checks(app.plan, deltas)
        if checks:
            scope = product.scopes[app.id]
            nowait = self._check_nowait
            if nowait is None:
                return self._count_async(exchange, product, app, scope, checks, deltas)
            response = self._decide(product, app, nowait(scope, checks), exchange.state)
            if response is not None:
                return response
        tally = self.tally
        if tally is not None:
            tally.count(product.name, app.id, deltas, exchange.start)
            exchange.state.presumed = tally.presumes
        return self._forward(exchange, product, app)

    async def _count_async(
        self,
        exchange: Exchange,
        product: ProductRuntime,
        app: Application,
        scope: str,
        checks: Sequence[LimitCheck],
        deltas: dict[str, int],
    ) -> Response | None:
        tally = self.tally
        metered = None
        if tally is not None and self._metered:
            metered = tally.metered(product.name, app.id, deltas, exchange.start)
        try:
            decision = await self.counters.check_and_increment(scope, checks, usage=metered)
        except BackendUnavailable as exc:
            self.metrics.backend_errors.labels(self.config.limits.on_backend_error).inc()
            self.outage.failed(exc, self.deny_on_backend_error)
            if self.deny_on_backend_error:
                unavailable = problem(
                    503, "Service Unavailable", "usage limits cannot be checked right now"
                )
                unavailable.headers.set("retry-after", "1")
                return unavailable
        else:
            if self.outage.since is not None:
                self.outage.answered()
            refused = self._decide(product, app, decision, exchange.state)
            if refused is not None:
                return refused
            if tally is not None:
                if not self._metered:
                    tally.count(product.name, app.id, deltas, exchange.start)
                exchange.state.presumed = tally.presumes
        return self._forward(exchange, product, app)

    def _decide(
        self, product: ProductRuntime, app: Application, decision: Decision, state: _State
    ) -> Response | None:
        usages = decision.usages
        if not decision.allowed:
            return self._over_limit(product, app.id, decision.rejected, usages)
        state.usage = usages[0] if len(usages) == 1 else min(usages, key=_constraint)
        return None

    def _forward(
        self, exchange: Exchange, product: ProductRuntime, app: Application
    ) -> Response | None:
        response = product.chain.access(exchange)
        if response is not None:
            return response
        request = exchange.request
        if product.hide_credentials:
            product.auth.hide(request)
        signer = self.consumer_tokens
        if signer is not None:
            token = signer.token(product.name, app.id, app.name or "", app.account or "", app.plan)
            request.headers.raw().append((_CONSUMER, token))
        routed = exchange.state.backend
        if routed is not None:
            backend, path = routed
            exchange.upstream = backend.pool
            path = backend.base + path
            exchange.upstream_target = f"{path}?{request.query}" if request.query else path
            return None
        exchange.upstream = product.pool
        bare = exchange.route_path == "/" and request.path == product.prefix
        exchange.upstream_target = product.target(exchange.route_path, request.query, bare)
        return None

    def _over_limit(
        self, product: ProductRuntime, app: str, rejected: Usage | None, usages: list[Usage]
    ) -> Response:
        assert rejected is not None
        self.metrics.limit_rejections.labels(
            product.name, app, rejected.metric, rejected.period
        ).inc()
        response = problem(
            429,
            "Too Many Requests",
            f"the {rejected.period} limit of {rejected.limit} on {rejected.metric} is reached",
            metric=rejected.metric,
            period=rejected.period,
            limit=rejected.limit,
        )
        policy, current = _ratelimit_fields(rejected)
        if rejected.reset_seconds is not None:
            response.headers.set("retry-after", str(max(1, rejected.reset_seconds)))
        raw = response.headers.raw()
        raw.append((b"ratelimit-policy", policy))
        raw.append((b"ratelimit", current))
        return response

    def on_response(self, exchange: Exchange, status: int, headers: Headers) -> None:
        state = exchange.state
        tally = self.tally
        if state is None:
            if tally is not None:
                tally.respond("", "", status, exchange.upstream is not None, exchange.start)
            return
        if tally is not None:
            tally.respond(
                state.product.name,
                state.application,
                status,
                exchange.upstream is not None,
                exchange.start,
                state.presumed,
            )
            state.presumed = False
        usage = state.usage
        if usage is not None and status != 429:
            policy, current = _ratelimit_fields(usage)
            raw = headers.raw()
            raw.append((b"ratelimit-policy", policy))
            raw.append((b"ratelimit", current))
        state.product.chain.response(exchange, status, headers)

    def on_complete(self, exchange: Exchange) -> None:
        state = exchange.state
        product = state.product.name if state is not None else ""
        app = state.application if state is not None else ""
        duration = exchange.end - exchange.start
        upstream = (
            exchange.upstream_headers_at - exchange.upstream_start
            if exchange.upstream_headers_at
            else None
        )
        self.metrics.observe(product, app, exchange.status, duration, upstream)
        tally = self.tally
        if tally is not None:
            if exchange.response_headers is not None:
                tally.complete(product, duration, exchange.start)
            if state is not None and state.presumed:
                tally.unanswered(product, app, exchange.start)
        if exchange.error and exchange.upstream is not None and exchange.status >= 500:
            self.metrics.upstream_errors.labels(product, str(exchange.status)).inc()
        if state is not None:
            try:
                state.product.chain.log(exchange)
            except Exception:
                log.exception("policy log phase failed")
        if exchange.span is not None and self.tracing is not None:
            self._end_span(exchange, state)
        if self.access_log is not None:
            request = exchange.request
            entry = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "request_id": request.request_id,
                "client": request.client_ip,
                "method": request.method,
                "host": request.host,
                "path": request.path,
                "status": exchange.status,
                "bytes_in": exchange.bytes_in,
                "bytes_out": exchange.bytes_out,
                "duration_ms": round(duration * 1000, 3),
                "upstream_ms": round(upstream * 1000, 3) if upstream is not None else None,
                "product": product or None,
                "application": app or None,
            }
            if exchange.error:
                entry["error"] = exchange.error
            self.access_log.write(json.dumps(entry) + "\n")

    def _end_span(self, exchange: Exchange, state: _State | None) -> None:
        request = exchange.request
        attributes: dict[str, str | int] = {
            "http.request.method": request.method,
            "url.path": request.path,
            "url.scheme": request.scheme,
            "client.address": request.client_ip,
            "network.protocol.version": request.http_version,
            "meshgate.request_id": request.request_id,
        }
        name = request.method
        if state is not None:
            product = state.product
            name = f"{request.method} {product.prefix}"
            attributes["http.route"] = product.prefix
            attributes["meshgate.product"] = product.name
            if state.application:
                attributes["meshgate.application"] = state.application
        if exchange.upstream is not None:
            attributes["server.address"] = exchange.upstream.host
            attributes["server.port"] = exchange.upstream.port
        try:
            self.tracing.end_http(  # type: ignore[union-attr]
                exchange.span,
                exchange.status,
                attributes,
                server=True,
                error=exchange.error,
                name=name,
            )
        except Exception:
            log.exception("ending the request's span failed")

    async def usage(self, application: str) -> list[dict[str, object]]:
        """Every metric and period of an application's plan, with value and remaining."""
        out: list[dict[str, object]] = []
        for product in self.products:
            plan = product.plan_of.get(application)
            if plan is None:
                continue
            usages = await self.counters.usage(
                product.scopes[application], product.all_checks(plan)
            )
            out.append(
                {
                    "product": product.name,
                    "plan": plan,
                    "limits": [
                        {
                            "metric": u.metric,
                            "period": u.period,
                            "value": u.value,
                            "limit": u.limit,
                            "remaining": u.remaining,
                            "reset_seconds": u.reset_seconds,
                        }
                        for u in usages
                    ],
                }
            )
        return out

    async def dismantle(self) -> None:
        """Free this replaced gateway's products one at a time, serving requests between them:
        dropped at once, 100 products and 100,000 keys take the loop for tens of milliseconds.

        Requests in flight keep what they use (their product, this gateway's settings). The
        configuration's products are dropped only when nothing else holds the configuration."""
        config = self.config
        # This gateway, this frame and getrefcount's argument.
        models = config.products if sys.getrefcount(config) <= 3 else []
        del config
        self.router = _Router(())
        runtimes = self.products
        while runtimes or models:
            if runtimes:
                runtimes.pop()
            if models:
                models.pop()
            await asyncio.sleep(0)

    def close_pools(self) -> None:
        for pool in self.pools.values():
            pool.close()


def _constraint(u: Usage) -> tuple[int, int]:
    """Most constrained first: the fewest remaining, then the latest reset."""
    return u.remaining, -(u.reset_seconds if u.reset_seconds is not None else sys.maxsize)
