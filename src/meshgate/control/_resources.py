"""The admin API's resources: what each accepts, what it checks, what a change reaches."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import ValidationError
from sqlalchemy import func, select, update

from meshgate.config import new_salt
from meshgate.config.model import UpstreamTls
from meshgate.control import schemas as s
from meshgate.control._crud import Change, Parent, Resource, routes
from meshgate.control._problems import Problem
from meshgate.control.models import (
    Account,
    Application,
    Backend,
    Limit,
    MappingRule,
    Metric,
    Plan,
    PricingRule,
    Product,
    User,
)

__all__ = ["RESOURCES", "router"]


def _metric_of(change: Change, metric_id: int, product_id: int, field: str = "metric_id") -> Metric:
    metric = change.session.get(Metric, metric_id)
    if metric is None or metric.product_id != product_id:
        raise Problem(
            422,
            f"{field}: metric {metric_id} is not a metric of this product",
            field=f"body.{field}",
        )
    return metric


def _prepare_product(change: Change, row: Product, data: dict[str, Any], creating: bool) -> None:
    if data.get("upstream_tls") is not None:
        # Stored whole, defaults included, as apply stores it: equal settings compare equal.
        data["upstream_tls"] = UpstreamTls.model_validate(data["upstream_tls"]).model_dump(
            exclude_none=True
        )
    # path_prefix and backend were checked with the request's other fields (schemas).
    if creating:
        row.key_salt = new_salt()
        change.request.state.first_backend = data.pop("backend", None)


def _product_created(change: Change, row: Product) -> None:
    hits = Metric(product_id=row.id, name="hits", friendly_name="Hits")
    change.session.add(hits)
    change.session.flush()
    # As a gateway file without mapping rules: every request counts one hit.
    change.session.add(MappingRule(product_id=row.id, pattern="/", metric_id=hits.id))
    backend = getattr(change.request.state, "first_backend", None)
    if backend is not None:
        change.session.add(Backend(product_id=row.id, path="/", url=backend))
    change.session.flush()


def _deleting_product(change: Change, row: Product) -> None:
    count = change.session.scalar(select(func.count()).where(Application.product_id == row.id))
    if count:
        raise Problem(
            409, f"product {row.name!r} has {count} applications: delete or move them first"
        )


def _prepare_metric(change: Change, row: Metric, data: dict[str, Any], creating: bool) -> None:
    if not creating and row.name == "hits" and data.get("name", "hits") != "hits":
        raise Problem(422, "name: the hits metric cannot be renamed", field="body.name")
    if creating and data.get("parent_id") is not None:
        parent = _metric_of(change, data["parent_id"], data["product_id"], "parent_id")
        if parent.parent_id is not None:
            raise Problem(
                422,
                "parent_id: a method's parent must be a top-level metric",
                field="body.parent_id",
            )


def _deleting_metric(change: Change, row: Metric) -> None:
    if row.name == "hits":
        raise Problem(409, "the hits metric cannot be deleted: every product counts hits")


def _prepare_rule(change: Change, row: MappingRule, data: dict[str, Any], creating: bool) -> None:
    product_id = data["product_id"] if creating else row.product_id
    if "metric_id" in data:
        _metric_of(change, data["metric_id"], product_id)
    if "pattern" in data:
        from meshgate.config.model import MappingRule as RuleConfig

        try:
            RuleConfig(pattern=data["pattern"], metric="hits")
        except ValidationError as exc:
            message = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
            raise Problem(422, f"pattern: {message}", field="body.pattern") from None


def _prepare_plan(change: Change, row: Plan, data: dict[str, Any], creating: bool) -> None:
    if data.get("is_default"):
        product_id = data["product_id"] if creating else row.product_id
        change.session.execute(
            update(Plan)
            .where(Plan.product_id == product_id, Plan.is_default.is_(True))
            .values(is_default=False, version=Plan.version + 1)
            .execution_options(synchronize_session="fetch")
        )


def _deleting_plan(change: Change, row: Plan) -> None:
    count = change.session.scalar(select(func.count()).where(Application.plan_id == row.id))
    if count:
        raise Problem(409, f"plan {row.name!r} has {count} applications: change their plan first")


def _plan_product(change: Change, plan_id: int) -> int:
    plan = change.session.get(Plan, plan_id)
    assert plan is not None, "the parent was checked"
    return plan.product_id


def _prepare_limit(change: Change, row: Limit, data: dict[str, Any], creating: bool) -> None:
    if creating:
        _metric_of(change, data["metric_id"], _plan_product(change, data["plan_id"]))


def _prepare_pricing(
    change: Change, row: PricingRule, data: dict[str, Any], creating: bool
) -> None:
    plan_id = data["plan_id"] if creating else row.plan_id
    metric_id = data["metric_id"] if creating else row.metric_id
    if creating:
        _metric_of(change, metric_id, _plan_product(change, plan_id))
    low = data.get("min", row.min if not creating else 1)
    high = data["max"] if "max" in data else (None if creating else row.max)
    if high is not None and high < low:
        raise Problem(422, "max: must not be below min", field="body.max")
    others = change.session.execute(
        select(PricingRule.min, PricingRule.max).where(
            PricingRule.plan_id == plan_id,
            PricingRule.metric_id == metric_id,
            PricingRule.id != (row.id or 0),
        )
    ).all()
    for other_min, other_max in others:
        if (high is None or other_min <= high) and (other_max is None or low <= other_max):
            raise Problem(
                422,
                f"min: the range {low}..{high or '∞'} overlaps another pricing rule "
                f"({other_min}..{other_max or '∞'})",
                field="body.min",
            )


def _via_plan(session: Any, row: Any) -> int | None:
    plan = session.get(Plan, row.plan_id)
    return None if plan is None else plan.product_id


PRODUCTS = Parent("products", "product_id", Product)
PLANS = Parent("plans", "plan_id", Plan)
ACCOUNTS = Parent("accounts", "account_id", Account)

RESOURCES = [
    Resource(
        "accounts",
        Account,
        s.AccountOut,
        s.AccountCreate,
        s.AccountUpdate,
        filters={"state": str, "name": str},
        scope="live",
    ),
    Resource(
        "users",
        User,
        s.UserOut,
        s.UserCreate,
        s.UserUpdate,
        parent=ACCOUNTS,
        filters={"state": str, "role": str},
        tag="accounts",
    ),
    Resource(
        "products",
        Product,
        s.ProductOut,
        s.ProductCreate,
        s.ProductUpdate,
        filters={"name": str},
        scope="config",
        prepare=_prepare_product,
        created=_product_created,
        deleting=_deleting_product,
        product_of=lambda _s, row: row.id,
    ),
    Resource(
        "backends",
        Backend,
        s.BackendOut,
        s.BackendCreate,
        s.BackendUpdate,
        parent=PRODUCTS,
        scope="config",
        tag="products",
    ),
    Resource(
        "metrics",
        Metric,
        s.MetricOut,
        s.MetricCreate,
        s.MetricUpdate,
        parent=PRODUCTS,
        filters={"parent_id": int, "name": str},
        scope="config",
        prepare=_prepare_metric,
        deleting=_deleting_metric,
        tag="products",
    ),
    Resource(
        "mapping_rules",
        MappingRule,
        s.MappingRuleOut,
        s.MappingRuleCreate,
        s.MappingRuleUpdate,
        parent=PRODUCTS,
        filters={"metric_id": int},
        scope="config",
        prepare=_prepare_rule,
        tag="products",
    ),
    Resource(
        "plans",
        Plan,
        s.PlanOut,
        s.PlanCreate,
        s.PlanUpdate,
        parent=PRODUCTS,
        filters={"state": str, "name": str},
        scope="live",
        prepare=_prepare_plan,
        deleting=_deleting_plan,
    ),
    Resource(
        "limits",
        Limit,
        s.LimitOut,
        s.LimitCreate,
        s.LimitUpdate,
        parent=PLANS,
        filters={"metric_id": int, "period": str},
        scope="live",
        prepare=_prepare_limit,
        product_of=_via_plan,
        tag="plans",
    ),
    Resource(
        "pricing_rules",
        PricingRule,
        s.PricingRuleOut,
        s.PricingRuleCreate,
        s.PricingRuleUpdate,
        parent=PLANS,
        filters={"metric_id": int},
        prepare=_prepare_pricing,
        product_of=_via_plan,
        tag="plans",
    ),
    # Created through the applications router (a new application shows its first key).
    Resource(
        "applications",
        Application,
        s.ApplicationOut,
        None,
        s.ApplicationUpdate,
        filters={"account_id": int, "plan_id": int, "product_id": int, "state": str},
        scope="live",
    ),
]

router = APIRouter()
for _resource in RESOURCES:
    routes(router, _resource)
