"""The management model in SQL, as 3scale's: accounts, products, plans, applications, keys.

Every table the admin API edits carries ``version``, SQLAlchemy's optimistic-lock column:
two concurrent updates of one row cannot both commit, and the ETag of a resource is it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, declared_attr, mapped_column, relationship

__all__ = [
    "Account",
    "AdminToken",
    "Application",
    "ApplicationKey",
    "AuditEntry",
    "Backend",
    "Base",
    "BootstrapToken",
    "CaAuthority",
    "Dataplane",
    "EnvironmentProduct",
    "Limit",
    "MappingRule",
    "MeshService",
    "MeshSnapshot",
    "Metric",
    "Plan",
    "PricingRule",
    "Product",
    "Snapshot",
    "User",
    "utcnow",
]

# Named constraints, so that migrations can alter them on SQLite and PostgreSQL alike.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Money = Numeric(14, 4)


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class _Resource:
    """Columns every admin-API resource has."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )
    version: Mapped[int] = mapped_column(Integer, nullable=False)

    @declared_attr.directive
    def __mapper_args__(cls) -> dict[str, Any]:
        return {"version_id_col": cls.__table__.c.version}  # type: ignore[attr-defined]


class Account(_Resource, Base):
    """A developer organisation: owns users and applications."""

    __tablename__ = "accounts"
    name: Mapped[str] = mapped_column(String(200), unique=True)
    email: Mapped[str | None] = mapped_column(String(320))
    state: Mapped[str] = mapped_column(String(16), default="approved")
    description: Mapped[str] = mapped_column(Text, default="")


class User(_Resource, Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("account_id", "username"),)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    username: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(320))
    role: Mapped[str] = mapped_column(String(16), default="member")
    state: Mapped[str] = mapped_column(String(16), default="active")


class Product(_Resource, Base):
    """An API product: how it is reached, authenticated and which policies run."""

    __tablename__ = "products"
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    hosts: Mapped[list[Any]] = mapped_column(JSON, default=lambda: ["*"])
    path_prefix: Mapped[str] = mapped_column(String(1000), default="/")
    strip_prefix: Mapped[bool] = mapped_column(Boolean, default=True)
    auth: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Server defaults too: the columns came after products existed (migration 0003).
    hide_credentials: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    case_insensitive_rules: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=false()
    )
    policies: Mapped[list[Any]] = mapped_column(JSON, default=list)
    max_body_size: Mapped[int | None] = mapped_column(BigInteger)
    upstream_connect_timeout: Mapped[float | None]
    upstream_response_timeout: Mapped[float | None]
    # HTTP to the backends: http1, h2 (over TLS) or h2c (cleartext HTTP/2, e.g. gRPC).
    protocol: Mapped[str] = mapped_column(String(8), default="http1", server_default="http1")
    # TLS to https:// backends: ca_file, verify, server_name, client_cert, client_key.
    upstream_tls: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The gateway's TLS listener certificate (by name) that serves this product's hosts.
    certificate: Mapped[str | None] = mapped_column(String(200))
    websocket: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    max_upstream_connections: Mapped[int] = mapped_column(
        Integer, default=1024, server_default=text("1024")
    )
    key_salt: Mapped[str] = mapped_column(String(64))
    openapi: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    backends: Mapped[list[Backend]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="Backend.path"
    )
    metrics: Mapped[list[Metric]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="Metric.id"
    )
    mapping_rules: Mapped[list[MappingRule]] = relationship(
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="(MappingRule.position, MappingRule.id)",
    )


class Backend(_Resource, Base):
    """A backend used by a product at a path (3scale's backend usage)."""

    __tablename__ = "backends"
    __table_args__ = (UniqueConstraint("product_id", "path"),)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(String(1000), default="/")
    url: Mapped[str] = mapped_column(String(2000))
    name: Mapped[str] = mapped_column(String(200), default="")


class Metric(_Resource, Base):
    """A metric, or a method when its parent is ``hits``."""

    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("product_id", "name"),)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("metrics.id", ondelete="CASCADE"))
    friendly_name: Mapped[str] = mapped_column(String(200), default="")
    unit: Mapped[str] = mapped_column(String(50), default="hit")
    description: Mapped[str] = mapped_column(Text, default="")


class MappingRule(_Resource, Base):
    __tablename__ = "mapping_rules"
    product_id: Mapped[int] = mapped_column(
        ForeignKey("products.id", ondelete="CASCADE"), index=True
    )
    http_method: Mapped[str] = mapped_column(String(8), default="ANY")
    pattern: Mapped[str] = mapped_column(String(2000))
    metric_id: Mapped[int] = mapped_column(ForeignKey("metrics.id", ondelete="CASCADE"))
    delta: Mapped[int] = mapped_column(Integer, default=1)
    last: Mapped[bool] = mapped_column(Boolean, default=False)
    position: Mapped[int] = mapped_column(Integer, default=0)


class Plan(_Resource, Base):
    """An application plan: limits and pricing of a product for the applications on it."""

    __tablename__ = "plans"
    __table_args__ = (
        UniqueConstraint("product_id", "name"),
        # One default plan per product, even when two requests make one at the same time.
        Index(
            "uq_plans_one_default",
            "product_id",
            unique=True,
            sqlite_where=text("is_default"),
            postgresql_where=text("is_default"),
        ),
    )
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    state: Mapped[str] = mapped_column(String(16), default="draft")
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    approval_required: Mapped[bool] = mapped_column(Boolean, default=False)
    setup_fee: Mapped[Decimal] = mapped_column(Money, default=Decimal(0))
    monthly_fee: Mapped[Decimal] = mapped_column(Money, default=Decimal(0))
    trial_days: Mapped[int] = mapped_column(Integer, default=0)


