"""The mesh's traffic configuration and a sidecar's own settings.

One :class:`MeshConfig` is shared by every sidecar of an environment: the services, how their
calls are routed (Istio's VirtualService, the Gateway API's HTTPRoute) and how their instances
are balanced, limited and ejected (Istio's DestinationRule). A control plane serves it as the
mesh snapshot; a sidecar started with ``--config`` reads it from its file, beside a ``sidecar``
section (:class:`SidecarSettings`) that says which service this sidecar fronts.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, field_validator, model_validator

from meshgate.config._fields import (
    HeaderName,
    HostName,
    Problems,
    QueryName,
    _check_listen,
    _Strict,
)
from meshgate.config._parse import MAX_BYTES, ConfigError, _kind_of, _parse_yaml, _read, _validate
from meshgate.config.tracing import TracingSettings

__all__ = [
    "AbortFault",
    "AuthorizationPolicy",
    "AuthorizationRule",
    "ConsumerMatch",
    "HeaderCondition",
    "OperationMatch",
    "SourceMatch",
    "ConnectionPool",
    "ConsistentHash",
    "DelayFault",
    "Destination",
    "DestinationPolicy",
    "Fault",
    "HeaderChanges",
    "HeaderMatch",
    "HttpRoute",
    "Instance",
    "MeshConfig",
    "Mirror",
    "Mtls",
    "OutlierDetection",
    "PathMatch",
    "Readiness",
    "RetryBudget",
    "RetryPolicy",
    "RouteMatch",
    "Service",
    "SidecarConfig",
    "SidecarSettings",
    "StringMatch",
    "Subset",
    "Upstream",
    "load_mesh",
    "parse_mesh",
    "validate_mesh",
]

# Service names are DNS labels joined by dots: what an app writes as the host of its URL.
SERVICE_NAME = r"^[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?)*$"
_LABEL_KEY = r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}$"
_LABEL_VALUE = r"^[A-Za-z0-9_.\-]{0,63}$"
_SUBSET = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$"

ServiceName = Annotated[str, Field(pattern=SERVICE_NAME, max_length=253)]
LabelKey = Annotated[str, Field(pattern=_LABEL_KEY)]
LabelValue = Annotated[str, Field(pattern=_LABEL_VALUE)]
Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=32)]
Port = Annotated[int, Field(ge=1, le=65535)]
Percent = Annotated[float, Field(ge=0, le=100)]

# Istio's retry_on conditions, as Envoy names them.
RetryCondition = Literal[
    "connect-failure",
    "refused-stream",
    "unavailable",
    "5xx",
    "gateway-error",
    "reset",
    "retriable-status-codes",
]


def _check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from None
    return value


Regex = Annotated[str, Field(min_length=1, max_length=1024), AfterValidator(_check_regex)]


def _check_address(value: str) -> str:
    """An IP address or a host name (no port)."""
    try:
        ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9\-.]{0,251}[A-Za-z0-9])?", value):
            raise ValueError("must be an IP address or a host name") from None
    return value


Address = Annotated[str, AfterValidator(_check_address)]


def _check_ip(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError("must be an IP address") from None
    return value


class Instance(_Strict):
    """An instance of a service: where it listens, its version and labels, its zone."""

    address: Address = Field(description="IP address or host name the instance listens on.")
    port: Port
    version: LabelValue = Field("", description="The version label: what subsets select.")
    zone: LabelValue = Field("", description="Locality: the same zone is preferred.")
    labels: Labels = Field({}, description="Further labels subsets may select on.")
    weight: int = Field(1, ge=1, le=128, description="Relative share of this instance's load.")
    mtls: bool = Field(
        False,
        description="Its sidecar speaks mutual TLS: set by the registry for a sidecar with an "
        "identity; a static instance (no sidecar) never does.",
    )


class StringMatch(_Strict):
    """One of exact, prefix or regex (a full match)."""

    exact: str | None = Field(None, max_length=8192)
    prefix: str | None = Field(None, max_length=8192)
    regex: Regex | None = None

    @model_validator(mode="after")
    def _one(self) -> StringMatch:
        given = [k for k in ("exact", "prefix", "regex") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of exact, prefix, regex")
        return self


class PathMatch(StringMatch):
    """How a request path is matched; prefix matches whole segments (/api matches /api/x)."""

    @field_validator("exact", "prefix")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must start with /")
        return value


class HeaderMatch(StringMatch):
    """A header (or query parameter) value matched exactly, by prefix or regex; with
    ``present`` only its presence (true) or absence (false) counts."""

    present: bool | None = None

    @model_validator(mode="after")
    def _one(self) -> HeaderMatch:
        given = [k for k in ("exact", "prefix", "regex", "present") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of exact, prefix, regex, present")
        return self


class RouteMatch(_Strict):
    """Every condition given must hold (an empty match holds for every request)."""

    path: PathMatch | None = None
    method: str | None = Field(None, pattern=r"^[A-Z]{1,20}$")
    headers: dict[HeaderName, HeaderMatch] = Field({}, max_length=32)
    query: dict[QueryName, HeaderMatch] = Field({}, max_length=32)


class Destination(_Strict):
    """Where a share of a route's requests goes: a subset of the route's service by default."""

    service: ServiceName | None = Field(None, description="Another service; this one if absent.")
    subset: str | None = Field(None, pattern=_SUBSET, description="A subset of that service.")
    weight: int = Field(100, ge=0, le=1_000_000)


class RetryPolicy(_Strict):
    attempts: int = Field(2, ge=0, le=10, description="Retries after the first attempt.")
    per_try_timeout: float | None = Field(
        None, gt=0, description="Seconds each attempt may wait for the response head."
    )
    # Istio's default: connection failures, and 503 (an instance that is shutting down or
    # overloaded answers it; another one may not).
    retry_on: list[RetryCondition] = Field(
        ["connect-failure", "refused-stream", "unavailable", "retriable-status-codes"],
        description="Conditions that are retried (Envoy's names).",
    )
    retriable_status_codes: list[Annotated[int, Field(ge=100, le=599)]] = Field(
        [503], max_length=32, description="Statuses retried with retry-on retriable-status-codes."
    )


class DelayFault(_Strict):
    seconds: float = Field(gt=0, le=3600)
    percent: Percent = 100


class AbortFault(_Strict):
    status: int = Field(ge=200, le=599)
    percent: Percent = 100


class Fault(_Strict):
    """Errors injected before the request leaves the caller's sidecar (chaos testing)."""

    delay: DelayFault | None = None
    abort: AbortFault | None = None


