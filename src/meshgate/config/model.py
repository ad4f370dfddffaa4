"""The declarative gateway configuration: the same document a control plane snapshot carries."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from meshgate.config._fields import (  # noqa: F401 (re-exported)
    _FIELD_NAME_RE,
    _HOST,
    _HOST_RE,
    _HOSTPORT,
    _NAME,
    _QUERY_NAME,
    _QUERY_NAME_RE,
    _URL,
    _URL_RE,
    FIELD_NAME,
    HeaderName,
    HostName,
    Problems,
    QueryName,
    Url,
    _check_header_name,
    _check_host,
    _check_listen,
    _check_query_name,
    _check_url,
    _Strict,
)
from meshgate.config.identity import IdentityFiles
from meshgate.config.tracing import TracingSettings

PERIODS = ("minute", "hour", "day", "week", "month", "year", "eternity")
Period = Literal["minute", "hour", "day", "week", "month", "year", "eternity"]
# How the gateway speaks to a backend: HTTP/1.1, HTTP/2 over TLS (ALPN h2), or cleartext
# HTTP/2 with prior knowledge (h2c: gRPC servers without TLS).
BackendProtocol = Literal["http1", "h2", "h2c"]
_PROTOCOL_DOC = (
    "HTTP to the backend: http1 (HTTP/1.1), h2 (HTTP/2 over TLS, an https:// backend) or "
    "h2c (cleartext HTTP/2 with prior knowledge, e.g. a gRPC server without TLS)."
)
Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "ANY"]


class Metric(_Strict):
    name: str = Field(pattern=_NAME, description="Metric or method name, e.g. hits.")
    parent: str | None = Field(None, description="Parent metric; usage also counts there.")
    description: str = ""


class MappingRule(_Strict):
    method: Method = "ANY"
    pattern: str = Field(
        description="Literal segments and {name} wildcards, matched as a prefix unless it "
        "ends in $; required query parameters after ?, e.g. /search?q={q}."
    )
    metric: str
    increment: int = Field(1, ge=0, le=1_000_000)
    last: bool = Field(False, description="Stop evaluating further rules when this one matches.")

    @field_validator("pattern")
    @classmethod
    def _pattern_is_a_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with /")
        return value


class Limit(_Strict):
    metric: str
    period: Period
    value: int = Field(ge=0, description="Maximum usage in one window; 0 forbids the metric.")


class Plan(_Strict):
    name: str = Field(pattern=_NAME)
    limits: list[Limit] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_limit_per_metric_period(self) -> Plan:
        seen: set[tuple[str, str]] = set()
        for lim in self.limits:
            key = (lim.metric, lim.period)
            if key in seen:
                raise ValueError(f"two limits for metric {lim.metric!r} and period {lim.period!r}")
            seen.add(key)
        return self


KEY_HASH = r"^sha256:[0-9a-f]{64}$"


class Application(_Strict):
    id: str = Field(min_length=1, max_length=200)
    plan: str
    state: Literal["live", "suspended", "pending"] = Field(
        "live", description="Only live applications are admitted; the others get 403."
    )
    # default_factory, not []: a shared default is deep-copied per instance, and a snapshot
    # holds tens of thousands of applications.
    keys: list[str] = Field(
        default_factory=list,
        description="api_key: user keys; app_id_key: app keys for this application's id.",
    )
    key_hashes: list[Annotated[str, Field(pattern=KEY_HASH)]] = Field(
        default_factory=list,
        description="Keys as salted hashes (see the product's key_salt), as a control plane "
        "distributes them: the gateway hashes what it receives and compares.",
    )
    client_id: str | None = Field(
        None, description="jwt: value of the application claim; defaults to the id."
    )
    name: str | None = Field(
        None, max_length=200, description="Its name, as the consumer token tells the mesh."
    )
    account: str | None = Field(
        None, max_length=200, description="Its account's name, as the consumer token tells it."
    )
    certificates: list[ClientCertificate] = Field(
        default_factory=list,
        description="mtls: the client certificates that identify this application.",
    )


class ClientCertificate(_Strict):
    """A client certificate that identifies an application (``auth: {type: mtls}``): by
    its SHA-256 fingerprint, its subject, or one of its subject alternative names."""

    sha256: str | None = Field(
        None,
        pattern=r"^([0-9a-fA-F]{2}:?){31}[0-9a-fA-F]{2}$",
        description="SHA-256 fingerprint of the DER certificate, hex, colons allowed.",
    )
    subject: str | None = Field(
        None, min_length=1, description="Subject as RFC 4514 text, e.g. CN=app1,O=Acme."
    )
    san: str | None = Field(
        None, min_length=1, description="A DNS name, URI (SPIFFE ID), e-mail or IP SAN."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ClientCertificate:
        if sum(x is not None for x in (self.sha256, self.subject, self.san)) != 1:
            raise ValueError("give exactly one of sha256, subject or san")
        return self


class ApiKeyAuth(_Strict):
    type: Literal["api_key"]
    header: HeaderName | None = Field(None, description="Header carrying the key.")
    query: QueryName | None = Field(None, description="Query parameter carrying the key.")

    @model_validator(mode="before")
    @classmethod
    def _somewhere(cls, data: Any) -> Any:
        # Before, not after: an after validator's replacement instance is dropped by __init__.
        if isinstance(data, dict) and data.get("header") is None and data.get("query") is None:
            return {**data, "header": "X-API-Key", "query": "user_key"}
        return data


class AppIdKeyAuth(_Strict):
    type: Literal["app_id_key"]
    app_id_header: HeaderName = "X-App-Id"
    app_key_header: HeaderName = "X-App-Key"
    app_id_query: QueryName | None = "app_id"
    app_key_query: QueryName | None = "app_key"


class JwtKey(_Strict):
    kid: str | None = None
    algorithm: str | None = None
    pem: str | None = Field(None, description="PEM public key (RS*, PS*, ES*, EdDSA).")
    secret: str | None = Field(None, description="Shared secret (HS*).")
    jwk: dict[str, Any] | None = None

    @field_validator("pem")
    @classmethod
    def _loadable_pem(cls, value: str | None) -> str | None:
        # Checked here, not only when a gateway builds the product: a control plane must
        # refuse a key that would make its gateways refuse the whole snapshot.
        if value is not None:
            # Imported here: cryptography costs megabytes a sidecar has no use for.
            from cryptography import x509
            from cryptography.exceptions import UnsupportedAlgorithm
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            data = value.encode()
            try:
                if b"CERTIFICATE" in data:
                    x509.load_pem_x509_certificate(data)
                else:
                    load_pem_public_key(data)
            except (ValueError, TypeError, UnsupportedAlgorithm):
                raise ValueError("not a PEM public key or certificate") from None
        return value

    @field_validator("jwk")
    @classmethod
    def _loadable_jwk(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            import jwt

            try:
                jwt.PyJWK(value)
            except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
                raise ValueError(f"not a usable JWK: {exc}") from None
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> JwtKey:
        given = [x for x in (self.pem, self.secret, self.jwk) if x is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of pem, secret or jwk")
        return self


class JwtAuth(_Strict):
    type: Literal["jwt"]
    issuer: str | None = None
    audience: str | list[str] | None = None
    keys: list[JwtKey] = []
    jwks_url: Url | None = None
    jwks_cache_seconds: float = Field(300, gt=0)
    algorithms: list[str] = ["RS256", "ES256", "PS256", "EdDSA"]
    app_claim: str = Field("azp", description="Claim that names the application.")
    header: HeaderName = "Authorization"
    leeway_seconds: float = Field(0, ge=0, le=300)

    @field_validator("jwks_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _has_keys(self) -> JwtAuth:
        if not self.keys and not self.jwks_url:
            raise ValueError("give keys or jwks_url")
        return self


class NoAuth(_Strict):
    type: Literal["none"]
    default_application: str


class MtlsAuth(_Strict):
    """The verified client certificate of a TLS listener that asks for one names the
    application (see ``Application.certificates``)."""

    type: Literal["mtls"]


Auth = Annotated[
    ApiKeyAuth | AppIdKeyAuth | JwtAuth | NoAuth | MtlsAuth, Field(discriminator="type")
]


def _one_policy(entry: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    if len(entry) != 1:
        raise ValueError("must name exactly one policy, e.g. {cors: {}}")
    return entry


PolicyEntry = Annotated[
    dict[str, dict[str, Any]],
    AfterValidator(_one_policy),
    WithJsonSchema(
        {
            "type": "object",
            "additionalProperties": {"type": "object"},
            "minProperties": 1,
            "maxProperties": 1,
        }
    ),
]


# RFC 3986 characters only: a host (reg-name or IP literal), a port, a path.
BACKEND_URL = (
    r"^https?://([A-Za-z0-9\-._~%!$&'()*+,;=]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?"
    r"(/[A-Za-z0-9\-._~%!$&'()*+,;=:@/]*)?$"
)
_BACKEND_URL = re.compile(BACKEND_URL)


def check_backend_url(value: str) -> str:
    """The URL, or ValueError saying what a backend URL must be."""
    _check_url(value)
    if _BACKEND_URL.fullmatch(value) is None:
        raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:9001")
    return value


BackendUrl = Annotated[
    str, AfterValidator(check_backend_url), Field(json_schema_extra={"pattern": BACKEND_URL})
]


class UpstreamTls(_Strict):
    """How a product's https:// backends are verified, and the client certificate sent."""

    ca_file: str | None = Field(
        None, description="PEM CA bundle to verify backends against; the system's by default."
    )
    verify: bool = Field(
        True, description="false skips verification: for tests only, never in production."
    )
    server_name: HostName | None = Field(
        None, description="SNI and the name checked in the certificate; the URL's host by default."
    )
    client_cert: str | None = Field(None, description="PEM client certificate (upstream mTLS).")
    client_key: str | None = Field(None, description="PEM key of client_cert.")
    mesh_service: str | None = Field(
        None,
        pattern=r"^[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?)*$",
        max_length=253,
        description="The backends are this mesh service's sidecars: mutual TLS with the "
        "gateway's identity, the server checked to be the service's workload.",
    )

    @model_validator(mode="after")
    def _pair(self) -> UpstreamTls:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("give client_cert and client_key together")
        if self.mesh_service is not None and (
            self.client_cert is not None
            or self.ca_file is not None
            or not self.verify
            or self.server_name is not None
        ):
            raise ValueError(
                "mesh_service uses the gateway's identity and trust bundle: give no ca_file, "
                "verify, server_name or client certificate with it"
            )
        return self


