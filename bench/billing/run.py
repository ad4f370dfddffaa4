#!/usr/bin/env python3
"""Billing: a run over 10,000 accounts, its time and peak memory, on SQLite and PostgreSQL.

A store is filled with bulk inserts: two products, five plans (monthly fees, setup fees,
tiered pricing rules, one free), 10,000 accounts with 1-3 applications each, a plan history
with plan changes mid-month, trials ending mid-month and applications started in the month,
and a month of usage (``usage_rollups`` at ``month`` granularity). Then, in a fresh process
(so that ``ru_maxrss`` is the run's, not the fill's):

1. ``billing.runs.run_billing`` for November 2026 over every account, as the admin API's
   ``POST /admin/api/billing/runs`` calls it: wall time, this process's CPU time (on
   PostgreSQL the server's CPU is not in it), the ``ru_maxrss`` growth, invoices made.
2. The same month again: it should change nothing; timed too.
3. The peer, in the same process: one plain SQL ``GROUP BY`` query that adds the same
   month's prorated monthly fees, setup fees and tiered usage per account (a number per
   account, no invoice written): the floor of reading and pricing the month in the
   database. Reported as our time / its time, and each account's number is compared with
   its invoice's total.
4. The invoices deleted and the first run made again under ``tracemalloc``: the peak of
   Python memory (tracemalloc slows Python down, so this run's time is not the one above).

Not a pass/fail test. ``python bench/billing/run.py [--accounts 10000]
[--stores sqlite,postgresql]``; PostgreSQL from MESHGATE_POSTGRES_URL or
127.0.0.1:5432/test, in a schema of its own dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import insert, text

from meshgate.analytics.models import UsageRollup
from meshgate.billing.models import PlanPeriod
from meshgate.billing.periods import Month
from meshgate.billing.render import money_text
from meshgate.billing.runs import RunSummary, run_billing
from meshgate.control._db import Database
from meshgate.control.models import Account, Application, Metric, Plan, PricingRule, Product

MONTH = Month(2026, 11)  # 30 days; billed from December 2026 on
CENT = Decimal("0.01")


@dataclass(frozen=True)
class _PlanSpec:
    product: str
    name: str
    monthly_fee: str
    setup_fee: str
    # (metric, min, max or None, cost per unit)
    tiers: tuple[tuple[str, int, int | None, str], ...]


PLANS = (
    _PlanSpec("shop", "free", "0", "0", ()),
    _PlanSpec(
        "shop",
        "basic",
        "19.00",
        "10.00",
        (
            ("hits", 1, 10_000, "0"),
            ("hits", 10_001, 100_000, "0.002"),
            ("hits", 100_001, None, "0.001"),
            ("orders", 1, None, "0.05"),
        ),
    ),
    _PlanSpec(
        "shop",
        "pro",
        "99.00",
        "49.00",
        (
            ("hits", 1, 100_000, "0"),
            ("hits", 100_001, None, "0.0008"),
            ("orders", 1001, None, "0.03"),
        ),
    ),
    _PlanSpec(
        "maps",
        "starter",
        "9.90",
        "0",
        (("hits", 1, 50_000, "0"), ("hits", 50_001, None, "0.0015"), ("tiles", 1, None, "0.004")),
    ),
    _PlanSpec(
        "maps",
        "business",
        "249.00",
        "99.00",
        (("tiles", 1, 200_000, "0.002"), ("tiles", 200_001, None, "0.001")),
    ),
)
METRICS = {"shop": ("hits", "orders"), "maps": ("hits", "tiles")}


def _store(kind: str, workdir: Path) -> tuple[str, Any]:
    if kind == "sqlite":
        return f"sqlite:///{workdir / 'bench.db'}", None
    base = os.environ.get("MESHGATE_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = Database(base)
    with admin.engine.begin() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}", (admin, schema)


def _drop(cleanup: Any) -> None:
    if cleanup is not None:
        admin, schema = cleanup
        with admin.engine.begin() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _catalogue(db: Database) -> dict[str, tuple[str, int]]:
    """Products, metrics, plans and pricing rules (a few rows); plan name -> (product, id)."""
    plans: dict[str, tuple[str, int]] = {}
    with db.writer() as session, session.begin():
        metric_ids: dict[tuple[str, str], int] = {}
        for product_name, metric_names in METRICS.items():
            product = Product(name=product_name, auth={"type": "api_key"}, key_salt="s" * 16)
            session.add(product)
            session.flush()
            for name in metric_names:
                metric = Metric(product_id=product.id, name=name)
                session.add(metric)
                session.flush()
                metric_ids[product_name, name] = metric.id
            for spec in PLANS:
                if spec.product != product_name:
                    continue
                plan = Plan(
                    product_id=product.id,
                    name=spec.name,
                    state="published",
                    monthly_fee=Decimal(spec.monthly_fee),
                    setup_fee=Decimal(spec.setup_fee),
                )
                session.add(plan)
                session.flush()
                plans[spec.name] = (product_name, plan.id)
                session.add_all(
                    PricingRule(
                        plan_id=plan.id,
                        metric_id=metric_ids[product_name, metric],
                        min=low,
                        max=high,
                        cost_per_unit=Decimal(cost),
                    )
                    for metric, low, high, cost in spec.tiers
                )
    return plans


def _rows(
    accounts: int, plans: dict[str, tuple[str, int]], product_ids: dict[str, int]
) -> dict[str, list[dict[str, Any]]]:
    """Accounts, applications, their plan history and the month's usage, made up once."""
    rng = random.Random(12)
    month_start = MONTH.start
    by_product = {p: [n for n, (q, _) in plans.items() if q == p] for p in METRICS}
    out: dict[str, list[dict[str, Any]]] = {"accounts": [], "apps": [], "periods": [], "usage": []}
    app_id = 0
    for account_id in range(1, accounts + 1):
        out["accounts"].append(
            {
                "id": account_id,
                "name": f"account-{account_id}",
                "email": f"billing@account-{account_id}.example",
                "version": 1,
            }
        )
        for _ in range(rng.randint(1, 3)):
            app_id += 1
            product = rng.choice(list(METRICS))
            plan = rng.choice(by_product[product])
            public = f"app-{app_id:06d}"
            trial_ends_at: datetime | None = None
            roll = rng.random()
            if roll < 0.05:  # started in the month: its setup fee, maybe a trial
                started = month_start + timedelta(days=rng.randrange(28), hours=rng.randrange(24))
                if rng.random() < 0.5:
                    trial_ends_at = started + timedelta(days=14)
            else:
                started = month_start - timedelta(days=rng.randrange(1, 700))
                if roll < 0.10:  # a trial that ends mid-month
                    trial_ends_at = month_start + timedelta(days=rng.randrange(2, 25))
            history = [(plan, started)]
            if roll >= 0.85:  # a plan change mid-month, to another plan of the product
                plan = rng.choice([p for p in by_product[product] if p != plan])
                history.append(
                    (
                        plan,
                        month_start + timedelta(days=rng.randrange(1, 28), hours=rng.randrange(24)),
                    )
                )
            out["apps"].append(
                {
                    "id": app_id,
                    "account_id": account_id,
                    "plan_id": plans[plan][1],
                    "product_id": product_ids[product],
                    "name": f"app {app_id}",
                    "app_id": public,
                    "trial_ends_at": trial_ends_at,
                    "created_at": started,
                    "version": 1,
                }
            )
            for i, (name, at) in enumerate(history):
                out["periods"].append(
                    {
                        "account_id": account_id,
                        "application_id": app_id,
                        "app_id": public,
                        "application_name": f"app {app_id}",
                        "plan_id": plans[name][1],
                        "started_at": at,
                        "ended_at": history[i + 1][1] if i + 1 < len(history) else None,
                    }
                )
            if rng.random() < 0.05:
                continue  # no traffic this month
            scale = rng.choice((1_000, 30_000, 300_000))
            for metric in METRICS[product]:
                out["usage"].append(
                    {
                        "granularity": "month",
                        "product": product,
                        "start": MONTH.epoch,
                        "application": public,
                        "metric": metric,
                        "account_id": account_id,
                        "value": rng.randrange(scale)
                        if metric == "hits"
                        else rng.randrange(scale // 10),
                    }
                )
    return out


def fill(db: Database, accounts: int) -> dict[str, Any]:
    """The store filled; how many rows of each, and how long it took."""
    started = time.perf_counter()
    plans = _catalogue(db)
    with db.engine.connect() as c:
        product_ids: dict[str, int] = dict(c.execute(text("SELECT name, id FROM products")).all())
    rows = _rows(accounts, plans, product_ids)
    with db.engine.begin() as c:
        for table, key in (
            (Account, "accounts"),
            (Application, "apps"),
            (PlanPeriod, "periods"),
            (UsageRollup, "usage"),
        ):
            for i in range(0, len(rows[key]), 5000):
                c.execute(insert(table), rows[key][i : i + 5000])
        if not db.is_sqlite:
            for name in ("accounts", "applications"):
                c.execute(
                    text(
                        f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), "
                        f"(SELECT max(id) FROM {name}))"
                    )
                )
            c.execute(text("ANALYZE"))
    changes = sum(1 for p in rows["periods"] if p["ended_at"] is not None)
    return {
        "accounts": len(rows["accounts"]),
        "applications": len(rows["apps"]),
        "plan_periods": len(rows["periods"]),
        "plan_changes_in_month": changes,
        "usage_rows": len(rows["usage"]),
        "fill_seconds": round(time.perf_counter() - started, 1),
    }


