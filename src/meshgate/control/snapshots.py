"""From the SQL model to the snapshot a gateway runs: one JSON ``Config`` document per
environment and version, immutable once written.

A product's gateway configuration (hosts, backends, auth, policies, metrics, mapping rules)
is staged on every change and promoted to production explicitly; its plans, applications and
keys are live data, current in every environment, as in 3scale.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from meshgate.config import ConfigError, parse_config
from meshgate.config.model import Product as ProductConfig
from meshgate.control.models import (
    Account,
    Application,
    ApplicationKey,
    Backend,
    EnvironmentProduct,
    Limit,
    MappingRule,
    Metric,
    Plan,
    Product,
    Snapshot,
)

__all__ = [
    "ENVIRONMENTS",
    "Compiled",
    "StagingError",
    "compile_environment",
    "product_document",
    "publish",
    "stage_product",
]

PolicySchemas = Mapping[str, type[BaseModel]]
ENVIRONMENTS = ("staging", "production")
# Parts of a compiled product that are live data rather than promoted configuration.
LIVE_PARTS = ("plans", "applications")


def product_document(session: Session, product: Product) -> dict[str, Any]:
    """The product's gateway configuration as the snapshot carries it (no plans or apps)."""
    metrics = session.execute(
        select(Metric.id, Metric.name, Metric.parent_id, Metric.description)
        .where(Metric.product_id == product.id)
        .order_by(Metric.id)
    ).all()
    names = {m.id: m.name for m in metrics}
    rules = session.execute(
        select(MappingRule)
        .where(MappingRule.product_id == product.id)
        .order_by(MappingRule.position, MappingRule.id)
    ).scalars()
    backends = session.execute(
        select(Backend.path, Backend.url).where(Backend.product_id == product.id)
    ).all()
    doc: dict[str, Any] = {
        "name": product.name,
        "hosts": list(product.hosts),
        "path_prefix": product.path_prefix,
        "strip_prefix": product.strip_prefix,
        "backends": [{"path": b.path, "url": b.url} for b in backends],
        "auth": dict(product.auth),
        "metrics": [
            {"name": m.name, "parent": names.get(m.parent_id), "description": m.description}
            for m in metrics
        ],
        "mapping_rules": [
            {
                "method": r.http_method,
                "pattern": r.pattern,
                "metric": names[r.metric_id],
                "increment": r.delta,
                "last": r.last,
            }
            for r in rules
        ],
        "policies": list(product.policies),
        "key_salt": product.key_salt,
    }
    for name in ("max_body_size", "upstream_connect_timeout", "upstream_response_timeout"):
        value = getattr(product, name)
        if value is not None:
            doc[name] = value
    if product.protocol != "http1":
        doc["protocol"] = product.protocol
    # Only when not the default: snapshots of products that leave them alone stay as they
    # were, and gateways that predate the settings keep running them.
    if not product.hide_credentials:
        doc["hide_credentials"] = False
    if product.case_insensitive_rules:
        doc["case_insensitive_rules"] = True
    if product.upstream_tls is not None:
        doc["upstream_tls"] = {k: v for k, v in product.upstream_tls.items() if v is not None}
    if product.certificate is not None:
        doc["certificate"] = product.certificate
    if not product.websocket:
        doc["websocket"] = False
    if product.max_upstream_connections != 1024:
        doc["max_upstream_connections"] = product.max_upstream_connections
    return doc


def client_certificates(stored: list[dict[str, Any]]) -> list[dict[str, str]]:
    """An application's client certificates as a gateway file has them (set keys only)."""
    return [{k: v for k, v in c.items() if v is not None} for c in stored]


