"""Declarative management: the control plane's model as a gateway configuration file, and a
file applied back as the difference it makes (as Kong's deck ``dump`` and ``sync``).

The file format is the gateway's own (``meshgate.config.Config``); what it cannot say is kept
as it is: accounts and users, plan pricing and states, product descriptions. Applications
created from a file belong to the account :data:`DEFAULT_ACCOUNT`; existing ones keep theirs.

Applying synchronises: products the file does not name are removed, unless ``prune`` is off;
within a product the file names, the file is the whole product (backends, metrics, mapping
rules, plans, limits, and, unless ``applications`` is off, applications and their keys).

The file's optional ``mesh: {services: [...]}`` section is the mesh's services in staging, as
products are (promoted with ``POST /admin/api/mesh/promote``): a file with the section
synchronises them the same way, services it does not name being removed unless ``prune`` is
off; a file without it leaves the mesh alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from difflib import SequenceMatcher
from typing import Any, Literal

from pydantic import BaseModel, TypeAdapter, ValidationError
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from meshgate.config import Auth, Config, hash_key, new_salt
from meshgate.config import Product as ProductConfig
from meshgate.config.mesh import Service
from meshgate.control import _mesh
from meshgate.control import schemas as s
from meshgate.control._applications import MAX_KEYS
from meshgate.control._auth import Actor
from meshgate.control._crud import audit
from meshgate.control._problems import Problem
from meshgate.control.models import (
    Account,
    Application,
    ApplicationKey,
    AuditEntry,
    Backend,
    Limit,
    MappingRule,
    MeshSnapshot,
    Metric,
    Plan,
    Product,
    utcnow,
)
from meshgate.control.snapshots import client_certificates

__all__ = [
    "DEFAULT_ACCOUNT",
    "Change",
    "FieldErrors",
    "Options",
    "Outcome",
    "export_document",
    "synchronise",
]

# The account that applications created from a file belong to (the format has no accounts).
DEFAULT_ACCOUNT = "default"
# Product columns the file sets; description, salt and the OpenAPI document are not among them.
SETTINGS = (
    "hosts",
    "path_prefix",
    "strip_prefix",
    "auth",
    "hide_credentials",
    "case_insensitive_rules",
    "policies",
    "max_body_size",
    "upstream_connect_timeout",
    "upstream_response_timeout",
    "protocol",
    "upstream_tls",
    "certificate",
    "websocket",
    "max_upstream_connections",
)
_OPTIONAL = (
    "max_body_size",
    "upstream_connect_timeout",
    "upstream_response_timeout",
    "certificate",
)
# Settings exported only when they differ from the file's default, as a gateway file has them.
_SWITCHES = {
    name: ProductConfig.model_fields[name].default
    for name in (
        "hide_credentials",
        "case_insensitive_rules",
        "websocket",
        "max_upstream_connections",
    )
}
_AUTH: TypeAdapter[Any] = TypeAdapter(Auth)

Rule = tuple[str, str, str, int, bool]  # method, pattern, metric, increment, last


@dataclass(frozen=True)
class Options:
    prune: bool = True  # remove the products the file does not name
    applications: bool = True  # False: leave applications and their keys as they are


@dataclass
class Change:
    """One resource added, changed (field: old → new) or removed."""

    action: Literal["add", "change", "remove"]
    resource: str
    product: str
    name: str = ""
    fields: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def text(self) -> str:
        sign = {"add": "+", "change": "~", "remove": "-"}[self.action]
        where = f"{self.product} {self.name}" if self.name else self.product
        if self.action == "change":
            parts = [f"{k}: {_short(old)} → {_short(new)}" for k, (old, new) in self.fields.items()]
        else:
            side = 1 if self.action == "add" else 0
            values = {k: pair[side] for k, pair in self.fields.items()}
            parts = [f"{k}={_short(v)}" for k, v in values.items() if v is not None]
        return f"{sign} {self.resource} {where}" + (": " + ", ".join(parts) if parts else "")

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "resource": self.resource,
            "product": self.product,
            "name": self.name,
            "fields": {k: {"old": old, "new": new} for k, (old, new) in self.fields.items()},
            "text": self.text(),
        }


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= 80 else text[:79] + "…"


def _hint(key_hash: str) -> str:
    return key_hash[:15] + "…"


@dataclass
class Outcome:
    changes: list[Change]
    notes: list[str]
    applied: bool
    # Products whose gateway configuration changed, and whether live data (plans, limits,
    # applications, keys) or the set of products did: what the caller recompiles.
    config_changed: bool = False
    live_changed: bool = False
    # The staging mesh version the apply published, for the caller to announce.
    mesh_snapshot: MeshSnapshot | None = None

    def summary(self) -> dict[str, int]:
        counts = {"add": 0, "change": 0, "remove": 0}
        for change in self.changes:
            counts[change.action] += 1
        return counts

    def to_json(self) -> dict[str, Any]:
        return {
            "applied": self.applied,
            "summary": self.summary(),
            "changes": [c.to_json() for c in self.changes],
            "notes": self.notes,
        }


@dataclass
class AppState:
    plan: str
    state: str
    keys: tuple[str, ...]  # key hashes, oldest first
    # auth mtls: the client certificates, each {sha256}, {subject} or {san} (set keys only).
    certificates: list[dict[str, str]] = field(default_factory=list)


@dataclass
class ProductState:
    """A product as the file format sees it, from either side, compared field by field."""

    name: str
    settings: dict[str, Any]
    key_salt: str
    backends: dict[str, str]
    metrics: dict[str, tuple[str | None, str]]  # name -> (parent, description)
    rules: list[Rule]
    plans: dict[str, dict[tuple[str, str], int]]  # name -> (metric, period) -> value
    applications: dict[str, AppState]
    # Key hash -> hint, for keys a file gives in clear (the admin API's hint of a key).
    hints: dict[str, str] = field(default_factory=dict)


@dataclass
class _Current:
    """A stored product: its state and the rows it was read from."""

    row: Product
    state: ProductState
    backends: dict[str, Backend] = field(default_factory=dict)
    metrics: dict[str, Metric] = field(default_factory=dict)
    rules: list[MappingRule] = field(default_factory=list)
    plans: dict[str, Plan] = field(default_factory=dict)
    limits: dict[tuple[str, str, str], Limit] = field(default_factory=dict)
    apps: dict[str, Application] = field(default_factory=dict)
    keys: dict[tuple[str, str], ApplicationKey] = field(default_factory=dict)


def normal_auth(value: Any) -> dict[str, Any]:
    """The auth settings with every default filled in, so that equal settings compare equal."""
    try:
        return dict(_AUTH.validate_python(value).model_dump(mode="json"))
    except ValidationError:
        return dict(value)


# Reading the store


def _load(session: Session, names: Iterable[str] | None) -> dict[str, _Current]:
    """The stored products (all, or those named), each with its rows, in id order."""
    query = select(Product).order_by(Product.id)
    if names is not None:
        query = query.where(Product.name.in_(list(names)))
    products = {p.id: p for p in session.scalars(query)}
    by_id: dict[int, _Current] = {}
    for product in products.values():
        settings = {k: getattr(product, k) for k in SETTINGS}
        settings["hosts"] = list(product.hosts)
        settings["policies"] = list(product.policies)
        settings["auth"] = normal_auth(product.auth)
        state = ProductState(product.name, settings, product.key_salt, {}, {}, [], {}, {})
        by_id[product.id] = _Current(product, state)
    ids = list(by_id)
    if not ids:
        return {}
    for backend in session.scalars(
        select(Backend).where(Backend.product_id.in_(ids)).order_by(Backend.path)
    ):
        cur = by_id[backend.product_id]
        cur.backends[backend.path] = backend
        cur.state.backends[backend.path] = backend.url
    metric_names: dict[int, str] = {}
    metrics = session.scalars(
        select(Metric).where(Metric.product_id.in_(ids)).order_by(Metric.id)
    ).all()
    for metric in metrics:
        metric_names[metric.id] = metric.name
    for metric in metrics:
        cur = by_id[metric.product_id]
        cur.metrics[metric.name] = metric
        parent = None if metric.parent_id is None else metric_names[metric.parent_id]
        cur.state.metrics[metric.name] = (parent, metric.description)
    for rule in session.scalars(
        select(MappingRule)
        .where(MappingRule.product_id.in_(ids))
        .order_by(MappingRule.position, MappingRule.id)
    ):
        cur = by_id[rule.product_id]
        cur.rules.append(rule)
        metric_name = metric_names[rule.metric_id]
        cur.state.rules.append((rule.http_method, rule.pattern, metric_name, rule.delta, rule.last))
    plan_names: dict[int, tuple[_Current, str]] = {}
    for plan in session.scalars(select(Plan).where(Plan.product_id.in_(ids)).order_by(Plan.id)):
        cur = by_id[plan.product_id]
        cur.plans[plan.name] = plan
        cur.state.plans[plan.name] = {}
        plan_names[plan.id] = (cur, plan.name)
    for limit in session.scalars(
        select(Limit)
        .join(Plan, Plan.id == Limit.plan_id)
        .where(Plan.product_id.in_(ids))
        .order_by(Limit.id)
    ):
        cur, plan_name = plan_names[limit.plan_id]
        metric_name = metric_names[limit.metric_id]
        cur.limits[(plan_name, metric_name, limit.period)] = limit
        cur.state.plans[plan_name][(metric_name, limit.period)] = limit.value
    app_ids: dict[int, str] = {}
    for app in session.scalars(
        select(Application).where(Application.product_id.in_(ids)).order_by(Application.id)
    ):
        cur = by_id[app.product_id]
        cur.apps[app.app_id] = app
        app_ids[app.id] = app.app_id
        _, plan_name = plan_names[app.plan_id]
        cur.state.applications[app.app_id] = AppState(
            plan_name, app.state, (), client_certificates(app.certificates or [])
        )
    for key in session.scalars(
        select(ApplicationKey).where(ApplicationKey.product_id.in_(ids)).order_by(ApplicationKey.id)
    ):
        cur = by_id[key.product_id]
        app_id = app_ids[key.application_id]
        cur.keys[(app_id, key.key_hash)] = key
        app_state = cur.state.applications[app_id]
        app_state.keys = (*app_state.keys, key.key_hash)
    return {cur.state.name: cur for cur in by_id.values()}


# Export


def render(state: ProductState, applications: bool = True) -> dict[str, Any]:
    """A product in the file format: explicit where a reader looks, terse in long lists."""
    settings = state.settings
    doc: dict[str, Any] = {
        "name": state.name,
        "hosts": settings["hosts"],
        "path_prefix": settings["path_prefix"],
        "strip_prefix": settings["strip_prefix"],
    }
    if list(state.backends) == ["/"]:
        doc["backend"] = state.backends["/"]
    else:
        doc["backends"] = [{"path": p, "url": u} for p, u in state.backends.items()]
    try:
        doc["auth"] = _AUTH.validate_python(settings["auth"]).model_dump(
            mode="json", exclude_defaults=True
        )
    except ValidationError:
        doc["auth"] = settings["auth"]
    doc["metrics"] = [
        {
            "name": name,
            **({"parent": parent} if parent else {}),
            **({"description": d} if d else {}),
        }
        for name, (parent, d) in state.metrics.items()
    ]
    doc["mapping_rules"] = [
        {
            "method": method,
            "pattern": pattern,
            "metric": metric,
            **({"increment": increment} if increment != 1 else {}),
            **({"last": True} if last else {}),
        }
        for method, pattern, metric, increment, last in state.rules
    ]
    doc["plans"] = [
        {
            "name": name,
            "limits": [
                {"metric": metric, "period": period, "value": value}
                for (metric, period), value in limits.items()
            ],
        }
        for name, limits in state.plans.items()
    ]
    doc["policies"] = settings["policies"]
    for name in _OPTIONAL:
        if settings[name] is not None:
            doc[name] = settings[name]
    if settings["protocol"] != "http1":
        doc["protocol"] = settings["protocol"]
    for name, default in _SWITCHES.items():
        if settings[name] != default:
            doc[name] = settings[name]
    if settings["upstream_tls"] is not None:
        doc["upstream_tls"] = {k: v for k, v in settings["upstream_tls"].items() if v is not None}
    if applications:
        doc["applications"] = [
            {
                "id": app_id,
                "plan": app.plan,
                **({"state": app.state} if app.state != "live" else {}),
                **({"key_hashes": list(app.keys)} if app.keys else {}),
                **({"certificates": app.certificates} if app.certificates else {}),
            }
            for app_id, app in state.applications.items()
        ]
        doc["key_salt"] = state.key_salt
    return doc


def export_document(
    session: Session, applications: bool = True, names: Iterable[str] | None = None
) -> dict[str, Any]:
    """The control plane's products in the gateway file format; keys only as salted hashes.
    With every product, the mesh's staging services too, in a ``mesh`` section (none when
    there are none)."""
    current = _load(session, names)
    document: dict[str, Any] = {
        "products": [render(cur.state, applications) for cur in current.values()]
    }
    if names is None:
        services = list(_mesh.documents(session, "staging").values())
        if services:
            document["mesh"] = {"services": services}
    return document


# The file's side


@dataclass
class FieldErrors:
    """Problems found in a document, each at its path; raised together as one problem."""

    items: list[dict[str, str]] = field(default_factory=list)

    def add(self, path: str, message: str) -> None:
        self.items.append({"field": path, "message": message})

    def raise_if_any(self, status: int = 422) -> None:
        if self.items:
            detail = "; ".join(f"{e['field']}: {e['message']}" for e in self.items[:5])
            if len(self.items) > 5:
                detail += f"; and {len(self.items) - 5} more"
            raise Problem(status, detail, errors=self.items)


# What the admin API accepts for the same values (the lengths the columns hold, ranges), with
# the file's field names where they differ from the columns'.
_ADMIN_CHECKS: list[tuple[type[BaseModel], str, dict[str, str]]] = [
    (s.BackendCreate, "backends", {}),
    (s.MetricCreate, "metrics", {}),
    (s.MappingRuleCreate, "mapping_rules", {"method": "http_method", "increment": "delta"}),
    (s.PlanCreate, "plans", {}),
]


def _admin_check(
    errors: FieldErrors,
    model: type[BaseModel],
    item: dict[str, Any],
    where: str,
    renames: dict[str, str],
) -> None:
    data = {renames.get(k, k): v for k, v in item.items()}
    data = {k: v for k, v in data.items() if k in model.model_fields}
    if model is s.MappingRuleCreate:
        data["metric_id"] = 1  # a name in the file, checked by the configuration model
    try:
        model.model_validate(data)
    except ValidationError as exc:
        back = {column: name for name, column in renames.items()}
        for error in exc.errors(include_url=False):
            path = where
            for part in error["loc"]:
                path += f"[{part}]" if isinstance(part, int) else f".{back.get(part, part)}"
            errors.add(path, str(error["msg"]).removeprefix("Value error, "))


def _nul_paths(value: Any, path: str) -> Iterable[str]:
    # PostgreSQL text cannot hold NUL: refused everywhere so that both stores agree.
    if isinstance(value, str):
        if "\x00" in value:
            yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _nul_paths(key, path)
            yield from _nul_paths(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _nul_paths(item, f"{path}[{index}]")


def _check_file(config: Config, options: Options) -> None:
    """What the control plane's model cannot hold although a gateway could run it."""
    errors = FieldErrors()
    owner: dict[str, str] = {}
    for i, product in enumerate(config.products):
        where = f"products[{i}]"
        dumped = product.model_dump(mode="json")
        for path in _nul_paths(dumped, where):
            errors.add(path, "must not contain NUL characters")
        fields = {k: dumped[k] for k in (*SETTINGS, "name", "backend")}
        _admin_check(errors, s.ProductCreate, fields, where, {})
        for j, usage in enumerate(product.backends):
            if usage.protocol is not None and usage.protocol != product.protocol:
                errors.add(
                    f"{where}.backends[{j}].protocol",
                    "the control plane holds one protocol per product: set the product's "
                    "protocol instead",
                )
        for model, part, renames in _ADMIN_CHECKS:
            for j, item in enumerate(dumped[part]):
                _admin_check(errors, model, item, f"{where}.{part}[{j}]", renames)
        parents = {m.name: m.parent for m in product.metrics}
        if parents.get("hits", "missing") is not None:
            errors.add(
                f"{where}.metrics",
                "must hold a top-level hits metric: the control plane counts hits in every "
                "product (add {name: hits})",
            )
        for j, metric in enumerate(product.metrics):
            parent = metric.parent
            if parent is not None and parents.get(parent) is not None:
                errors.add(
                    f"{where}.metrics[{j}].parent",
                    f"{parent!r} is itself a method of {parents[parent]!r}: a method's parent "
                    "must be a top-level metric",
                )
        for j, plan in enumerate(product.plans):
            for k, limit in enumerate(plan.limits):
                if limit.value > s.MAX_BIG:
                    errors.add(f"{where}.plans[{j}].limits[{k}].value", "is too large")
        if not options.applications:
            continue
        for j, app in enumerate(product.applications):
            here = f"{where}.applications[{j}]"
            if app.client_id is not None and app.client_id != app.id:
                errors.add(
                    f"{here}.client_id",
                    "the control plane identifies an application by its id, also in the jwt "
                    f"claim: give id: {app.client_id!r} instead",
                )
            if app.id in owner:
                errors.add(
                    f"{here}.id",
                    f"application {app.id!r} is also in product {owner[app.id]!r}: application "
                    "ids are unique across products in the control plane",
                )
            owner.setdefault(app.id, product.name)
            for k, key in enumerate(app.keys):
                if not key or len(key) > 256:
                    errors.add(f"{here}.keys[{k}]", "must be 1 to 256 characters")
            if len(set(app.keys) | set(app.key_hashes)) > MAX_KEYS:
                errors.add(f"{here}.keys", f"an application holds at most {MAX_KEYS} keys")
    errors.raise_if_any()