def _peer_query(db: Database) -> str:
    """The month's fees and usage per account in one GROUP BY, in the store's dialect."""
    if db.is_sqlite:
        epoch, most, least = "CAST(strftime('%s', {}) AS INTEGER)", "max", "min"
    else:
        epoch, most, least = "CAST(EXTRACT(EPOCH FROM {}) AS BIGINT)", "GREATEST", "LEAST"
    day = "(" + epoch + " / 86400)"
    first, stop = MONTH.epoch // 86400, MONTH.epoch // 86400 + MONTH.days
    start_day = day.format("p.started_at")
    trial_day = f"COALESCE({day.format('a.trial_ends_at')}, 0)"
    end_day = f"COALESCE({day.format('p.ended_at')}, {stop})"
    days = f"{most}(0, {least}({end_day}, {stop}) - {most}({start_day}, {first}, {trial_day}))"
    if db.is_sqlite:  # as SQLAlchemy stores times there: UTC, text
        month_start, month_end = (f"'{t:%Y-%m-%d %H:%M:%S}'" for t in (MONTH.start, MONTH.end))
    else:
        month_start, month_end = (
            f"'{t.isoformat()}'::timestamptz" for t in (MONTH.start, MONTH.end)
        )
    # SQLite keeps whole-number fees as integers: 1.0 * makes the division exact.
    return f"""
        SELECT account_id, SUM(amount) AS total FROM (
            SELECT p.account_id, ROUND(1.0 * pl.monthly_fee * {days} / {MONTH.days}, 2) AS amount
            FROM plan_periods p
            JOIN plans pl ON pl.id = p.plan_id
            JOIN applications a ON a.id = p.application_id
            WHERE p.started_at < {month_end}
              AND (p.ended_at IS NULL OR p.ended_at > {month_start})
            UNION ALL
            SELECT p.account_id, ROUND(1.0 * pl.setup_fee, 2)
            FROM plan_periods p
            JOIN plans pl ON pl.id = p.plan_id
            WHERE p.started_at >= {month_start} AND p.started_at < {month_end}
              AND NOT EXISTS (SELECT 1 FROM plan_periods e
                              WHERE e.application_id = p.application_id AND e.id < p.id)
            UNION ALL
            SELECT u.account_id, ROUND(1.0 * r.cost_per_unit * {most}(0,
                   {least}(u.value, COALESCE(r.max, u.value)) - r.min + 1), 2)
            FROM usage_rollups u
            -- the plan held at the month's end: no application here ends or moves after it
            JOIN plan_periods p ON p.app_id = u.application AND p.ended_at IS NULL
            JOIN pricing_rules r ON r.plan_id = p.plan_id
            JOIN metrics m ON m.id = r.metric_id AND m.name = u.metric
            WHERE u.granularity = 'month' AND u.start = {MONTH.epoch}
        ) lines
        GROUP BY account_id
    """