class StagingError(ValueError):
    """A product configuration a gateway would refuse; ``problems`` are (path, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__(
            "; ".join(f"{path}: {message}" if path else message for path, message in problems)
        )
        self.problems = problems


# What staging accepts although a gateway would not yet: it depends on data that comes later
# (a backend, the default application), and the compile leaves such a product out meanwhile.
_LATER = ("give either backend or backends", "default_application")


def configuration_problems(
    doc: dict[str, Any], policy_schemas: PolicySchemas | None = None
) -> list[tuple[str, str]]:
    """What a gateway would refuse in a product's configuration, live data aside: checked as
    the gateway checks a snapshot (strictly, and each policy against its schema when given)."""
    config = {"products": [{**doc, "plans": [], "applications": []}]}
    try:
        parse_config(json.dumps(config), "product", policy_schemas=policy_schemas)
    except ConfigError as exc:
        problems = []
        for line in exc.errors:
            path, _, message = line.partition(": ")
            if any(later in message for later in _LATER):
                continue
            path = path.removeprefix("products[0]").removeprefix(".")
            problems.append((path, message))
        return problems
    return []


def stage_product(
    session: Session, product: Product, policy_schemas: PolicySchemas | None = None
) -> dict[str, Any]:
    """Write the product's configuration to staging; raise :class:`StagingError` if a gateway
    could not run it (the caller's transaction then rolls back)."""
    doc = product_document(session, product)
    problems = configuration_problems(doc, policy_schemas)
    if problems:
        raise StagingError(problems)
    row = session.get(EnvironmentProduct, ("staging", product.id))
    if row is None:
        session.add(EnvironmentProduct(env="staging", product_id=product.id, document=doc))
    else:
        row.document = doc
    return doc


@dataclass
class Compiled:
    env: str
    products: list[dict[str, Any]]
    errors: list[str]


def compile_environment(session: Session, env: str) -> Compiled:
    """The environment's products with their current plans, applications and key hashes."""
    configs = session.execute(
        select(EnvironmentProduct.product_id, EnvironmentProduct.document)
        .where(EnvironmentProduct.env == env)
        .order_by(EnvironmentProduct.product_id)
    ).all()
    wanted = [c.product_id for c in configs]
    plans_by_product: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for plan_id, product_id, name in session.execute(
        select(Plan.id, Plan.product_id, Plan.name).order_by(Plan.id)
    ):
        plans_by_product[product_id].append((plan_id, name))
    limits: dict[int, list[tuple[str, str, int]]] = defaultdict(list)
    for plan_id, metric, period, value in session.execute(
        select(Limit.plan_id, Metric.name, Limit.period, Limit.value)
        .join(Metric, Metric.id == Limit.metric_id)
        .order_by(Limit.id)
    ):
        limits[plan_id].append((metric, period, value))
    key_hashes: dict[int, list[str]] = defaultdict(list)
    for app_id, key_hash in session.execute(
        select(ApplicationKey.application_id, ApplicationKey.key_hash).order_by(ApplicationKey.id)
    ):
        key_hashes[app_id].append(key_hash)
    apps_by_product: dict[int, list[dict[str, Any]]] = defaultdict(list)
    rows = session.execute(
        select(
            Application.id,
            Application.product_id,
            Application.app_id,
            Application.state,
            Plan.name,
            Account.state,
            Application.certificates,
            Application.name,
            Account.name,
        )
        .join(Plan, Plan.id == Application.plan_id)
        .join(Account, Account.id == Application.account_id)
        .order_by(Application.id)
    )
    for row_id, product_id, public_id, state, plan, account_state, certs, name, account in rows:
        # As 3scale: a suspended (or not yet approved) account's applications are refused.
        if account_state != "approved" and state == "live":
            state = "suspended" if account_state == "suspended" else "pending"
        # Name and account ride in the consumer token the gateway sends into the mesh.
        app: dict[str, Any] = {"id": public_id, "plan": plan, "name": name, "account": account}
        if state != "live":
            app["state"] = state
        hashes = key_hashes.get(row_id)
        if hashes:
            app["key_hashes"] = hashes
        if certs:
            app["certificates"] = client_certificates(certs)
        apps_by_product[product_id].append(app)

    products, errors = [], []
    for product_id, config in zip(wanted, (c.document for c in configs), strict=True):
        metrics = {m["name"] for m in config.get("metrics", ())}
        plans = [
            {
                "name": name,
                "limits": [
                    {"metric": metric, "period": period, "value": value}
                    for metric, period, value in limits.get(plan_id, ())
                    # A limit on a metric this environment's configuration lacks yet.
                    if metric in metrics
                ],
            }
            for plan_id, name in plans_by_product.get(product_id, ())
        ]
        doc = {**config, "plans": plans, "applications": apps_by_product.get(product_id, [])}
        if not doc.get("backends"):
            errors.append(f"product {config['name']!r} has no backend yet: left out")
            continue
        try:
            ProductConfig.model_validate(doc)
        except ValidationError as exc:
            first = exc.errors()[0]
            message = str(first["msg"]).removeprefix("Value error, ")
            errors.append(f"product {config['name']!r} left out: {message}")
            continue
        products.append(doc)
    return Compiled(env, products, errors)


def canonical(products: list[dict[str, Any]]) -> tuple[str, str]:
    """The products as compact JSON, and its digest (equal content, equal digest)."""
    body = _compact(products)
    return body, hashlib.sha256(body.encode()).hexdigest()


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def latest(session: Session, env: str) -> Snapshot | None:
    return session.scalars(
        select(Snapshot).where(Snapshot.env == env).order_by(Snapshot.version.desc()).limit(1)
    ).first()


def publish(
    session: Session, env: str, reason: str, compiled: Compiled | None = None
) -> Snapshot | None:
    """Compile and store a new version when the content changed; None when it did not."""
    compiled = compiled or compile_environment(session, env)
    # Each product on its own line: a gateway parses and validates the document product by
    # product, never holding the GIL for the whole of it. Joined without the line breaks,
    # the parts are canonical's body (json.dumps of a list is its items joined by commas):
    # the digest, and so the versions, are those of canonical.
    parts = [_compact(product) for product in compiled.products]
    body = "[" + ",".join(parts) + "]"
    digest = hashlib.sha256(body.encode()).hexdigest()
    current = latest(session, env)
    if current is not None and current.digest == digest:
        return None
    version = (current.version if current is not None else 0) + 1
    lines = "[\n" + ",\n".join(parts) + "\n]" if parts else "[]"
    document = f'{{"version":"{version}","products":{lines}}}'
    snapshot = Snapshot(
        env=env,
        version=version,
        digest=digest,
        reason=reason[:200],
        size=len(document.encode()),
        document=document,
    )
    session.add(snapshot)
    session.flush()
    return snapshot


def restore(session: Session, env: str, document: dict[str, Any]) -> list[str]:
    """Set the environment's product configurations to those of an older snapshot; products
    deleted since are skipped (their names are returned), renamed ones found by their salt."""
    # A product's salt is made with it and never changes, its name may: the salt finds a
    # renamed product, and never a new product that took a deleted one's name (the old
    # configuration's salt would not match its keys).
    by_salt = dict(session.execute(select(Product.key_salt, Product.id)).tuples().all())
    session.execute(delete(EnvironmentProduct).where(EnvironmentProduct.env == env))
    session.flush()
    skipped = []
    for product in document.get("products", ()):
        product_id = by_salt.get(product.get("key_salt"))
        if product_id is None:
            skipped.append(product["name"])
            continue
        config = {k: v for k, v in product.items() if k not in LIVE_PARTS}
        session.add(EnvironmentProduct(env=env, product_id=product_id, document=config))
    return skipped


def versions(session: Session, env: str) -> int:
    return session.scalar(select(func.count()).where(Snapshot.env == env)) or 0
