"""Fill a control-plane store with a large model, fast (bulk inserts, not the API).

100 products x (hits + 4 methods, 5 mapping rules, one backend), 10 plans each with two
limits, 500 applications each with two keys: 1,000 plans, 50,000 applications and 100,000
keys in all, staged and promoted. Keys are hashed as the API would hash them.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from sqlalchemy import insert, select

from meshgate.config import hash_key, new_salt
from meshgate.control import snapshots
from meshgate.control._db import Database
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
    utcnow,
)


@dataclass
class Size:
    products: int = 100
    plans_per_product: int = 10
    apps_per_product: int = 500
    keys_per_app: int = 2
    accounts: int = 1000


def _stamp() -> dict[str, object]:
    now = utcnow()
    return {"created_at": now, "updated_at": now, "version": 1}


def seed(url: str, size: Size, backend: str = "http://127.0.0.1:9001") -> dict[str, float]:
    """Migrate and fill the store at ``url``; returns timings in seconds."""
    db = Database(url)
    db.migrate()
    started = time.perf_counter()
    stamp = _stamp()
    with db.writer() as session, session.begin():
        session.execute(
            insert(Account),
            [
                {"name": f"account-{i}", "state": "approved", "description": "", **stamp}
                for i in range(size.accounts)
            ],
        )
        account_ids = list(session.scalars(select(Account.id).order_by(Account.id)))
        app_n = 0
        for p in range(size.products):
            salt = new_salt()
            product = Product(
                name=f"product-{p}",
                hosts=[f"p{p}.example.com"],
                path_prefix="/",
                strip_prefix=True,
                auth={"type": "api_key", "header": "X-API-Key", "query": "user_key"},
                policies=[],
                key_salt=salt,
                description="",
            )
            session.add(product)
            session.flush()
            session.add(Backend(product_id=product.id, path="/", url=backend, name=""))
            hits = Metric(product_id=product.id, name="hits", friendly_name="Hits")
            session.add(hits)
            session.flush()
            methods = []
            for m in range(4):
                method = Metric(product_id=product.id, name=f"method-{m}", parent_id=hits.id)
                session.add(method)
                methods.append(method)
            session.flush()
            for position, method in enumerate(methods):
                session.add(
                    MappingRule(
                        product_id=product.id,
                        http_method="GET",
                        pattern=f"/v1/resource-{position}/{{id}}",
                        metric_id=method.id,
                        position=position,
                    )
                )
            session.add(
                MappingRule(product_id=product.id, pattern="/", metric_id=hits.id, position=99)
            )
            session.execute(
                insert(Plan),
                [
                    {
                        "product_id": product.id,
                        "name": f"plan-{i}",
                        "state": "published",
                        "description": "",
                        "is_default": i == 0,
                        "approval_required": False,
                        "setup_fee": 0,
                        "monthly_fee": 10 * i,
                        "trial_days": 0,
                        **stamp,
                    }
                    for i in range(size.plans_per_product)
                ],
            )
            plan_ids = list(
                session.scalars(
                    select(Plan.id).where(Plan.product_id == product.id).order_by(Plan.id)
                )
            )
            session.execute(
                insert(Limit),
                [
                    row
                    for i, plan_id in enumerate(plan_ids)
                    for row in (
                        {
                            "plan_id": plan_id,
                            "metric_id": hits.id,
                            "period": "minute",
                            "value": 100 * (i + 1),
                            **stamp,
                        },
                        {
                            "plan_id": plan_id,
                            "metric_id": methods[0].id,
                            "period": "day",
                            "value": 10_000 * (i + 1),
                            **stamp,
                        },
                    )
                ],
            )
            apps = []
            for a in range(size.apps_per_product):
                apps.append(
                    {
                        "account_id": account_ids[app_n % len(account_ids)],
                        "plan_id": plan_ids[a % len(plan_ids)],
                        "product_id": product.id,
                        "name": f"app-{app_n}",
                        "description": "",
                        "state": "live",
                        "app_id": secrets.token_hex(8),
                        **stamp,
                    }
                )
                app_n += 1
            session.execute(insert(Application), apps)
            app_ids = list(
                session.scalars(select(Application.id).where(Application.product_id == product.id))
            )
            session.execute(
                insert(ApplicationKey),
                [
                    {
                        "application_id": app_id,
                        "product_id": product.id,
                        "key_hash": hash_key(salt, secrets.token_urlsafe(32)),
                        "hint": "",
                        "created_at": stamp["created_at"],
                    }
                    for app_id in app_ids
                    for _ in range(size.keys_per_app)
                ],
            )
            doc = snapshots.stage_product(session, product)
            session.add(EnvironmentProduct(env="production", product_id=product.id, document=doc))
    seeded = time.perf_counter() - started
    db.dispose()
    return {"seed_seconds": seeded}