def _invoices(db: Database) -> dict[str, Any]:
    with db.engine.connect() as c:
        invoices, total, changed = c.execute(
            text("SELECT count(*), sum(total), max(updated_at) FROM invoices WHERE period = :p"),
            {"p": str(MONTH)},
        ).one()
        lines = c.execute(text("SELECT count(*) FROM invoice_lines")).scalar_one()
    return {"invoices": invoices, "lines": lines, "total": str(total), "last_change": str(changed)}


def _summary(summary: RunSummary) -> dict[str, Any]:
    return {
        "accounts": summary.accounts,
        "created": summary.created,
        "updated": summary.updated,
        "unchanged": summary.unchanged,
        "skipped": summary.skipped,
        "total": f"{money_text(summary.total, summary.currency)} {summary.currency}",
    }


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> bool:
    """Linux: bring the peak RSS (and so ru_maxrss) down to the RSS now, so that the growth
    measured is the run's and not the imports' (which pass 80 MiB)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure(url: str) -> dict[str, Any]:
    """The billing runs and the peer, in this (fresh) process."""
    db = Database(url)
    with db.engine.connect() as c:  # connections made before the baseline
        c.execute(text("SELECT 1"))
    reset = _reset_peak_rss()
    rss_before = _maxrss_mib()
    cpu, wall = time.process_time(), time.perf_counter()
    first = run_billing(db, MONTH, trigger="api", actor="bench")
    first_wall, first_cpu = time.perf_counter() - wall, time.process_time() - cpu
    rss_after = _maxrss_mib()
    made = _invoices(db)

    cpu, wall = time.process_time(), time.perf_counter()
    second = run_billing(db, MONTH, trigger="api", actor="bench")
    second_wall, second_cpu = time.perf_counter() - wall, time.process_time() - cpu
    after_second = _invoices(db)

    query = text(_peer_query(db))
    peer_times: list[float] = []
    with db.engine.connect() as c:
        for _ in range(3):
            wall = time.perf_counter()
            rows = c.execute(query).all()
            peer_times.append(time.perf_counter() - wall)
        peer = {int(a): Decimal(str(t)).quantize(CENT) for a, t in rows}
    peer_wall = statistics.median(peer_times)
    with db.engine.connect() as c:
        billed = {
            int(a): Decimal(str(t)).quantize(CENT)
            for a, t in c.execute(
                text("SELECT account_id, total FROM invoices WHERE period = :p"), {"p": str(MONTH)}
            )
        }
    differ = sorted(
        a for a in set(peer) | set(billed) if peer.get(a, Decimal(0)) != billed.get(a, Decimal(0))
    )

    with db.engine.begin() as c:
        c.execute(text("DELETE FROM invoice_lines"))
        c.execute(text("DELETE FROM invoices"))
        c.execute(text("DELETE FROM invoice_counters"))
    tracemalloc.start()
    wall = time.perf_counter()
    again = run_billing(db, MONTH, trigger="api", actor="bench")
    traced_wall = time.perf_counter() - wall
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    db.dispose()
    return {
        "first_run": {
            **_summary(first),
            "invoice_lines": made["lines"],
            "seconds": round(first_wall, 2),
            "cpu_seconds": round(first_cpu, 2),
            "accounts_per_second": round(first.accounts / first_wall),
            "ru_maxrss_growth_mib": round(rss_after - rss_before, 1),
            "ru_maxrss_mib": round(rss_after, 1),
            "ru_maxrss_at_start_mib": round(rss_before, 1),
            "peak_reset_at_start": reset,
        },
        "second_run": {
            **_summary(second),
            "seconds": round(second_wall, 2),
            "cpu_seconds": round(second_cpu, 2),
            "changed_nothing": second.created == 0 and second.updated == 0 and after_second == made,
        },
        "tracemalloc": {
            "peak_mib": round(peak / 2**20, 1),
            "created": again.created,
            "seconds_traced": round(traced_wall, 2),
        },
        "peer_sql_group_by": {
            "seconds": round(peer_wall, 3),
            "accounts": len(peer),
            "total": str(sum(peer.values(), Decimal(0))),
            "accounts_differing_from_invoices": len(differ),
            "first_differing": [
                {"account": a, "peer": str(peer.get(a)), "invoice": str(billed.get(a))}
                for a in differ[:5]
            ],
        },
        "first_run_over_peer": round(first_wall / peer_wall, 1),
        "second_run_over_peer": round(second_wall / peer_wall, 1),
    }


def _measure_in_child(url: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", url],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default="sqlite,postgresql")
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)), flush=True)
        return
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "month": str(MONTH),
        "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ"),
    }
    for kind in args.stores.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            url, cleanup = _store(kind, Path(tmp))
            try:
                db = Database(url)
                db.migrate()
                report[kind] = {"store": fill(db, args.accounts)}
                db.dispose()
                report[kind].update(_measure_in_child(url))
                print(json.dumps({kind: report[kind]}), flush=True)
            finally:
                _drop(cleanup)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
