"""Billing runs on the real store (SQLite and PostgreSQL): plan history, invoices made once,
recomputed while open, numbered without gaps under concurrent runs; the schedule."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from alembic import command
from sqlalchemy import select, text

from meshgate.analytics.models import UsageRollup
from meshgate.billing import runs as billing_runs
from meshgate.billing import schedule
from meshgate.billing.history import use_clock
from meshgate.billing.invoices import change_state
from meshgate.billing.models import BillingSettings, Invoice, InvoiceLine, PlanPeriod
from meshgate.billing.periods import Month
from meshgate.billing.runs import BillingError, UnknownAccount, run_billing
from meshgate.billing.schedule import due_month, next_check, run_due
from meshgate.control._db import Database, _alembic
from meshgate.control.models import Account, Application, Metric, Plan, PricingRule, Product

NOVEMBER = Month(2026, 11)  # 30 days


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


@pytest.fixture
def clock() -> Iterator[Clock]:
    c = Clock(datetime(2026, 10, 20, 12, tzinfo=UTC))
    with use_clock(c):
        yield c


def world(db: Database) -> dict[str, int]:
    """A product with hits, a paid plan with tiers, a free plan, and two accounts."""
    with db.writer() as session, session.begin():
        product = Product(name="shop", auth={"type": "api_key"}, key_salt="s" * 16)
        session.add(product)
        session.flush()
        hits = Metric(product_id=product.id, name="hits")
        paid = Plan(product_id=product.id, name="paid", monthly_fee=Decimal("30"))
        paid.setup_fee = Decimal("5")
        pro = Plan(product_id=product.id, name="pro", monthly_fee=Decimal("90"))
        free = Plan(product_id=product.id, name="free")
        session.add_all([hits, paid, pro, free])
        session.flush()
        session.add(
            PricingRule(plan_id=paid.id, metric_id=hits.id, min=1, max=None, cost_per_unit="0.01")
        )
        accounts = [Account(name=f"acct-{i}", email=f"a{i}@example.com") for i in range(2)]
        session.add_all(accounts)
        session.flush()
        return {
            "product": product.id,
            "paid": paid.id,
            "pro": pro.id,
            "free": free.id,
            "a0": accounts[0].id,
            "a1": accounts[1].id,
        }


def application(db: Database, account: int, plan: int, product: int, app_id: str) -> int:
    with db.writer() as session, session.begin():
        app = Application(
            account_id=account, plan_id=plan, product_id=product, name=app_id, app_id=app_id
        )
        session.add(app)
        session.flush()
        return app.id


def change_plan(db: Database, app: int, plan: int) -> None:
    with db.writer() as session, session.begin():
        row = session.get(Application, app)
        assert row is not None
        row.plan_id = plan


def periods(db: Database, app: int) -> list[tuple[int, datetime, datetime | None]]:
    def utc(v: datetime | None) -> datetime | None:
        return None if v is None else v.replace(tzinfo=UTC) if v.tzinfo is None else v

    with db.session() as session:
        rows = session.scalars(
            select(PlanPeriod).where(PlanPeriod.application_id == app).order_by(PlanPeriod.id)
        ).all()
        return [(r.plan_id, utc(r.started_at), utc(r.ended_at)) for r in rows]  # type: ignore[misc]


def invoices(db: Database) -> list[dict[str, Any]]:
    with db.session() as session:
        rows = session.scalars(select(Invoice).order_by(Invoice.id)).all()
        out = []
        for r in rows:
            lines = session.scalars(
                select(InvoiceLine)
                .where(InvoiceLine.invoice_id == r.id)
                .order_by(InvoiceLine.position)
            ).all()
            out.append(
                {
                    "account": r.account_id,
                    "number": r.number,
                    "state": r.state,
                    "total": Decimal(r.total),
                    "lines": [(x.kind, x.plan_name, x.quantity, Decimal(x.amount)) for x in lines],
                }
            )
        return out


def usage(db: Database, app_id: str, month: Month, value: int, product: str = "shop") -> None:
    with db.writer() as session, session.begin():
        session.add(
            UsageRollup(
                granularity="month",
                product=product,
                start=month.epoch,
                application=app_id,
                metric="hits",
                value=value,
            )
        )


def test_every_plan_assignment_is_recorded_with_the_clock(db: Database, clock: Clock) -> None:
    w = world(db)
    app = application(db, w["a0"], w["paid"], w["product"], "app-h")
    created = clock.at
    clock.at = datetime(2026, 11, 15, 8, tzinfo=UTC)
    change_plan(db, app, w["pro"])
    change_plan(db, app, w["pro"])  # the same plan: no new period
    assert periods(db, app) == [
        (w["paid"], created, clock.at),
        (w["pro"], clock.at, None),
    ]
    # A change that rolls back leaves no history.
    with pytest.raises(RuntimeError), db.writer() as session, session.begin():
        row = session.get(Application, app)
        assert row is not None
        row.plan_id = w["free"]
        session.flush()
        raise RuntimeError("abandoned")
    assert len(periods(db, app)) == 2
    clock.at = datetime(2026, 11, 20, tzinfo=UTC)
    with db.writer() as session, session.begin():
        session.delete(session.get(Application, app))
    assert periods(db, app)[-1] == (w["pro"], datetime(2026, 11, 15, 8, tzinfo=UTC), clock.at)


def test_the_migration_backfills_history_from_each_applications_creation(
    database_url: str,
) -> None:
    database = Database(database_url)
    try:
        with database.engine.begin() as conn:
            command.upgrade(_alembic(conn), "0007")
            conn.execute(
                text(
                    "INSERT INTO accounts (name, state, description, created_at, updated_at, "
                    "version) VALUES ('old', 'approved', '', '2025-03-04 05:06:07', "
                    "'2025-03-04 05:06:07', 1)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO products (name, description, hosts, path_prefix, strip_prefix, "
                    "auth, policies, key_salt, created_at, updated_at, version) VALUES "
                    "('p', '', '[]', '/', TRUE, '{}', '[]', 'salt', '2025-01-01', '2025-01-01', 1)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO plans (product_id, name, description, state, is_default, "
                    "approval_required, setup_fee, monthly_fee, trial_days, created_at, "
                    "updated_at, version) SELECT id, 'b', '', 'published', FALSE, FALSE, 0, 9, "
                    "0, '2025-01-01', '2025-01-01', 1 FROM products"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO applications (account_id, plan_id, product_id, name, "
                    "description, state, app_id, created_at, updated_at, version) SELECT "
                    "a.id, p.id, p.product_id, 'legacy', '', 'live', 'legacy-app', "
                    "'2025-03-04 05:06:07', '2025-03-04 05:06:07', 1 FROM accounts a, plans p"
                )
            )
        database.migrate()
        with database.session() as session:
            [row] = session.scalars(select(PlanPeriod)).all()
            started = row.started_at.replace(tzinfo=UTC)
            assert (row.app_id, row.application_name, started, row.ended_at) == (
                "legacy-app",
                "legacy",
                datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC),
                None,
            )
            settings = session.get(BillingSettings, 1)
            assert settings is not None and settings.currency == "EUR"
    finally:
        database.dispose()


@pytest.mark.parametrize("ids_per_query", [10_000, 1])
def test_a_run_makes_one_invoice_per_account_and_a_second_run_changes_nothing(
    db: Database, clock: Clock, ids_per_query: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With 1, every id list is read a slice at a time, as a month of 100,000 applications is.
    monkeypatch.setattr(billing_runs, "_IDS_PER_QUERY", ids_per_query)
    w = world(db)
    clock.at = datetime(2026, 11, 11, 9, tzinfo=UTC)
    app = application(db, w["a0"], w["paid"], w["product"], "app-r")
    application(db, w["a1"], w["free"], w["product"], "app-free")
    usage(db, "app-r", NOVEMBER, 250)
    usage(db, "app-free", NOVEMBER, 99_999)
    clock.at = datetime(2026, 12, 1, tzinfo=UTC)

    first = run_billing(db, NOVEMBER)
    assert (first.accounts, first.created, first.skipped, first.total) == (
        2,
        1,
        1,
        Decimal("27.50"),
    )
    [invoice] = invoices(db)
    assert invoice == {
        "account": w["a0"],
        "number": "2026-00000001",
        "state": "open",
        "total": Decimal("27.50"),
        "lines": [
            ("setup_fee", "paid", 1, Decimal("5.00")),
            ("monthly_fee", "paid", 20, Decimal("20.00")),  # November 11 to 30
            ("usage", "paid", 250, Decimal("2.50")),
        ],
    }
    again = run_billing(db, NOVEMBER)
    assert (again.created, again.updated, again.unchanged, again.skipped) == (0, 0, 1, 1)
    assert invoices(db) == [invoice]

    # More usage arrives late (under the product's new name: summed): the open invoice is
    # recomputed, its number kept.
    usage(db, "app-r", NOVEMBER, 100, product="shop-renamed")
    updated = run_billing(db, NOVEMBER)
    assert (updated.updated, updated.total) == (1, Decimal("28.50"))
    assert invoices(db)[0]["number"] == "2026-00000001"

    # Finalized: never changed again, whatever changes.
    with db.writer() as session, session.begin():
        change_state(session, invoices_id(db), "finalize")
    change_plan(db, app, w["pro"])
    with db.writer() as session, session.begin():
        session.execute(text("UPDATE usage_rollups SET value = 9999 WHERE application = 'app-r'"))
    assert run_billing(db, NOVEMBER).unchanged == 1
    assert invoices(db)[0]["total"] == Decimal("28.50")
    assert invoices(db)[0]["state"] == "finalized"


def invoices_id(db: Database) -> int:
    with db.session() as session:
        return int(session.scalars(select(Invoice.id)).one())


def test_a_run_for_one_account_an_unknown_account_or_a_month_not_begun(
    db: Database, clock: Clock
) -> None:
    w = world(db)
    clock.at = datetime(2026, 10, 1, tzinfo=UTC)
    application(db, w["a0"], w["paid"], w["product"], "app-1")
    application(db, w["a1"], w["paid"], w["product"], "app-2")
    clock.at = datetime(2026, 12, 3, tzinfo=UTC)
    one = run_billing(db, NOVEMBER, account_id=w["a1"])
    assert (one.accounts, one.created, one.total) == (1, 1, Decimal("30.00"))
    assert [i["account"] for i in invoices(db)] == [w["a1"]]
    with pytest.raises(UnknownAccount):
        run_billing(db, NOVEMBER, account_id=999_999)
    with pytest.raises(BillingError, match="has not begun"):
        run_billing(db, Month(2027, 1))
    # The month in progress can be billed: an open invoice, recomputed until finalized.
    assert run_billing(db, Month(2026, 12)).created == 2
    # Usage that would cost more than an invoice holds stops the run with a clear error.
    usage(db, "app-1", NOVEMBER, 2**62)
    with pytest.raises(BillingError, match="beyond what an invoice holds"):
        run_billing(db, NOVEMBER, account_id=w["a0"])


def test_invoice_numbers_follow_the_periods_year_with_the_prefix(
    db: Database, clock: Clock
) -> None:
    w = world(db)
    clock.at = datetime(2026, 10, 1, tzinfo=UTC)
    application(db, w["a0"], w["paid"], w["product"], "app-1")
    with db.writer() as session, session.begin():
        settings = session.get(BillingSettings, 1)
        assert settings is not None
        settings.invoice_prefix = "ACME-"
    clock.at = datetime(2027, 2, 1, tzinfo=UTC)
    for month in (Month(2026, 11), Month(2026, 12), Month(2027, 1)):
        run_billing(db, month)
    assert [i["number"] for i in invoices(db)] == [
        "ACME-2026-00000001",
        "ACME-2026-00000002",
        "ACME-2027-00000001",
    ]


def test_two_runs_at_once_make_no_duplicate_and_leave_no_gap(
    database_url: str, clock: Clock
) -> None:
    first, second = Database(database_url), Database(database_url)
    try:
        first.migrate()
        w = world(first)
        clock.at = datetime(2026, 10, 1, tzinfo=UTC)
        with first.writer() as session, session.begin():
            accounts = [Account(name=f"many-{i}") for i in range(24)]
            session.add_all(accounts)
            session.flush()
            for i, account in enumerate(accounts):
                session.add(
                    Application(
                        account_id=account.id,
                        plan_id=w["paid"],
                        product_id=w["product"],
                        name="app",
                        app_id=f"many-app-{i}",
                    )
                )
        clock.at = datetime(2026, 12, 1, tzinfo=UTC)
        results: list[Any] = []
        barrier = threading.Barrier(2)

        def run(database: Database) -> None:
            barrier.wait()
            try:
                results.append(run_billing(database, NOVEMBER))
            except Exception as exc:  # reported below
                results.append(exc)

        threads = [threading.Thread(target=run, args=(d,)) for d in (first, second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(not isinstance(r, Exception) for r in results), results
        assert sum(r.created for r in results) == 24
        assert sum(r.unchanged for r in results) == 24
        made = invoices(first)
        assert sorted(i["number"] for i in made) == [f"2026-{n:08d}" for n in range(1, 25)]
        assert len({i["account"] for i in made}) == 24
    finally:
        first.dispose()
        second.dispose()


def test_the_schedule_bills_the_month_before_on_the_billing_day_once(
    db: Database, clock: Clock
) -> None:
    w = world(db)
    clock.at = datetime(2026, 9, 1, tzinfo=UTC)
    application(db, w["a0"], w["paid"], w["product"], "app-s")
    with db.writer() as session, session.begin():
        settings = session.get(BillingSettings, 1)
        assert settings is not None
        settings.billing_day = 5
    assert due_month(datetime(2026, 12, 4, 23, 59, tzinfo=UTC), 5) == Month(2026, 10)
    assert due_month(datetime(2026, 12, 5, tzinfo=UTC), 5) == Month(2026, 11)
    assert next_check(datetime(2026, 12, 4, 23, tzinfo=UTC), 5) == datetime(2026, 12, 5, tzinfo=UTC)
    assert next_check(datetime(2026, 12, 5, tzinfo=UTC), 5) == datetime(2027, 1, 5, tzinfo=UTC)

    clock.at = datetime(2026, 12, 4, 12, tzinfo=UTC)
    assert run_due(db) is not None  # October, not run yet
    assert run_due(db) is None  # a restart on the same day: nothing more
    clock.at = datetime(2026, 12, 5, 0, 0, 1, tzinfo=UTC)
    assert run_due(db) is not None
    assert run_due(db) is None
    assert sorted(i["number"] for i in invoices(db)) == ["2026-00000001", "2026-00000002"]
    with db.writer() as session, session.begin():
        settings = session.get(BillingSettings, 1)
        assert settings is not None
        settings.schedule = False
    clock.at = datetime(2027, 1, 6, tzinfo=UTC)
    assert run_due(db) is None


def test_the_schedule_outlives_a_store_that_fails(sqlite_db: Database) -> None:
    # The settings cannot be read (as when the database is down): the run fails, and so does
    # the look-up of the next billing day; the schedule must keep going all the same.
    with sqlite_db.writer() as session, session.begin():
        session.execute(text("DROP TABLE billing_settings"))

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(schedule._forever(sqlite_db))
        await asyncio.sleep(0.5)
        try:
            assert not task.done(), task.exception()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