def check_path_prefix(value: str) -> str:
    """The prefix without its trailing slash, or ValueError saying what it must be."""
    if not value.startswith("/") or "//" in value or "/../" in value + "/":
        raise ValueError("must start with / and hold no empty or .. segments")
    # Forwarded as it is when the prefix is not stripped.
    _check_url(value)
    return value.rstrip("/") or "/"


class BackendUsage(_Strict):
    """A backend serving the product's requests under a path, as 3scale's backend usages."""

    path: str = Field(
        "/",
        json_schema_extra={"pattern": _URL},
        description="Requests under this path (after the product's prefix) "
        "go to this backend, with the path removed.",
    )
    url: BackendUrl = Field(description="Upstream base URL, http(s)://host:port[/base/path].")
    protocol: BackendProtocol | None = Field(
        None, description=_PROTOCOL_DOC + " The product's protocol when not given."
    )

    _path = field_validator("path")(classmethod(lambda cls, v: check_path_prefix(v)))


class Product(_Strict):
    # Merged with _Strict's settings: the schema says what _references checks for backends.
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": ["backend"], "not": {"required": ["backends"]}},
                {
                    "required": ["backends"],
                    "not": {"required": ["backend"]},
                    "properties": {"backends": {"minItems": 1}},
                },
            ]
        }
    )

    name: str = Field(pattern=_NAME)
    hosts: list[HostName] = Field(
        ["*"], description="Host names; * matches any, *.example.com a suffix."
    )
    path_prefix: str = Field("/", json_schema_extra={"pattern": _URL})
    strip_prefix: bool = True
    backend: BackendUrl | None = Field(
        None, description="Upstream base URL, http://host:port[/base/path]; or give backends."
    )
    backends: list[BackendUsage] = Field(
        [], description="Several backends at path prefixes; the longest matching path wins."
    )
    protocol: BackendProtocol = Field("http1", description=_PROTOCOL_DOC)
    auth: Auth
    hide_credentials: bool = Field(
        True,
        description="Remove the credential the gateway read (its header, or its query "
        "parameter) from the request sent upstream.",
    )
    metrics: list[Metric] = [Metric(name="hits")]
    mapping_rules: list[MappingRule] = [MappingRule(method="ANY", pattern="/", metric="hits")]
    case_insensitive_rules: bool = Field(
        False,
        description="Mapping rule paths match regardless of case: a rule on /admin also "
        "counts /ADMIN (the path is forwarded as received).",
    )
    plans: list[Plan] = []
    policies: list[PolicyEntry] = Field(
        [], description="Policy chain in order, each {policy_name: {config}}."
    )
    applications: list[Application] = []
    max_body_size: int | None = Field(None, ge=0, description="Largest request body in bytes.")
    upstream_connect_timeout: float | None = Field(None, gt=0)
    upstream_response_timeout: float | None = Field(None, gt=0)
    max_upstream_connections: int = Field(
        1024,
        ge=1,
        description="Connections open to each backend at most; past it, 503 at once.",
    )
    upstream_tls: UpstreamTls | None = Field(
        None, description="Verification and client certificate for https:// backends."
    )
    websocket: bool = Field(
        True, description="Allow protocol upgrades (WebSocket); false refuses them with 403."
    )
    certificate: str | None = Field(
        None,
        pattern=_NAME,
        description="Name of the TLS listener's certificate that serves this product's hosts.",
    )
    key_salt: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{16,128}$",
        description="Hex salt of the applications' key_hashes: sha256(salt bytes + key).",
    )

    _prefix = field_validator("path_prefix")(classmethod(lambda cls, v: check_path_prefix(v)))

    def backend_usages(self) -> list[BackendUsage]:
        """The backends by path, longest path first; ``backend`` is one at ``/``."""
        if self.backend is not None:
            return [BackendUsage(path="/", url=self.backend)]
        return sorted(self.backends, key=lambda b: len(b.path), reverse=True)

    def backend_protocol(self, usage: BackendUsage) -> BackendProtocol:
        """The protocol the gateway speaks to one of this product's backends."""
        return usage.protocol or self.protocol

    @model_validator(mode="after")
    def _references(self) -> Product:
        names = [m.name for m in self.metrics]
        known = set(names)
        problems = []
        if (self.backend is None) == (not self.backends):
            problems.append("give either backend or backends (not both)")
        paths = [b.path for b in self.backends]
        if len(set(paths)) != len(paths):
            problems.append("two backends at the same path")
        for usage in self.backend_usages():
            if self.backend_protocol(usage) == "h2" and not usage.url.startswith("https://"):
                problems.append(
                    f"backend {usage.url}: protocol h2 is HTTP/2 over TLS and needs an https:// "
                    "backend; h2c is cleartext HTTP/2"
                )
            if self.backend_protocol(usage) == "h2c" and usage.url.startswith("https://"):
                problems.append(
                    f"backend {usage.url}: protocol h2c is cleartext HTTP/2; over TLS it is h2"
                )
            mesh = self.upstream_tls is not None and self.upstream_tls.mesh_service is not None
            if mesh and not usage.url.startswith("https://"):
                problems.append(
                    f"backend {usage.url}: upstream_tls.mesh_service calls the mesh over mutual "
                    "TLS: give its sidecars' inbound address as an https:// backend"
                )
            if mesh and self.backend_protocol(usage) != "http1":
                problems.append(
                    f"backend {usage.url}: upstream_tls.mesh_service speaks HTTP/1.1 to the "
                    "mesh (protocol http1)"
                )
        if self.key_salt is None and any(a.key_hashes for a in self.applications):
            problems.append("applications carry key_hashes: give the product's key_salt")
        if len(known) != len(names):
            problems.append(f"metric names must be unique: {_twice(names)}")
        for m in self.metrics:
            if m.parent is not None and m.parent not in known:
                problems.append(f"metric {m.name!r} has unknown parent {m.parent!r}")
        parents = {x.name: x.parent for x in self.metrics}
        for m in self.metrics:
            seen, cur = {m.name}, m.parent
            while cur is not None:
                if cur in seen:
                    # A cycle above m, not through it, is reported for its own members.
                    if cur == m.name:
                        problems.append(f"metric {m.name!r} is its own ancestor")
                    break
                seen.add(cur)
                cur = parents.get(cur)
        for rule in self.mapping_rules:
            if rule.metric not in known:
                problems.append(
                    f"mapping rule {rule.pattern!r} names unknown metric {rule.metric!r}"
                )
        plans = [p.name for p in self.plans]
        if len(set(plans)) != len(plans):
            problems.append(f"plan names must be unique: {_twice(plans)}")
        for plan in self.plans:
            for lim in plan.limits:
                if lim.metric not in known:
                    problems.append(f"plan {plan.name!r} limits unknown metric {lim.metric!r}")
        apps = [a.id for a in self.applications]
        if len(set(apps)) != len(apps):
            problems.append(f"application ids must be unique: {_twice(apps)}")
        for app in self.applications:
            if app.plan not in plans:
                problems.append(f"application {app.id!r} is on unknown plan {app.plan!r}")
        if isinstance(self.auth, ApiKeyAuth):
            keys = [k for a in self.applications for k in a.keys]
            if len(set(keys)) != len(keys):
                problems.append("a key belongs to two applications")
            hashes = [h for a in self.applications for h in a.key_hashes]
            if len(set(hashes)) != len(hashes):
                problems.append("a key hash belongs to two applications")
        if isinstance(self.auth, NoAuth) and self.auth.default_application not in apps:
            problems.append(
                f"default_application {self.auth.default_application!r} is not an application"
            )
        if problems:
            raise Problems(problems)
        return self