def _desired(
    config: Config, current: dict[str, _Current], options: Options
) -> tuple[list[ProductState], list[str]]:
    """The file's products as states; clear keys hashed with the product's salt."""
    errors = FieldErrors()
    notes: list[str] = []
    states = []
    for i, product in enumerate(config.products):
        cur = current.get(product.name)
        salt = cur.state.key_salt if cur is not None else (product.key_salt or new_salt())
        has_hashes = any(a.key_hashes for a in product.applications)
        if cur is not None and product.key_salt is not None and product.key_salt != salt:
            if has_hashes and options.applications:
                errors.add(
                    f"products[{i}].key_salt",
                    f"differs from the salt of the control plane's product {product.name!r}, "
                    "so its key_hashes cannot be stored: give those keys in clear, or export "
                    "the product to get its salt",
                )
            else:
                notes.append(
                    f"product {product.name!r}: key_salt differs from the stored salt "
                    "and is ignored (no key_hashes depend on it)"
                )
        states.append(_state_of(product, salt, i, errors))
    errors.raise_if_any()
    return states, notes


def _state_of(product: ProductConfig, salt: str, index: int, errors: FieldErrors) -> ProductState:
    dumped = product.model_dump(mode="json")
    settings = {k: dumped[k] for k in SETTINGS}
    settings["auth"] = normal_auth(dumped["auth"])
    if settings["upstream_tls"] is not None:
        settings["upstream_tls"] = {
            k: v for k, v in settings["upstream_tls"].items() if v is not None
        }
    backends = {b.path: b.url for b in product.backend_usages()}
    applications: dict[str, AppState] = {}
    owners: dict[str, str] = {}
    hints: dict[str, str] = {}
    for j, app in enumerate(product.applications):
        for key in app.keys:
            # As the admin API: a few characters to tell keys apart, never most of a short key.
            hints[hash_key(salt, key)] = key[:4] + "…" if len(key) >= 16 else ""
        hashes = dict.fromkeys([hash_key(salt, k) for k in app.keys] + list(app.key_hashes))
        for key_hash in hashes:
            other = owners.setdefault(key_hash, app.id)
            if other != app.id:
                errors.add(
                    f"products[{index}].applications[{j}].keys",
                    f"a key of {app.id!r} is also a key of application {other!r}",
                )
        certificates = [c.model_dump(exclude_none=True) for c in app.certificates]
        applications[app.id] = AppState(app.plan, app.state, tuple(hashes), certificates)
    return ProductState(
        name=product.name,
        settings=settings,
        key_salt=salt,
        backends=dict(sorted(backends.items())),
        metrics={m.name: (m.parent, m.description) for m in product.metrics},
        rules=[(r.method, r.pattern, r.metric, r.increment, r.last) for r in product.mapping_rules],
        plans={
            p.name: {(lim.metric, lim.period): lim.value for lim in p.limits} for p in product.plans
        },
        applications=applications,
        hints=hints,
    )