class Mirror(_Strict):
    """A copy of a share of the requests, sent without waiting for its answer."""

    service: ServiceName | None = Field(None, description="This route's service if absent.")
    subset: str | None = Field(None, pattern=_SUBSET)
    percent: Percent = 100


class HeaderOps(_Strict):
    set: dict[HeaderName, Annotated[str, Field(max_length=8192, pattern=r"^[^\r\n\x00]*$")]] = {}
    add: dict[HeaderName, Annotated[str, Field(max_length=8192, pattern=r"^[^\r\n\x00]*$")]] = {}
    remove: list[HeaderName] = []


class HeaderChanges(_Strict):
    request: HeaderOps = HeaderOps()
    response: HeaderOps = HeaderOps()


class HttpRoute(_Strict):
    """An HTTP route of a service; the first route whose match holds takes the request."""

    name: str | None = Field(None, pattern=_SUBSET)
    match: list[RouteMatch] = Field(
        [], max_length=64, description="Any of these (all requests when empty)."
    )
    destinations: list[Destination] = Field(
        [Destination()], min_length=1, max_length=64, description="Weighted destinations."
    )
    timeout: float | None = Field(
        None, gt=0, description="Seconds for the whole call, retries included."
    )
    retries: RetryPolicy | None = Field(
        None, description="Istio's default when absent: 2 retries on connection failures and 503."
    )
    fault: Fault | None = None
    mirror: Mirror | None = None
    headers: HeaderChanges | None = None

    @model_validator(mode="after")
    def _weights(self) -> HttpRoute:
        if sum(d.weight for d in self.destinations) <= 0:
            raise ValueError("destinations: at least one weight must be above 0")
        return self