class LimitsConfig(_Strict):
    backend: Literal["memory", "redis"] = "memory"
    redis_url: Url = "redis://127.0.0.1:6379/0"
    on_backend_error: Literal["deny", "allow"] = Field(
        "deny", description="While the counter backend is unreachable: refuse (503) or let through."
    )
    redis_timeout: float = Field(
        0.5, gt=0, description="Seconds before a Redis call counts as failed."
    )
    key_prefix: str = "meshgate"


class UsageConfig(_Strict):
    """Usage reporting to the control plane (control-plane mode only: a gateway run from a file
    reports to nobody)."""

    enabled: bool = Field(
        True,
        description="Count every request (usage per application and metric, responses by "
        "status and reason, latency per product) and report it to the control plane.",
    )
    interval: float = Field(
        5, gt=0, le=3600, description="Seconds between two reports (batches) to the control plane."
    )
    spool_max_batches: int = Field(
        10000,
        ge=1,
        description="Unsent batches kept on disk while the control plane is away; beyond, the "
        "oldest is dropped (logged and counted).",
    )
    spool_max_bytes: int = Field(
        256 * 2**20,
        ge=65536,
        description="Bytes of unsent batches kept on disk; beyond, the oldest is dropped.",
    )


class ConsumerTokenConfig(_Strict):
    """The consumer token sent upstream with each request let through (with an identity)."""

    enabled: bool = True
    ttl: float = Field(
        60, ge=10, le=3600, description="Seconds a token lives; signed again at half its life."
    )