class Limit(_Resource, Base):
    __tablename__ = "limits"
    __table_args__ = (UniqueConstraint("plan_id", "metric_id", "period"),)
    plan_id: Mapped[int] = mapped_column(ForeignKey("plans.id", ondelete="CASCADE"))
    metric_id: Mapped[int] = mapped_column(ForeignKey("metrics.id", ondelete="CASCADE"))
    period: Mapped[str] = mapped_column(String(16))
    value: Mapped[int] = mapped_column(BigInteger)


class PricingRule(_Resource, Base):
    """Cost per unit of a metric for usage between ``min`` and ``max`` in a month (tiers)."""

    __tablename__ = "pricing_rules"
    plan_id: Mapped[int] = mapped_column(ForeignKey("plans.id", ondelete="CASCADE"), index=True)
    metric_id: Mapped[int] = mapped_column(ForeignKey("metrics.id", ondelete="CASCADE"))
    min: Mapped[int] = mapped_column(BigInteger, default=1)
    max: Mapped[int | None] = mapped_column(BigInteger)
    cost_per_unit: Mapped[Decimal] = mapped_column(Money)


class Application(_Resource, Base):
    """An account's subscription to a product through a plan, with its credentials."""

    __tablename__ = "applications"
    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    plan_id: Mapped[int] = mapped_column(ForeignKey("plans.id"), index=True)
    # The plan's product, kept here so that listing and compiling need no join.
    product_id: Mapped[int] = mapped_column(
        ForeignKey("products.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    state: Mapped[str] = mapped_column(String(16), default="live")
    # The public identifier: app_id for app_id_key, the client id claim for jwt.
    app_id: Mapped[str] = mapped_column(String(200), unique=True)
    trial_ends_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # auth mtls: [{sha256}, {subject} or {san}], the client certificates that identify it.
    certificates: Mapped[list[dict[str, str]] | None] = mapped_column(JSON)


class ApplicationKey(Base):
    """A key of an application, stored only as a salted hash of the product's salt."""

    __tablename__ = "application_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    application_id: Mapped[int] = mapped_column(
        ForeignKey("applications.id", ondelete="CASCADE"), index=True
    )
    # Unique per product through the salt: two equal keys of one product hash the same.
    key_hash: Mapped[str] = mapped_column(String(80))
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"))
    hint: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (UniqueConstraint("product_id", "key_hash"),)


class AdminToken(Base):
    __tablename__ = "admin_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    token_hash: Mapped[str] = mapped_column(String(80), unique=True)
    scopes: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AuditEntry(Base):
    """One change: who made it, to what, and the resource before and after."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(32))
    resource: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str | None] = mapped_column(String(64))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class EnvironmentProduct(Base):
    """A product's gateway configuration as an environment has it (staging: every change;
    production: what was promoted). Plans and applications are not here: they are live."""

    __tablename__ = "environment_products"
    env: Mapped[str] = mapped_column(String(32), primary_key=True)
    product_id: Mapped[int] = mapped_column(
        ForeignKey("products.id", ondelete="CASCADE"), primary_key=True
    )
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class _Compiled:
    """Columns of an immutable, versioned document of one environment."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    env: Mapped[str] = mapped_column(String(32))
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    digest: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(200))
    size: Mapped[int] = mapped_column(Integer)
    document: Mapped[str] = mapped_column(Text)


class Snapshot(_Compiled, Base):
    """An immutable compiled configuration of one environment; every version is kept."""

    __tablename__ = "snapshots"
    __table_args__ = (UniqueConstraint("env", "version"), Index("ix_snapshots_env", "env"))


class MeshService(Base):
    """A mesh service's traffic configuration as an environment has it (staging: every
    change; production: what was promoted), as the document a sidecar reads."""

    __tablename__ = "mesh_services"
    env: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(253), primary_key=True)
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class MeshSnapshot(_Compiled, Base):
    """An immutable mesh configuration (``MeshConfig``) of one environment; every version
    is kept."""

    __tablename__ = "mesh_snapshots"
    __table_args__ = (UniqueConstraint("env", "version"),)


class Dataplane(Base):
    """A gateway attached to the control plane, as it last reported itself."""

    __tablename__ = "dataplanes"
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    env: Mapped[str] = mapped_column(String(32))
    hostname: Mapped[str] = mapped_column(String(255), default="")
    listen: Mapped[str] = mapped_column(String(255), default="")
    pid: Mapped[int | None] = mapped_column(Integer)
    version: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CaAuthority(Base):
    """A signing certificate of the mesh's CA: a root it made (``active`` signs, ``previous``
    is still trusted while a rotation lasts, ``retired`` is neither). The private key is
    encrypted (AES-GCM) with a key the store never sees."""

    __tablename__ = "ca_authorities"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    cert_pem: Mapped[str] = mapped_column(Text)
    key_encrypted: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class BootstrapToken(Base):
    """A token that lets one service of one environment obtain its first certificate;
    stored only as a SHA-256 hash."""

    __tablename__ = "mesh_bootstrap_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(80), unique=True)
    service: Mapped[str] = mapped_column(String(128))
    env: Mapped[str] = mapped_column(String(32))
    single_use: Mapped[bool] = mapped_column(Boolean, default=False)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200), default="")
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    uses: Mapped[int] = mapped_column(Integer, default=0)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