# The difference


def _align(current: list[Rule], wanted: list[Rule]) -> list[tuple[int | None, int | None]]:
    """Pairs (current index, wanted index) of mapping rules: kept, changed, removed, added.

    Rules are an ordered list; a rule moved elsewhere is removed and added again.
    """
    pairs: list[tuple[int | None, int | None]] = []
    matcher = SequenceMatcher(a=current, b=wanted, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            pairs += zip(range(i1, i2), range(j1, j2), strict=True)
            continue
        for k in range(max(i2 - i1, j2 - j1)):
            i = i1 + k if i1 + k < i2 else None
            j = j1 + k if j1 + k < j2 else None
            if i is not None and j is not None and current[i][:2] != wanted[j][:2]:
                pairs += [(i, None), (None, j)]
            else:
                pairs.append((i, j))
    return pairs


def _fields(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    out: dict[str, tuple[Any, Any]] = {}
    for key in new:
        if old.get(key) == new[key]:
            continue
        a, b = old.get(key), new[key]
        if key == "auth" and isinstance(a, dict) and a.get("type") == b.get("type"):
            # The same mode: say which of its settings changed.
            for sub in dict.fromkeys([*a, *b]):
                if a.get(sub) != b.get(sub):
                    out[f"auth.{sub}"] = (a.get(sub), b.get(sub))
        else:
            out[key] = (a, b)
    return out


def _rule_name(rule: Rule) -> str:
    return f"{rule[0]} {rule[1]}"


def _rule_fields(rule: Rule) -> dict[str, Any]:
    return {"metric": rule[2], "increment": rule[3], "last": rule[4]}


class _ProductSync:
    """The difference for one product the file names, and the writes that remove it."""

    def __init__(self, want: ProductState, cur: _Current | None, options: Options) -> None:
        self.want = want
        self.cur = cur
        self.options = options
        self.alignment = _align(cur.state.rules if cur else [], want.rules)
        self.removals: list[Change] = []  # application removals, made before anything else
        self.changes: list[Change] = []
        self._diff()

    @property
    def config_changed(self) -> bool:
        config = {"product", "backend", "metric", "mapping_rule"}
        return any(c.resource in config for c in self.changes)

    def _add(
        self, action: Any, resource: str, name: str = "", fields: dict[str, Any] | None = None
    ) -> None:
        self.changes.append(Change(action, resource, self.want.name, name, fields or {}))

    def _diff(self) -> None:
        want = self.want
        have = self.cur.state if self.cur is not None else None
        if have is None:
            self._add("add", "product", "", {k: (None, v) for k, v in want.settings.items()})
        else:
            fields = _fields(have.settings, want.settings)
            if fields:
                self._add("change", "product", "", fields)
        old_backends = have.backends if have else {}
        for path in old_backends:
            if path not in want.backends:
                self._add("remove", "backend", path)
        for path, url in want.backends.items():
            if path not in old_backends:
                self._add("add", "backend", path, {"url": (None, url)})
            elif old_backends[path] != url:
                self._add("change", "backend", path, {"url": (old_backends[path], url)})
        old_metrics = have.metrics if have else {}
        for name in sorted(want.metrics, key=lambda n: want.metrics[n][0] is not None):
            parent, description = want.metrics[name]
            if name not in old_metrics:
                fields = {"parent": (None, parent)} if parent else {}
                if description:
                    fields["description"] = (None, description)
                self._add("add", "metric", name, fields)
            elif old_metrics[name] != (parent, description):
                old = dict(zip(("parent", "description"), old_metrics[name], strict=True))
                new = {"parent": parent, "description": description}
                self._add("change", "metric", name, _fields(old, new))
        old_rules = have.rules if have else []
        for i, j in self.alignment:
            if j is None:
                assert i is not None
                self._add("remove", "mapping_rule", _rule_name(old_rules[i]))
            elif i is None:
                new = _rule_fields(want.rules[j])
                self._add(
                    "add",
                    "mapping_rule",
                    _rule_name(want.rules[j]),
                    {k: (None, v) for k, v in new.items()},
                )
            elif old_rules[i] != want.rules[j]:
                fields = _fields(_rule_fields(old_rules[i]), _rule_fields(want.rules[j]))
                self._add("change", "mapping_rule", _rule_name(want.rules[j]), fields)
        old_plans = have.plans if have else {}
        for name, limits in want.plans.items():
            if name not in old_plans:
                self._add("add", "plan", name)
            old_limits = old_plans.get(name, {})
            for metric, period in old_limits:
                if (metric, period) not in limits:
                    self._add("remove", "limit", f"{name} {metric}/{period}")
            for (metric, period), value in limits.items():
                before = old_limits.get((metric, period))
                if before is None:
                    self._add("add", "limit", f"{name} {metric}/{period}", {"value": (None, value)})
                elif before != value:
                    self._add(
                        "change", "limit", f"{name} {metric}/{period}", {"value": (before, value)}
                    )
        for name, old_limits in old_plans.items():
            if name not in want.plans:
                for metric, period in old_limits:
                    self._add("remove", "limit", f"{name} {metric}/{period}")
        if self.options.applications:
            self._diff_applications(have)
        for name in old_plans:
            if name not in want.plans:
                self._add("remove", "plan", name)
        for name in sorted(old_metrics, key=lambda n: old_metrics[n][0] is None):
            if name not in want.metrics:
                self._add("remove", "metric", name)

    def _diff_applications(self, have: ProductState | None) -> None:
        old_apps = have.applications if have else {}
        for app_id in old_apps:
            if app_id not in self.want.applications:
                self.removals.append(Change("remove", "application", self.want.name, app_id))
        key_removals, key_adds = [], []
        for app_id, app in self.want.applications.items():
            before = old_apps.get(app_id)
            if before is None:
                fields: dict[str, tuple[Any, Any]] = {
                    "plan": (None, app.plan),
                    "state": (None, app.state),
                }
                if app.certificates:
                    fields["certificates"] = (None, app.certificates)
                self._add("add", "application", app_id, fields)
            else:
                old: dict[str, Any] = {"plan": before.plan, "state": before.state}
                new: dict[str, Any] = {"plan": app.plan, "state": app.state}
                if before.certificates or app.certificates:
                    old["certificates"] = before.certificates
                    new["certificates"] = app.certificates
                fields = _fields(old, new)
                if fields:
                    self._add("change", "application", app_id, fields)
            old_keys = before.keys if before else ()
            name = self.want.name
            key_removals += [
                Change("remove", "key", name, f"{app_id} {_hint(k)}")
                for k in old_keys
                if k not in app.keys
            ]
            key_adds += [
                Change("add", "key", name, f"{app_id} {_hint(k)}")
                for k in app.keys
                if k not in old_keys
            ]
        self.changes += key_removals + key_adds

    # Writing

    def remove_applications(self, w: _Writer) -> None:
        cur = self.cur
        for change in self.removals:
            assert cur is not None, "only a stored product has applications to remove"
            w.delete("application", cur.apps.pop(change.name))
            # Its keys go with it, as when the admin API deletes an application.
            for app_id, key_hash in [k for k in cur.keys if k[0] == change.name]:
                del cur.keys[(app_id, key_hash)]

    def apply(self, w: _Writer) -> None:
        want = self.want
        cur = self.cur
        if cur is None:
            row = Product(name=want.name, key_salt=want.key_salt, description="", openapi=None)
            for key, value in want.settings.items():
                setattr(row, key, value)
            w.session.add(row)
            w.session.flush()
            w.created("product", row)
            cur = self.cur = _Current(
                row, ProductState(want.name, {}, want.key_salt, {}, {}, [], {}, {})
            )
        else:
            changed = {k: v for k, v in want.settings.items() if cur.state.settings.get(k) != v}
            if changed:
                w.updating("product", cur.row)
                for key, value in changed.items():
                    setattr(cur.row, key, value)
        product_id = cur.row.id
        self._apply_backends(w, cur, product_id)
        self._apply_metrics(w, cur, product_id)
        self._apply_rules(w, cur, product_id)
        self._apply_plans(w, cur, product_id)
        if self.options.applications:
            self._apply_applications(w, cur, product_id)
        for name in list(cur.plans):
            if name not in want.plans:
                w.delete("plan", cur.plans.pop(name))
        removed = [n for n in cur.metrics if n not in want.metrics]
        # Methods before their parents: a parent's delete would cascade to them unaudited.
        for name in sorted(removed, key=lambda n: cur.state.metrics[n][0] is None):
            w.delete("metric", cur.metrics.pop(name))
        w.session.flush()

    def _apply_backends(self, w: _Writer, cur: _Current, product_id: int) -> None:
        for path in list(cur.backends):
            if path not in self.want.backends:
                w.delete("backend", cur.backends.pop(path))
        w.session.flush()
        for path, url in self.want.backends.items():
            row = cur.backends.get(path)
            if row is None:
                row = Backend(product_id=product_id, path=path, url=url, name="")
                w.session.add(row)
                w.created("backend", row)
            elif row.url != url:
                w.updating("backend", row)
                row.url = url

    def _apply_metrics(self, w: _Writer, cur: _Current, product_id: int) -> None:
        wanted = self.want.metrics
        # Top-level metrics first: methods need their parent's id.
        for top_level in (True, False):
            for name, (parent, description) in wanted.items():
                if (parent is None) != top_level:
                    continue
                parent_id = None if parent is None else cur.metrics[parent].id
                row = cur.metrics.get(name)
                if row is None:
                    row = Metric(
                        product_id=product_id,
                        name=name,
                        parent_id=parent_id,
                        description=description,
                        friendly_name=name,
                        unit="hit",
                    )
                    w.session.add(row)
                    cur.metrics[name] = row
                    w.created("metric", row)
                elif (row.parent_id, row.description) != (parent_id, description):
                    w.updating("metric", row)
                    row.parent_id, row.description = parent_id, description
            w.session.flush()

    def _apply_rules(self, w: _Writer, cur: _Current, product_id: int) -> None:
        if not any(c.resource == "mapping_rule" for c in self.changes):
            return
        ordered: list[MappingRule | None] = [None] * len(self.want.rules)
        for i, j in self.alignment:
            old = cur.rules[i] if i is not None else None
            if j is None:
                assert old is not None
                w.delete("mapping_rule", old)
                continue
            method, pattern, metric, increment, last = self.want.rules[j]
            values = {
                "http_method": method,
                "pattern": pattern,
                "metric_id": cur.metrics[metric].id,
                "delta": increment,
                "last": last,
                "position": j,
            }
            if old is None:
                row = MappingRule(product_id=product_id, **values)
                w.session.add(row)
                w.created("mapping_rule", row)
            else:
                row = old
                if any(getattr(row, k) != v for k, v in values.items()):
                    w.updating("mapping_rule", row)
                    for key, value in values.items():
                        setattr(row, key, value)
            ordered[j] = row
        cur.rules = [r for r in ordered if r is not None]

    def _apply_plans(self, w: _Writer, cur: _Current, product_id: int) -> None:
        for name in self.want.plans:
            if name not in cur.plans:
                plan = Plan(product_id=product_id, name=name)
                w.session.add(plan)
                cur.plans[name] = plan
                w.created("plan", plan)
        w.session.flush()
        for (plan_name, metric, period), limit in list(cur.limits.items()):
            if (metric, period) not in self.want.plans.get(plan_name, {}):
                w.delete("limit", limit)
                del cur.limits[(plan_name, metric, period)]
        for plan_name, limits in self.want.plans.items():
            for (metric, period), value in limits.items():
                row = cur.limits.get((plan_name, metric, period))
                if row is None:
                    row = Limit(
                        plan_id=cur.plans[plan_name].id,
                        metric_id=cur.metrics[metric].id,
                        period=period,
                        value=value,
                    )
                    w.session.add(row)
                    w.created("limit", row)
                elif row.value != value:
                    w.updating("limit", row)
                    row.value = value

    def _apply_applications(self, w: _Writer, cur: _Current, product_id: int) -> None:
        for app_id, app in self.want.applications.items():
            plan = cur.plans[app.plan]
            row = cur.apps.get(app_id)
            if row is None:
                row = Application(
                    account_id=w.default_account(),
                    plan_id=plan.id,
                    product_id=product_id,
                    name=app_id,
                    description="",
                    app_id=app_id,
                    state=app.state,
                    trial_ends_at=(
                        utcnow() + timedelta(days=plan.trial_days) if plan.trial_days else None
                    ),
                    certificates=app.certificates or None,
                )
                w.session.add(row)
                cur.apps[app_id] = row
                w.created("application", row)
            elif (row.plan_id, row.state, client_certificates(row.certificates or [])) != (
                plan.id,
                app.state,
                app.certificates,
            ):
                w.updating("application", row)
                row.plan_id, row.state = plan.id, app.state
                row.certificates = app.certificates or None
        # Removals land before additions: a key may move from one application to another.
        for (app_id, key_hash), key in list(cur.keys.items()):
            wanted = self.want.applications.get(app_id)
            if wanted is None or key_hash not in wanted.keys:
                w.delete("application_key", key)
                del cur.keys[(app_id, key_hash)]
        w.session.flush()
        for app_id, app in self.want.applications.items():
            for key_hash in app.keys:
                if (app_id, key_hash) not in cur.keys:
                    key = ApplicationKey(
                        application_id=cur.apps[app_id].id,
                        product_id=product_id,
                        key_hash=key_hash,
                        hint=self.want.hints.get(key_hash, ""),
                    )
                    w.session.add(key)
                    cur.keys[(app_id, key_hash)] = key
                    w.created("application_key", key)


_OUT: dict[str, type[BaseModel]] = {
    "product": s.ProductOut,
    "backend": s.BackendOut,
    "metric": s.MetricOut,
    "mapping_rule": s.MappingRuleOut,
    "plan": s.PlanOut,
    "limit": s.LimitOut,
    "application": s.ApplicationOut,
    "account": s.AccountOut,
}


def _dump(resource: str, row: Any) -> dict[str, Any]:
    if resource == "application_key":
        return {"application_id": row.application_id, "hint": row.hint}
    return dict(_OUT[resource].model_validate(row).model_dump(mode="json"))


class _Writer:
    """Writes inside the caller's transaction; audit entries as the admin API writes them."""

    def __init__(self, session: Session, actor: Actor) -> None:
        self.session = session
        self.actor = actor
        # (action, resource, row, before): "after" is read once everything is flushed.
        self._pending: list[tuple[str, str, Any, dict[str, Any] | None]] = []
        self._account_id: int | None = None

    def created(self, resource: str, row: Any) -> None:
        self._pending.append(("create", resource, row, None))

    def updating(self, resource: str, row: Any) -> None:
        self._pending.append(("update", resource, row, _dump(resource, row)))

    def delete(self, resource: str, row: Any) -> None:
        audit(self.session, self.actor, "delete", resource, row.id, _dump(resource, row), None)
        self.session.delete(row)

    def default_account(self) -> int:
        if self._account_id is None:
            account = self.session.scalar(select(Account).where(Account.name == DEFAULT_ACCOUNT))
            if account is None:
                account = Account(
                    name=DEFAULT_ACCOUNT,
                    description="Applications created from declarative configuration files.",
                )
                self.session.add(account)
                self.session.flush()
                self.created("account", account)
            self._account_id = account.id
        return self._account_id

    def finish(self) -> None:
        self.session.flush()
        entries = []
        for action, resource, row, before in self._pending:
            after = _dump(resource, row)
            if action == "update" and after == before:
                continue
            entries.append(
                {
                    "actor": self.actor.name,
                    "action": action,
                    "resource": resource,
                    "resource_id": str(row.id),
                    "before": before,
                    "after": after,
                    "at": utcnow(),
                }
            )
        # One statement for what may be tens of thousands of entries (a bulk load).
        if entries:
            self.session.execute(insert(AuditEntry), entries)
        self._pending.clear()


def _conflicts(
    session: Session,
    config: Config,
    current: dict[str, _Current],
    removed: list[_Current],
    options: Options,
) -> None:
    """Refusals that depend on what is stored and on what the options leave alone."""
    errors = FieldErrors()
    if not options.applications:
        for gone in removed:
            if gone.apps:
                errors.add(
                    "products",
                    f"product {gone.state.name!r} has {len(gone.apps)} applications, which this "
                    "apply leaves alone: remove them first, or apply with applications",
                )
        for i, product in enumerate(config.products):
            cur = current.get(product.name)
            if cur is None:
                continue
            kept = {p.name for p in product.plans}
            for app_id, app in cur.state.applications.items():
                if app.plan not in kept:
                    errors.add(
                        f"products[{i}].plans",
                        f"plan {app.plan!r} is removed but application {app_id!r} is on it, "
                        "and this apply leaves applications alone",
                    )
    elif not options.prune:
        # Applications of products this apply leaves alone keep their ids.
        named = {p.name for p in config.products}
        wanted = {
            app.id: (i, j)
            for i, p in enumerate(config.products)
            for j, app in enumerate(p.applications)
        }
        rows = session.execute(
            select(Application.app_id, Product.name).join(
                Product, Product.id == Application.product_id
            )
        ).all()
        for app_id, product_name in rows:
            if app_id in wanted and product_name not in named:
                i, j = wanted[app_id]
                errors.add(
                    f"products[{i}].applications[{j}].id",
                    f"application {app_id!r} belongs to product {product_name!r}, which this "
                    "apply leaves alone (prune is off)",
                )
    errors.raise_if_any(409)


def synchronise(
    session: Session,
    actor: Actor,
    config: Config,
    options: Options = Options(),
    dry_run: bool = False,
    stage: Any = None,
    mesh: list[Service] | None = None,
) -> Outcome:
    """The difference between ``config`` (and ``mesh``, the file's mesh section, if it has
    one) and the store; unless ``dry_run``, make it so.

    Runs inside the caller's transaction. ``stage(session, product_id)`` restages a product's
    gateway configuration (the control plane's ``stage``); raising rolls everything back.
    """
    _check_file(config, options)
    notes = []
    ignored = sorted(config.model_fields_set - {"products"})
    if ignored:
        notes.append(
            f"{', '.join(ignored)}: settings of a gateway process, not of the control plane: "
            "ignored"
        )
    current = _load(session, None if options.prune else [p.name for p in config.products])
    named = {p.name for p in config.products}
    removed = [cur for name, cur in current.items() if name not in named]
    _conflicts(session, config, current, removed, options)
    states, more = _desired(config, current, options)
    notes += more
    syncs = [_ProductSync(state, current.get(state.name), options) for state in states]

    changes: list[Change] = []
    for sync in syncs:
        changes += sync.removals
    for cur in removed:
        fields = {"applications": (len(cur.apps), None)} if cur.apps else {}
        changes.append(Change("remove", "product", cur.state.name, "", fields))
    for sync in syncs:
        changes += sync.changes
    product_changes = bool(changes)
    mesh_sync = _MeshSync(session, mesh, options) if mesh is not None else None
    outcome = Outcome(changes, notes, applied=not dry_run)
    outcome.config_changed = any(sync.config_changed for sync in syncs) or bool(removed)
    outcome.live_changed = bool(removed) or any(
        c.resource not in ("product", "backend", "metric", "mapping_rule") for c in changes
    )
    if mesh_sync is not None:
        changes += mesh_sync.changes
    if dry_run or not changes:
        return outcome

    if product_changes:
        w = _Writer(session, actor)
        for sync in syncs:
            sync.remove_applications(w)
        session.flush()
        for cur in removed:
            w.delete("product", cur.row)
        session.flush()
        for sync in syncs:
            sync.apply(w)
        w.finish()
        if stage is not None:
            for sync in syncs:
                if sync.config_changed and sync.cur is not None:
                    stage(session, sync.cur.row.id)
    if mesh_sync is not None and mesh_sync.changes:
        outcome.mesh_snapshot = mesh_sync.apply(actor)
    audit(
        session,
        actor,
        "apply",
        "declarative",
        None,
        None,
        {
            "summary": outcome.summary(),
            "prune": options.prune,
            "applications": options.applications,
        },
    )
    return outcome


class _MeshSync:
    """The difference between the file's mesh section and staging's services, checked as the
    whole mesh configuration staging would then have."""

    def __init__(self, session: Session, mesh: list[Service], options: Options) -> None:
        self.session = session
        _mesh.lock(session)
        self.current = _mesh.documents(session, "staging")
        given = {
            service.name: service.model_dump(mode="json", exclude_unset=True) for service in mesh
        }
        errors = FieldErrors()
        for i, document in enumerate(given.values()):
            for error in _mesh.storable_errors(document, f"mesh.services[{i}]"):
                errors.add(error["field"], error["message"])
        errors.raise_if_any()
        kept = {} if options.prune else {k: v for k, v in self.current.items() if k not in given}
        self.wanted = {**given, **kept}
        own = {name: f"mesh.services[{i}]" for i, name in enumerate(given)}
        _mesh.validated(self.wanted, own, top="mesh.services")
        self.changes: list[Change] = []
        for name, document in given.items():
            before = self.current.get(name)
            if before is None:
                self.changes.append(Change("add", "mesh_service", name, "", _fields({}, document)))
            elif before != document:
                keys = dict.fromkeys([*before, *document])
                fields = {
                    k: (before.get(k), document.get(k))
                    for k in keys
                    if before.get(k) != document.get(k)
                }
                self.changes.append(Change("change", "mesh_service", name, "", fields))
        for name in self.current:
            if name not in self.wanted:
                self.changes.append(Change("remove", "mesh_service", name))

    def apply(self, actor: Actor) -> MeshSnapshot | None:
        _mesh.write(self.session, "staging", dict(sorted(self.wanted.items())))
        for change in self.changes:
            name = change.product
            before, after = self.current.get(name), self.wanted.get(name)
            audit(self.session, actor, _ACTIONS[change.action], "mesh_service", name, before, after)
        return _mesh.publish(self.session, "staging", "apply")


_ACTIONS = {"add": "create", "change": "update", "remove": "delete"}