class Timeouts(_Strict):
    client_header: float = Field(10, gt=0, description="Seconds to receive a request head (408).")
    idle_keepalive: float = Field(
        60, gt=0, description="Seconds an idle client connection is kept."
    )
    upstream_connect: float = Field(5, gt=0, description="Seconds to connect upstream (502).")
    upstream_response: float = Field(
        60, gt=0, description="Seconds to the upstream's response (504)."
    )
    client_body: float = Field(60, gt=0, description="Seconds of silence while reading a body.")
    client_body_total: float = Field(
        300, gt=0, description="Seconds for the whole request body, however it trickles (408)."
    )
    client_send: float = Field(
        60, gt=0, description="Seconds a client may read nothing of its response."
    )
    tunnel_idle: float = Field(
        300, gt=0, description="Seconds an upgraded connection (WebSocket) may carry no byte."
    )
    shutdown_grace: float = Field(
        30, gt=0, description="Seconds in-flight requests get on SIGTERM."
    )


class TlsCertificate(_Strict):
    name: str | None = Field(None, pattern=_NAME, description="What products call it.")
    cert: str = Field(min_length=1, description="PEM certificate chain file.")
    key: str = Field(min_length=1, description="PEM private key file.")
    hosts: list[HostName] = Field(
        [], description="Server names beyond the certificate's own DNS names."
    )