class Subset(_Strict):
    name: str = Field(pattern=_SUBSET)
    labels: Labels = Field(description="Instances whose labels (version included) match.")


class ConsistentHash(_Strict):
    """Requests with the same key go to the same instance while it stays (a hash ring)."""

    header: HeaderName | None = None
    cookie: str | None = Field(None, pattern=r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
    source_ip: bool = False

    @model_validator(mode="after")
    def _one(self) -> ConsistentHash:
        given = (self.header is not None) + (self.cookie is not None) + self.source_ip
        if given != 1:
            raise ValueError("give exactly one of header, cookie, source_ip")
        return self


class ConnectionPool(_Strict):
    """Limits whose overflow is a fast 503, never a queue (circuit breaking)."""

    max_connections: int = Field(
        1024, ge=1, le=1_000_000, description="Connections open to each instance at once."
    )
    max_requests: int = Field(
        1024, ge=1, le=1_000_000, description="Requests in flight to the service at once."
    )
    connect_timeout: float = Field(10, gt=0, le=300)
    idle: int = Field(64, ge=0, le=100_000, description="Idle connections kept per instance.")


class OutlierDetection(_Strict):
    """Instances that fail are ejected for a while (Istio's defaults)."""

    consecutive_5xx: int = Field(5, ge=1, le=1_000_000)
    consecutive_gateway_errors: int | None = Field(None, ge=1, le=1_000_000)
    interval: float = Field(10, gt=0, le=3600, description="Seconds between analyses.")
    base_ejection_time: float = Field(
        30, gt=0, le=86400, description="Seconds, times the number of ejections so far."
    )
    max_ejection_percent: Percent = Field(10, description="At least one is always allowed.")


class RetryBudget(_Strict):
    """Retries may add at most this share of extra load, plus a floor (Linkerd's budget)."""

    percent: Percent = 20
    min_retries_per_second: float = Field(10, ge=0, le=1_000_000)
    ttl: float = Field(10, gt=0, le=3600, description="Seconds of history the ratio covers.")


LoadBalancer = Literal["round_robin", "least_request", "peak_ewma", "random"]


class DestinationPolicy(_Strict):
    load_balancer: LoadBalancer = "round_robin"
    consistent_hash: ConsistentHash | None = Field(
        None, description="Overrides load_balancer: a key keeps to one instance."
    )
    connection_pool: ConnectionPool = ConnectionPool()
    outlier_detection: OutlierDetection | None = OutlierDetection()
    locality: bool = Field(True, description="Prefer instances in the caller's zone.")
    retry_budget: RetryBudget = RetryBudget()


class Mtls(_Strict):
    """How the service's instances take calls (Istio's PeerAuthentication): ``strict`` only
    mutual TLS, ``permissive`` mutual TLS and plaintext on one port, ``disable`` plaintext."""

    mode: Literal["strict", "permissive", "disable"] = "permissive"


def _check_pattern(value: str) -> str:
    """Istio's value forms: exact, ``prefix*``, ``*suffix`` or ``*`` (any non-empty value)."""
    if value != "*" and "*" in value[1:-1]:
        raise ValueError(
            f"{value[:80]!r}: '*' may only start or end a value (a suffix or a prefix match), "
            "as in Istio; regular expressions are not supported"
        )
    if value.startswith("*") and value.endswith("*") and value != "*":
        raise ValueError(f"{value[:80]!r}: give a prefix (a*) or a suffix (*a), not both")
    return value


# A value an authorization rule matches; control characters could never be on the wire.
Pattern = Annotated[
    str,
    Field(min_length=1, max_length=1024, pattern=r"^[^\x00-\x1f\x7f]+$"),
    AfterValidator(_check_pattern),
]
Patterns = Annotated[list[Pattern], Field(min_length=1, max_length=256)]
_Method = Annotated[str, Field(pattern=r"^[A-Z]{1,20}$")]


class SourceMatch(_Strict):
    """Who calls: the caller's SPIFFE ID, proved by mutual TLS (``spiffe://`` optional, as
    Istio writes ``cluster.local/ns/default/sa/sleep``)."""

    principals: Patterns | None = None
    not_principals: Patterns | None = None


class OperationMatch(_Strict):
    """What is asked: paths and methods."""

    paths: Patterns | None = None
    not_paths: Patterns | None = None
    methods: Annotated[list[_Method], Field(min_length=1, max_length=64)] | None = None
    not_methods: Annotated[list[_Method], Field(min_length=1, max_length=64)] | None = None

    @field_validator("paths", "not_paths")
    @classmethod
    def _paths(cls, values: list[str] | None) -> list[str] | None:
        for value in values or ():
            if not value.startswith(("/", "*")):
                raise ValueError(f"{value[:80]!r}: a path starts with / (or * for a suffix)")
        return values


class HeaderCondition(_Strict):
    """A request header's value: one of ``values``, none of ``not_values``."""

    header: HeaderName
    values: Patterns | None = None
    not_values: Patterns | None = None

    @model_validator(mode="after")
    def _some(self) -> HeaderCondition:
        if self.values is None and self.not_values is None:
            raise ValueError("give values, not_values or both")
        return self


_ConsumerValues = Annotated[list[Pattern], Field(min_length=1, max_length=1024)]


class ConsumerMatch(_Strict):
    """The API consumer the edge gateway authenticated (its verified consumer token): a
    rule with ``consumer`` holds only for requests that carry one."""

    applications: _ConsumerValues | None = None
    plans: _ConsumerValues | None = None
    products: _ConsumerValues | None = None
    accounts: _ConsumerValues | None = None


class AuthorizationRule(_Strict):
    """Every part given must hold; within a list, any value (Istio's rule)."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    source: SourceMatch | None = Field(None, alias="from")
    to: OperationMatch | None = None
    when: list[HeaderCondition] = Field([], max_length=32)
    consumer: ConsumerMatch | None = None


class AuthorizationPolicy(_Strict):
    """Istio's AuthorizationPolicy on the service's inbound side: deny policies first, then,
    when the service has any allow policy, a request must match one."""

    name: str = Field(pattern=_SUBSET)
    action: Literal["allow", "deny"] = "allow"
    rules: list[AuthorizationRule] = Field(
        [],
        max_length=64,
        description="Any of them; none matches nothing (an allow policy without rules "
        "allows nothing).",
    )


class Service(_Strict):
    name: ServiceName
    protocol: Literal["http", "http2", "tcp"] = Field(
        "http",
        description="How sidecars call its instances: http (HTTP/1.1), http2 (cleartext "
        "HTTP/2: gRPC services, streams and trailers end to end) or tcp (bytes relayed).",
    )
    virtual_ip: str | None = Field(
        None, description="The address apps call under transparent capture (a ClusterIP)."
    )
    port: Port = Field(80, description="The port apps call it on (transparent capture).")
    instances: list[Instance] = Field(
        [], max_length=10_000, description="Static instances (without a sidecar)."
    )
    subsets: list[Subset] = Field([], max_length=64)
    policy: DestinationPolicy = DestinationPolicy()
    mtls: Mtls = Field(Mtls(), description="Mutual TLS to its sidecars (permissive if absent).")
    routes: list[HttpRoute] = Field(
        [], max_length=256, description="HTTP routes; all requests to all instances if none."
    )
    authorization: list[AuthorizationPolicy] = Field(
        [],
        max_length=64,
        description="Checked by the service's own sidecars on every request they receive.",
    )

    _vip = field_validator("virtual_ip")(
        classmethod(lambda cls, v: None if v is None else _check_ip(v))
    )

    @model_validator(mode="after")
    def _coherent(self) -> Service:
        problems = []
        names = [s.name for s in self.subsets]
        if len(set(names)) != len(names):
            problems.append("subset names must be unique")
        policies = [p.name for p in self.authorization]
        if len(set(policies)) != len(policies):
            problems.append("authorization policy names must be unique")
        if self.protocol == "tcp" and self.authorization:
            problems.append("authorization is for http services; a tcp service has none yet")
        if self.protocol == "tcp" and self.routes:
            problems.append("routes are for http services; a tcp service has none")
        for i, instance in enumerate(self.instances):
            if instance.mtls:
                problems.append(
                    f"instances[{i}].mtls: a static instance has no sidecar, so no identity; "
                    "the registry marks the instances whose sidecar speaks mutual TLS"
                )
        for i, route in enumerate(self.routes):
            for j, d in enumerate(route.destinations):
                if d.service is None and d.subset is not None and d.subset not in names:
                    problems.append(
                        f"routes[{i}].destinations[{j}]: subset {d.subset!r} is not one of "
                        f"this service's subsets ({', '.join(names) or 'none'})"
                    )
        if problems:
            raise Problems(problems)
        return self


class MeshConfig(_Strict):
    """The traffic configuration every sidecar of an environment shares."""

    services: list[Service] = Field([], max_length=10_000)
    version: str | None = Field(None, description="Set by a control plane.")

    @model_validator(mode="after")
    def _references(self) -> MeshConfig:
        problems = []
        by_name = {s.name: s for s in self.services}
        if len(by_name) != len(self.services):
            names = [s.name for s in self.services]
            dup = sorted({n for n in names if names.count(n) > 1})
            problems.append(f"service names must be unique: {', '.join(dup)} given twice")
        vips = [s.virtual_ip for s in self.services if s.virtual_ip is not None]
        if len(set(vips)) != len(vips):
            problems.append("virtual_ip must be unique among services")
        for i, service in enumerate(self.services):
            for j, route in enumerate(service.routes):
                refs = [
                    (f"destinations[{k}]", d.service, d.subset)
                    for k, d in enumerate(route.destinations)
                ]
                if route.mirror is not None:
                    refs.append(("mirror", route.mirror.service, route.mirror.subset))
                for where, other, subset in refs:
                    if other is None:
                        continue
                    target = by_name.get(other)
                    if target is None:
                        problems.append(
                            f"services[{i}].routes[{j}].{where}: no service named {other!r}"
                        )
                    elif subset is not None and subset not in {s.name for s in target.subsets}:
                        problems.append(
                            f"services[{i}].routes[{j}].{where}: service {other!r} has no "
                            f"subset {subset!r}"
                        )
        if problems:
            raise Problems(problems)
        return self

    def service(self, name: str) -> Service | None:
        for s in self.services:
            if s.name == name:
                return s
        return None


class Readiness(_Strict):
    """How the sidecar knows its app is ready: an HTTP GET answering 2xx, or a TCP connect."""

    http: str | None = Field(None, pattern=r"^/[\x21-\x7e]*$", description="Path to GET.")
    tcp: bool = False
    interval: float = Field(1, gt=0, le=300)
    timeout: float = Field(1, gt=0, le=300)

    @model_validator(mode="after")
    def _one(self) -> Readiness:
        if (self.http is None) == (not self.tcp):
            raise ValueError("give http (a path) or tcp: true")
        return self


class Upstream(_Strict):
    """A local port that reaches a service (as Consul's upstreams): no proxy setting needed."""

    service: ServiceName
    local_port: Port
    local_address: HostName = "127.0.0.1"


Listen = Annotated[str, AfterValidator(_check_listen)]


class SidecarSettings(_Strict):
    """The process beside one instance of a service."""

    service: ServiceName
    version: LabelValue = ""
    zone: LabelValue = ""
    labels: Labels = {}
    app_port: Port
    app_address: HostName = "127.0.0.1"
    app_protocol: Literal["http", "http2", "tcp"] = Field(
        "http", description="What the app speaks: http (HTTP/1.1), http2 (h2c, gRPC) or tcp."
    )
    readiness: Readiness = Readiness(tcp=True)
    inbound: Listen = Field("0.0.0.0:15006", description="What other services' sidecars call.")
    advertise: str | None = Field(
        None, description="The address registered for this instance; the inbound one's if absent."
    )
    outbound: Listen | None = Field(
        "127.0.0.1:15001",
        description="The app's HTTP proxy (http_proxy=http://HOST:PORT); also takes "
        "connections redirected by iptables (transparent capture).",
    )
    admin: Listen | None = Field("127.0.0.1:15000", description="/healthz, /readyz, /metrics.")
    upstreams: list[Upstream] = Field([], max_length=1024)
    drain_seconds: float = Field(20, ge=0, le=3600, description="Grace for in-flight requests.")
    access_log: bool = True
    tracing: TracingSettings = Field(
        TracingSettings(),
        description="W3C Trace Context and OTLP/HTTP export of the sidecar's spans.",
    )
    identity_cert: str | None = Field(
        None,
        max_length=4096,
        description="PEM chain (leaf first) naming this service's SPIFFE ID: an identity the "
        "operator brings (re-read on SIGHUP), with identity_key and trust_bundle.",
    )
    identity_key: str | None = Field(None, max_length=4096, description="Its PEM private key.")
    trust_bundle: str | None = Field(
        None, max_length=4096, description="PEM roots that peers' certificates chain to."
    )

    _advertise = field_validator("advertise")(
        classmethod(lambda cls, v: None if v is None else _check_address(v))
    )

    @model_validator(mode="after")
    def _ports(self) -> SidecarSettings:
        ports = [u.local_port for u in self.upstreams]
        if len(set(ports)) != len(ports):
            raise ValueError("upstreams: local_port must be unique")
        given = [self.identity_cert, self.identity_key, self.trust_bundle]
        if any(v is not None for v in given) and not all(given):
            raise ValueError("identity_cert, identity_key and trust_bundle go together: give all")
        return self


class SidecarConfig(MeshConfig):
    """A sidecar's file: its own settings and, standalone, the mesh configuration."""

    sidecar: SidecarSettings | None = None


def load_mesh(
    path: str | os.PathLike[str],
    *,
    sidecar: Mapping[str, Any] | None = None,
    max_bytes: int = MAX_BYTES,
) -> SidecarConfig:
    """Read and validate a sidecar's file: its ``sidecar`` settings and the mesh's services.

    ``sidecar`` holds settings given another way (command-line flags): they override the
    file's, and are checked with them."""
    source = os.fspath(path)
    return parse_mesh(_read(source, max_bytes), source, sidecar=sidecar, max_bytes=max_bytes)


def parse_mesh(
    text: str | bytes,
    source: str = "<string>",
    *,
    sidecar: Mapping[str, Any] | None = None,
    max_bytes: int = MAX_BYTES,
) -> SidecarConfig:
    """Validate a mesh configuration (YAML or JSON), with every error and its path."""
    data = _parse_yaml(text, source, max_bytes)
    if sidecar:
        section = data.get("sidecar")
        merged = dict(section) if isinstance(section, dict) else {}
        for key, value in sidecar.items():
            # A flag sets one field of a section (tracing), not the whole section.
            if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
                value = {**merged[key], **value}
            merged[key] = value
        data["sidecar"] = merged
    return _validate(SidecarConfig, data, source)


def validate_mesh(data: Any, source: str = "<mesh snapshot>") -> MeshConfig:
    """A control plane's mesh snapshot, already parsed from JSON."""
    if not isinstance(data, dict):
        raise ConfigError([f"top level: must be a mapping, got {_kind_of(data)}"], source)
    return _validate(MeshConfig, data, source)
