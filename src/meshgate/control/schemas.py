"""Request and response bodies of the admin API.

Gateway-facing fields (auth, policies, mapping rule patterns, backend URLs, periods) reuse
the configuration model's types, so that the control plane accepts exactly what a gateway
can run.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    field_validator,
)

from meshgate.config.mesh import Instance, ServiceName
from meshgate.config.model import (
    Auth,
    BackendProtocol,
    BackendUsage,
    ClientCertificate,
    Method,
    Period,
    PolicyEntry,
    UpstreamTls,
    check_backend_url,
    check_path_prefix,
)
from meshgate.config.model import MappingRule as ConfigMappingRule

# Checked as gateways check them, by pydantic with the request's other fields: every
# error of a request is reported at once.
PathPrefix = Annotated[str, StringConstraints(max_length=1000), AfterValidator(check_path_prefix)]
BackendUrl = Annotated[str, StringConstraints(max_length=2000), AfterValidator(check_backend_url)]

_PROTOCOL = (
    "HTTP to the product's backends: http1, h2 (HTTP/2 over TLS) or h2c (cleartext HTTP/2 "
    "with prior knowledge, e.g. a gRPC server)."
)
MAX_ID = 2**31 - 1
MAX_BIG = 2**63 - 1
# For query parameters: PostgreSQL cannot compare text with NUL in it.
NO_NUL = r"^[^\x00]*$"


def storable(value: Any, where: str = "") -> None:
    """Raise ValueError for what a store cannot hold faithfully, anywhere inside ``value``.

    PostgreSQL text cannot hold NUL, neither store encodes a lone surrogate (JSON's
    ``"\\ud800"``) and JSON columns cannot carry inf or nan: both stores refuse alike.
    """
    at = f"{where}: " if where else ""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{at}must not contain NUL characters")
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValueError(f"{at}must be Unicode text, not a lone surrogate") from None
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{at}must be a finite number")
    elif isinstance(value, BaseModel):
        storable(value.model_dump(), where)
    elif isinstance(value, dict):
        for key, item in value.items():
            storable(key, where)
            storable(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            storable(item, f"{where}[{i}]")


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; every time the API shows is UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


_DATE_START = re.compile(r"\d{4}-\d{2}-\d{2}")


def _time_text(value: Any) -> Any:
    # As the document says, a date-time string: not a number of seconds that means 1970.
    if not isinstance(value, str | datetime) or (
        isinstance(value, str) and not _DATE_START.match(value)
    ):
        raise ValueError("must be a date-time string, e.g. 2030-01-01T00:00:00Z")
    return value


def _to_utc(value: datetime) -> datetime:
    # Stored in UTC: SQLite keeps no offset, so 12:00+02:00 would read back as 12:00 UTC.
    try:
        return _utc(value).astimezone(UTC)
    except OverflowError:
        raise ValueError("must be a time between the years 1 and 9999 in UTC") from None


Timestamp = Annotated[datetime, AfterValidator(_utc)]
UtcTime = Annotated[
    datetime, Field(strict=False), BeforeValidator(_time_text), AfterValidator(_to_utc)
]

Name = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"),
]
Label = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Text = Annotated[str, StringConstraints(max_length=10_000)]
Email = Annotated[str, StringConstraints(max_length=320, pattern=r"^[^@\s\x00]+@[^@\s\x00]+$")]
Id = Annotated[int, Field(ge=1, le=MAX_ID)]
Count = Annotated[int, Field(ge=0, le=MAX_BIG)]
Fee = Annotated[Decimal, Field(ge=0, max_digits=14, decimal_places=4, strict=False)]


def _money_text(value: Decimal) -> str:
    # One spelling whatever the store gives back (SQLite 99, PostgreSQL 99.0000): 99, 0.0125.
    text = f"{value + 0:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


Money = Annotated[Decimal, PlainSerializer(_money_text, return_type=str, when_used="json")]
Seconds = Annotated[float, Field(gt=0, le=86_400)]

AccountState = Literal["pending", "approved", "suspended"]
PlanState = Literal["draft", "published", "deprecated"]
AppState = Literal["pending", "live", "suspended"]
Scope = Literal["read", "write", "dataplane"]
Env = Literal["staging", "production"]

T = TypeVar("T")


class _In(BaseModel):
    # Strict, as the document says and as a gateway reads its file: "5" is not an integer,
    # "yes" not a boolean. Money and times are the exceptions, as JSON has no type for them.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    @field_validator("*", mode="after")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        storable(value)
        return value


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    created_at: Timestamp
    updated_at: Timestamp
    version: int


class Page(BaseModel, Generic[T]):
    items: list[T]
    page: int
    per_page: int
    total: int


# Accounts and users


class AccountCreate(_In):
    name: Label
    email: Email | None = None
    state: AccountState = "approved"
    description: Text = ""


class AccountUpdate(_In):
    name: Label | None = None
    email: Email | None = None
    state: AccountState | None = None
    description: Text | None = None


class AccountOut(_Out):
    name: str
    email: str | None
    state: str
    description: str


class UserCreate(_In):
    username: Name
    email: Email
    role: Literal["admin", "member"] = "member"
    state: Literal["pending", "active", "suspended"] = "active"


class UserUpdate(_In):
    username: Name | None = None
    email: Email | None = None
    role: Literal["admin", "member"] | None = None
    state: Literal["pending", "active", "suspended"] | None = None


class UserOut(_Out):
    account_id: int
    username: str
    email: str
    role: str
    state: str


# Products and what belongs to them


class UpstreamTlsIn(UpstreamTls):
    """``UpstreamTls`` read as strictly as the rest of a request body."""

    model_config = ConfigDict(strict=True)


class ClientCertificateIn(ClientCertificate):
    model_config = ConfigDict(strict=True)


_UPSTREAM_TLS = (
    "For https:// backends: ca_file, verify, server_name, client_cert, client_key (files on "
    "the gateways' hosts; no key material is stored here)."
)
_CERTIFICATE = "The name of the gateways' TLS listener certificate that serves these hosts."
_MAX_CONNECTIONS = "Connections open to each backend at most; past it, 503 at once."
_CLIENT_CERTIFICATES = (
    "auth mtls: the client certificates that identify the application, each {sha256}, "
    "{subject} or {san}."
)


class ProductCreate(_In):
    name: Name
    description: Text = ""
    hosts: list[Annotated[str, StringConstraints(min_length=1, max_length=253)]] = Field(
        ["*"], max_length=100
    )
    path_prefix: PathPrefix = "/"
    strip_prefix: bool = True
    auth: Auth
    hide_credentials: bool = Field(
        True, description="Remove the credential the gateway read from the upstream request."
    )
    case_insensitive_rules: bool = Field(
        False, description="Mapping rule paths match regardless of ASCII case."
    )
    policies: list[PolicyEntry] = Field([], max_length=100)
    max_body_size: Count | None = None
    upstream_connect_timeout: Seconds | None = None
    upstream_response_timeout: Seconds | None = None
    protocol: BackendProtocol = Field("http1", description=_PROTOCOL)
    upstream_tls: UpstreamTlsIn | None = Field(None, description=_UPSTREAM_TLS)
    certificate: Name | None = Field(None, description=_CERTIFICATE)
    websocket: bool = Field(True, description="Allow protocol upgrades (WebSocket).")
    max_upstream_connections: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        1024, description=_MAX_CONNECTIONS
    )
    backend: BackendUrl | None = Field(
        None, description="Shorthand: one backend at / created with the product."
    )


class ProductUpdate(_In):
    name: Name | None = None
    description: Text | None = None
    hosts: list[Annotated[str, StringConstraints(min_length=1, max_length=253)]] | None = Field(
        None, max_length=100
    )
    path_prefix: PathPrefix | None = None
    strip_prefix: bool | None = None
    auth: Auth | None = None
    hide_credentials: bool | None = None
    case_insensitive_rules: bool | None = None
    policies: list[PolicyEntry] | None = Field(None, max_length=100)
    max_body_size: Count | None = None
    upstream_connect_timeout: Seconds | None = None
    upstream_response_timeout: Seconds | None = None
    protocol: BackendProtocol | None = Field(None, description=_PROTOCOL)
    upstream_tls: UpstreamTlsIn | None = Field(None, description=_UPSTREAM_TLS)
    certificate: Name | None = Field(None, description=_CERTIFICATE)
    websocket: bool | None = None
    max_upstream_connections: Annotated[int, Field(ge=1, le=1_000_000)] | None = None


class ProductOut(_Out):
    name: str
    description: str
    hosts: list[str]
    path_prefix: str
    strip_prefix: bool
    auth: dict[str, Any]
    hide_credentials: bool
    case_insensitive_rules: bool
    policies: list[dict[str, Any]]
    max_body_size: int | None
    upstream_connect_timeout: float | None
    upstream_response_timeout: float | None
    protocol: str
    upstream_tls: dict[str, Any] | None
    certificate: str | None
    websocket: bool
    max_upstream_connections: int


class BackendCreate(_In):
    path: PathPrefix = "/"
    url: BackendUrl
    name: Annotated[str, StringConstraints(max_length=200)] = ""


class BackendUpdate(_In):
    path: PathPrefix | None = None
    url: BackendUrl | None = None
    name: Annotated[str, StringConstraints(max_length=200)] | None = None


class BackendOut(_Out):
    product_id: int
    path: str
    url: str
    name: str


class MetricCreate(_In):
    name: Name
    parent_id: Id | None = Field(
        None, description="A method's parent metric (hits); none for a top-level metric."
    )
    friendly_name: Annotated[str, StringConstraints(max_length=200)] = ""
    unit: Annotated[str, StringConstraints(max_length=50)] = "hit"
    description: Text = ""


class MetricUpdate(_In):
    name: Name | None = None
    friendly_name: Annotated[str, StringConstraints(max_length=200)] | None = None
    unit: Annotated[str, StringConstraints(max_length=50)] | None = None
    description: Text | None = None


class MetricOut(_Out):
    product_id: int
    name: str
    parent_id: int | None
    friendly_name: str
    unit: str
    description: str


class MappingRuleCreate(_In):
    http_method: Method = "ANY"
    pattern: Annotated[str, StringConstraints(min_length=1, max_length=2000)]
    metric_id: Id
    delta: Annotated[int, Field(ge=0, le=1_000_000)] = 1
    last: bool = False
    position: Annotated[int, Field(ge=0, le=MAX_ID)] = 0


class MappingRuleUpdate(_In):
    http_method: Method | None = None
    pattern: Annotated[str, StringConstraints(min_length=1, max_length=2000)] | None = None
    metric_id: Id | None = None
    delta: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    last: bool | None = None
    position: Annotated[int, Field(ge=0, le=MAX_ID)] | None = None


class MappingRuleOut(_Out):
    product_id: int
    http_method: str
    pattern: str
    metric_id: int
    delta: int
    last: bool
    position: int


# Plans


class PlanCreate(_In):
    name: Name
    description: Text = ""
    state: PlanState = "draft"
    is_default: bool = False
    approval_required: bool = False
    setup_fee: Fee = Decimal(0)
    monthly_fee: Fee = Decimal(0)
    trial_days: Annotated[int, Field(ge=0, le=3650)] = 0


class PlanUpdate(_In):
    name: Name | None = None
    description: Text | None = None
    state: PlanState | None = None
    is_default: bool | None = None
    approval_required: bool | None = None
    setup_fee: Fee | None = None
    monthly_fee: Fee | None = None
    trial_days: Annotated[int, Field(ge=0, le=3650)] | None = None


class PlanOut(_Out):
    product_id: int
    name: str
    description: str
    state: str
    is_default: bool
    approval_required: bool
    setup_fee: Money
    monthly_fee: Money
    trial_days: int


class LimitCreate(_In):
    metric_id: Id
    period: Period
    value: Count


class LimitUpdate(_In):
    period: Period | None = None
    value: Count | None = None


class LimitOut(_Out):
    plan_id: int
    metric_id: int
    period: str
    value: int


class PricingRuleCreate(_In):
    metric_id: Id
    min: Annotated[int, Field(ge=1, le=MAX_BIG)] = 1
    max: Annotated[int, Field(ge=1, le=MAX_BIG)] | None = None
    cost_per_unit: Fee


class PricingRuleUpdate(_In):
    min: Annotated[int, Field(ge=1, le=MAX_BIG)] | None = None
    max: Annotated[int, Field(ge=1, le=MAX_BIG)] | None = None
    cost_per_unit: Fee | None = None


class PricingRuleOut(_Out):
    plan_id: int
    metric_id: int
    min: int
    max: int | None
    cost_per_unit: Money


# Applications and keys


class ApplicationCreate(_In):
    account_id: Id
    plan_id: Id
    name: Label
    description: Text = ""
    app_id: (
        Annotated[
            str, StringConstraints(min_length=4, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$")
        ]
        | None
    ) = Field(None, description="Public application id; generated when not given.")
    certificates: list[ClientCertificateIn] = Field(
        [], max_length=20, description=_CLIENT_CERTIFICATES
    )


class ApplicationUpdate(_In):
    name: Label | None = None
    description: Text | None = None
    certificates: list[ClientCertificateIn] | None = Field(
        None, max_length=20, description=_CLIENT_CERTIFICATES
    )


class ApplicationOut(_Out):
    account_id: int
    plan_id: int
    product_id: int
    name: str
    description: str
    state: str
    app_id: str
    trial_ends_at: Timestamp | None
    certificates: list[dict[str, str]] | None

    @field_validator("certificates", mode="before")
    @classmethod
    def _set_keys_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [
                {k: v for k, v in c.items() if v is not None} if isinstance(c, dict) else c
                for c in value
            ] or None
        return value


class ApplicationCreated(ApplicationOut):
    key: str | None = Field(
        None, description="The first key, shown only in this response (api_key and app_id_key)."
    )


class PlanChange(_In):
    plan_id: Id


class KeyCreate(_In):
    key: (
        Annotated[str, StringConstraints(min_length=16, max_length=256, pattern=r"^[\x21-\x7e]+$")]
        | None
    ) = Field(None, description="A key of your own; a random one when not given.")


class KeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    hint: str = Field(description="The key's first characters, to tell keys apart.")
    created_at: Timestamp


class KeyCreated(KeyOut):
    key: str = Field(description="The key in clear: shown once, never stored.")


# Tokens, audit, environments, data planes


class TokenCreate(_In):
    name: Label
    scopes: list[Scope] = Field(min_length=1)
    expires_at: UtcTime | None = None


class TokenOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    scopes: list[str]
    created_at: Timestamp
    last_used_at: Timestamp | None
    expires_at: Timestamp | None


class TokenCreated(TokenOut):
    token: str = Field(description="The token in clear: shown once, never stored.")


class AuditOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    at: Timestamp
    actor: str
    action: str
    resource: str
    resource_id: str | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None


class SnapshotOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    env: str
    version: int
    created_at: Timestamp
    digest: str
    reason: str
    size: int


class Published(BaseModel):
    env: str
    version: int | None = Field(description="The environment's version now.")
    changed: bool = Field(description="Whether a new version was published.")
    errors: list[str] = Field(description="Products left out of the compile, and why.")
    skipped: list[str] = Field(
        [], description="Rollback: products of that version deleted since, left out."
    )


class EnvironmentOut(BaseModel):
    name: str
    version: int | None
    created_at: Timestamp | None
    products: list[str]
    errors: list[str] = Field(description="Products left out of the last compile, and why.")


class DataplaneStatus(_In):
    id: Annotated[str, StringConstraints(min_length=1, max_length=200)] = Field(
        pattern=r"^[\x21-\x7e]+$"
    )
    env: Env
    version: Annotated[str, StringConstraints(max_length=64)] | None = None
    error: Annotated[str, StringConstraints(max_length=10_000)] | None = None
    hostname: Annotated[str, StringConstraints(max_length=255)] = ""
    listen: Annotated[str, StringConstraints(max_length=255)] = ""
    pid: Annotated[int, Field(ge=0, le=MAX_ID)] | None = None


class DataplaneOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    env: str
    hostname: str
    listen: str
    pid: int | None
    version: str | None
    error: str | None
    first_seen: Timestamp
    last_seen: Timestamp
    connected: bool = Field(False, description="Seen within the last 60 seconds.")


def backend_usage(path: str, url: str) -> BackendUsage:
    """The gateway's own check of a backend (raises pydantic's ValidationError)."""
    return BackendUsage(path=path, url=url)


def mapping_rule(method: str, pattern: str, metric: str) -> ConfigMappingRule:
    return ConfigMappingRule(method=method, pattern=pattern, metric=metric)  # type: ignore[arg-type]


# The mesh's registry

# Registration ids as the registry makes them (secrets.token_urlsafe).
INSTANCE_ID = r"^[A-Za-z0-9_\-]{1,64}$"


class InstanceRegistration(Instance):
    """A sidecar's instance: where it listens and what it is, as static instances are
    configured, and the service, whether it takes requests now, and the environment."""

    model_config = ConfigDict(strict=True)

    service: ServiceName
    ready: bool = Field(True, description="false: registered, but not among the endpoints.")
    env: Env = "production"


class Registered(BaseModel):
    id: str = Field(description="The registration's id: heartbeat and remove it with it.")
    ttl: float = Field(description="Seconds it lives without a heartbeat; send one every ttl/3.")


class Heartbeat(_In):
    ready: bool = Field(description="Whether the instance takes requests now.")


class HeartbeatOut(BaseModel):
    ttl: float = Field(description="Seconds it lives without another heartbeat.")


class MeshInstanceOut(BaseModel):
    id: str = Field(description="The registration's id; static:ADDRESS:PORT for a static one.")
    env: str
    service: str
    address: str
    port: int
    version: str
    zone: str
    labels: dict[str, str]
    weight: int
    mtls: bool = Field(False, description="Its sidecar speaks mutual TLS (never a static one).")
    ready: bool
    source: Literal["registered", "static"]
    owner: str | None = Field(None, description="The name of the token that registered it.")
    registered_at: Timestamp | None = None
    last_heartbeat: Timestamp | None = None
    expires_in: float | None = Field(None, description="Seconds left without a heartbeat.")
    streams: int = Field(0, description="Endpoint streams open for it (instance=ID).")
