"""The declarative gateway configuration: the same document a control plane snapshot carries."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

PERIODS = ("minute", "hour", "day", "week", "month", "year", "eternity")
Period = Literal["minute", "hour", "day", "week", "month", "year", "eternity"]
Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "ANY"]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
_HOSTPORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]*):(\d{1,5})$")

# What configuration may put on the wire is checked here, so that files and a control plane
# refuse alike: a CR or LF in a URL or header would end a request head early (injection).
FIELD_NAME = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$"  # an RFC 9110 token
_HOST = r"^[^\x00-\x20\x7f-\x9f]+$"  # no control characters, no spaces
_QUERY_NAME = r"^[^\x00-\x1f\x7f-\x9f]+$"  # no control characters
_URL = r"^[\x21-\x7e]+$"  # printable ASCII: no control characters, no spaces (RFC 3986)
_FIELD_NAME_RE = re.compile(FIELD_NAME)
_HOST_RE = re.compile(_HOST)
_QUERY_NAME_RE = re.compile(_QUERY_NAME)
_URL_RE = re.compile(_URL)


def _check_header_name(value: str) -> str:
    """The header field name, or ValueError unless it is an RFC 9110 token."""
    if _FIELD_NAME_RE.fullmatch(value) is None:
        raise ValueError(
            "must be a header name: letters, digits and !#$%&'*+-.^_`|~ "
            "(no spaces or control characters)"
        )
    return value


def _check_host(value: str) -> str:
    if _HOST_RE.fullmatch(value) is None:
        raise ValueError("must be a host name without spaces or control characters")
    return value


def _check_query_name(value: str) -> str:
    if _QUERY_NAME_RE.fullmatch(value) is None:
        raise ValueError("must be a query parameter name without control characters")
    return value


def _check_url(value: str) -> str:
    """The URL, or ValueError if it holds a space, a control character or non-ASCII text."""
    if _URL_RE.fullmatch(value) is None:
        raise ValueError(
            "must not contain spaces, control characters or non-ASCII characters "
            "(percent-encode them)"
        )
    return value


Url = Annotated[str, AfterValidator(_check_url), Field(json_schema_extra={"pattern": _URL})]
HeaderName = Annotated[
    str, AfterValidator(_check_header_name), Field(json_schema_extra={"pattern": FIELD_NAME})
]
HostName = Annotated[str, AfterValidator(_check_host), Field(json_schema_extra={"pattern": _HOST})]
QueryName = Annotated[
    str, AfterValidator(_check_query_name), Field(json_schema_extra={"pattern": _QUERY_NAME})
]


class Problems(ValueError):
    """Independent problems found by one validator; loaders report one a line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    # No inf/nan: YAML's .inf would be an endless timeout, and JSON snapshots cannot carry it.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _check_listen(value: str) -> str:
    m = _HOSTPORT.fullmatch(value)
    if not m or not 0 <= int(m.group(2)) <= 65535:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8080 or 0.0.0.0:8080")
    return value


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


Auth = Annotated[ApiKeyAuth | AppIdKeyAuth | JwtAuth | NoAuth, Field(discriminator="type")]


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
    r"^http://([A-Za-z0-9\-._~%!$&'()*+,;=]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?"
    r"(/[A-Za-z0-9\-._~%!$&'()*+,;=:@/]*)?$"
)
_BACKEND_URL = re.compile(BACKEND_URL)


def check_backend_url(value: str) -> str:
    """The URL, or ValueError saying what a backend URL must be."""
    _check_url(value)
    if _BACKEND_URL.fullmatch(value) is None:
        raise ValueError("must be an http:// URL, e.g. http://127.0.0.1:9001")
    return value


BackendUrl = Annotated[
    str, AfterValidator(check_backend_url), Field(json_schema_extra={"pattern": BACKEND_URL})
]


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
    url: BackendUrl = Field(description="Upstream base URL, http://host:port[/base/path].")

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
        if self.key_salt is None and any(a.key_hashes for a in self.applications):
            problems.append("applications carry key_hashes: give the product's key_salt")
        if len(known) != len(names):
            problems.append("metric names must be unique")
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
            problems.append("plan names must be unique")
        for plan in self.plans:
            for lim in plan.limits:
                if lim.metric not in known:
                    problems.append(f"plan {plan.name!r} limits unknown metric {lim.metric!r}")
        apps = [a.id for a in self.applications]
        if len(set(apps)) != len(apps):
            problems.append("application ids must be unique")
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
    shutdown_grace: float = Field(
        30, gt=0, description="Seconds in-flight requests get on SIGTERM."
    )


class Config(_Strict):
    listen: str = "127.0.0.1:8080"
    admin_listen: str | None = "127.0.0.1:8081"
    limits: LimitsConfig = LimitsConfig()
    timeouts: Timeouts = Timeouts()
    max_header_size: int = Field(16384, ge=1024, le=1_048_576, description="Bytes, else 431.")
    access_log: bool = True
    upstream_keepalive: int = Field(
        64, ge=0, description="Idle upstream connections kept per backend."
    )
    products: list[Product] = []
    version: str | None = Field(
        None, description="Set by a control plane: the snapshot version this document is."
    )

    _listen = field_validator("listen")(classmethod(lambda cls, v: _check_listen(v)))

    @field_validator("admin_listen")
    @classmethod
    def _admin(cls, value: str | None) -> str | None:
        return None if value is None else _check_listen(value)

    @model_validator(mode="after")
    def _unique_products(self) -> Config:
        names = [p.name for p in self.products]
        if len(set(names)) != len(names):
            raise ValueError("product names must be unique")
        return self