class TlsListener(_Strict):
    """The HTTPS listener: certificates chosen by SNI (the first without a match)."""

    listen: str = "127.0.0.1:8443"
    certificates: list[TlsCertificate] = Field(min_length=1)
    client_ca: str | None = Field(
        None, description="PEM CA bundle that signs the client certificates accepted."
    )
    client_auth: Literal["none", "optional", "required"] = Field(
        "none", description="Ask for a client certificate (needs client_ca)."
    )
    min_version: Literal["1.2", "1.3"] = "1.2"

    _listen = field_validator("listen")(classmethod(lambda cls, v: _check_listen(v)))

    @model_validator(mode="after")
    def _coherent(self) -> TlsListener:
        problems = []
        if self.client_auth != "none" and self.client_ca is None:
            problems.append("client_auth needs client_ca")
        names = [c.name for c in self.certificates if c.name is not None]
        if len(set(names)) != len(names):
            problems.append("certificate names must be unique")
        if problems:
            raise Problems(problems)
        return self


class Config(_Strict):
    listen: str | None = Field(
        "127.0.0.1:8080", description="Cleartext listener; null with tls for HTTPS only."
    )
    tls: TlsListener | None = None
    admin_listen: str | None = "127.0.0.1:8081"
    limits: LimitsConfig = LimitsConfig()
    usage: UsageConfig = UsageConfig()
    timeouts: Timeouts = Timeouts()
    max_header_size: int = Field(16384, ge=1024, le=1_048_576, description="Bytes, else 431.")
    access_log: bool = True
    http2: bool = Field(
        True,
        description="Serve HTTP/2: h2c with prior knowledge on listen, h2 by ALPN on tls.listen.",
    )
    upstream_keepalive: int = Field(
        64, ge=0, description="Idle upstream connections kept per backend."
    )
    tracing: TracingSettings = Field(
        TracingSettings(),
        description="W3C Trace Context and OTLP/HTTP export of the gateway's spans (a local "
        "setting: read at start).",
    )
    identity: IdentityFiles | None = Field(
        None,
        description="The gateway's workload identity from files (its SPIFFE ID names the "
        "service meshgate-gateway): it signs the consumer tokens.",
    )
    consumer_token: ConsumerTokenConfig = ConsumerTokenConfig()
    products: list[Product] = []
    version: str | None = Field(
        None, description="Set by a control plane: the snapshot version this document is."
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        return None if value is None else _check_listen(value)

    @field_validator("admin_listen")
    @classmethod
    def _admin(cls, value: str | None) -> str | None:
        return None if value is None else _check_listen(value)

    @classmethod
    def reference_problems(cls, data: Any) -> list[str]:
        """What the cross-reference checks would say of a raw document whose fields did not
        all validate (pydantic skips a model's own checks then): names used twice, limits
        and rules on unknown metrics, applications on unknown plans. Read leniently: what
        is not the right shape is another error's business."""
        out: list[str] = []
        products = data.get("products") if isinstance(data, dict) else None
        if not isinstance(products, list):
            return out
        raw = [p.get("name") for p in products if isinstance(p, dict)]
        names = [n for n in raw if isinstance(n, str)]
        if len(set(names)) != len(names):
            out.append(f"top level: product names must be unique: {_twice(names)}")
        for i, product in enumerate(products):
            if isinstance(product, dict):
                out += [f"products[{i}]: {line}" for line in _product_references(product)]
        return out

    @model_validator(mode="after")
    def _unique_products(self) -> Config:
        names = [p.name for p in self.products]
        problems = []
        if len(set(names)) != len(names):
            problems.append(f"product names must be unique: {_twice(names)}")
        if self.listen is None and self.tls is None:
            problems.append("give listen, tls, or both")
        if self.tls is not None:
            certificates = {c.name for c in self.tls.certificates}
            for p in self.products:
                if p.certificate is not None and p.certificate not in certificates:
                    problems.append(
                        f"product {p.name!r} names certificate {p.certificate!r}, "
                        "which tls.certificates does not hold"
                    )
        if problems:
            raise Problems(problems)
        return self


def _twice(names: list[str]) -> str:
    """The names that occur more than once, in order: 'a', 'b'."""
    seen: set[str] = set()
    again: dict[str, None] = {}
    for name in names:
        if name in seen:
            again[name] = None
        seen.add(name)
    return ", ".join(map(repr, again))


def _named(value: Any, key: str = "name") -> list[str] | None:
    """The names of a raw list of mappings, or None when any entry is not a mapping with a
    string name (then what it refers to cannot be known, and nothing is said of it)."""
    if not isinstance(value, list):
        return None
    names = [v.get(key) for v in value if isinstance(v, dict)]
    strings = [n for n in names if isinstance(n, str)]
    return strings if len(strings) == len(value) else None


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _product_references(product: dict[str, Any]) -> list[str]:
    """Product._references' cross-reference checks on a raw product."""
    problems: list[str] = []
    metrics = _named(product.get("metrics", [{"name": "hits"}]))
    if metrics is not None and len(set(metrics)) != len(metrics):
        problems.append(f"metric names must be unique: {_twice(metrics)}")
    if metrics is not None:
        for rule in _dicts(product.get("mapping_rules", [])):
            metric = rule.get("metric", "hits")
            if isinstance(metric, str) and metric not in metrics:
                problems.append(
                    f"mapping rule {rule.get('pattern')!r} names unknown metric {metric!r}"
                )
    plans = _named(product.get("plans", []))
    if plans is not None and len(set(plans)) != len(plans):
        problems.append(f"plan names must be unique: {_twice(plans)}")
    if metrics is not None:
        for plan in _dicts(product.get("plans", [])):
            for limit in _dicts(plan.get("limits", [])):
                metric = limit.get("metric")
                if isinstance(metric, str) and metric not in metrics:
                    problems.append(f"plan {plan.get('name')!r} limits unknown metric {metric!r}")
    ids = _named(product.get("applications", []), "id")
    if ids is not None and len(set(ids)) != len(ids):
        problems.append(f"application ids must be unique: {_twice(ids)}")
    if plans is not None:
        for app in _dicts(product.get("applications", [])):
            on = app.get("plan")
            if isinstance(on, str) and on not in plans:
                problems.append(f"application {app.get('id')!r} is on unknown plan {on!r}")
    return problems
