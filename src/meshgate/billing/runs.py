"""A billing run: one invoice per account for a month, made or brought up to date.

Data is loaded once and priced by :func:`meshgate.billing.charges.charges`; each account's
invoice is then written in a transaction of its own. Running a month again changes nothing
that is equal, recomputes an open invoice, and never touches one that left ``open``.

Invoice numbers (``2026-00000001``, the period's year) are assigned when an invoice is
made, from a counter row locked in the same transaction (``SELECT ... FOR UPDATE`` on
PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serialises writers already): concurrent runs make
no duplicate and leave no gap. An account whose month costs nothing gets no invoice.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from meshgate.analytics.models import UsageRollup
from meshgate.billing.charges import Assignment, Charge, PlanTerms, Subscription, Tier, charges
from meshgate.billing.history import now
from meshgate.billing.models import (
    BillingRun,
    Invoice,
    InvoiceCounter,
    InvoiceLine,
    PlanPeriod,
)
from meshgate.billing.money import MAX_AMOUNT
from meshgate.billing.periods import Month, as_utc
from meshgate.billing.settings import load_settings
from meshgate.control._db import Database
from meshgate.control.models import Account, Application, Metric, Plan, PricingRule

__all__ = ["BillingError", "MonthNotBegun", "RunSummary", "UnknownAccount", "run_billing"]


class BillingError(Exception):
    """A run cannot be made as asked; the message says why."""


class UnknownAccount(BillingError):
    pass


class MonthNotBegun(BillingError):
    pass


@dataclass
class RunSummary:
    period: str
    account_id: int | None
    trigger: str
    started_at: datetime
    currency: str
    id: int | None = None
    finished_at: datetime | None = None
    accounts: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: int = 0
    total: Decimal = Decimal(0)
    invoices: list[int] = field(default_factory=list)


@dataclass
class _AccountMonth:
    id: int
    name: str
    email: str | None
    subscriptions: list[Subscription]


@dataclass
class _Loaded:
    accounts: list[_AccountMonth]
    plans: dict[int, PlanTerms]
    usage: dict[tuple[str, str], int]


def _load(session: Session, month: Month, account_id: int | None) -> _Loaded:
    overlapping = and_(
        PlanPeriod.started_at < month.end,
        or_(PlanPeriod.ended_at.is_(None), PlanPeriod.ended_at > month.start),
    )
    query = select(PlanPeriod).where(overlapping)
    if account_id is not None:
        query = query.where(PlanPeriod.account_id == account_id)
    periods = session.scalars(query).all()
    app_ids = {p.application_id for p in periods}
    firsts = _first_periods(session, app_ids)
    trials: dict[int, datetime | None] = {}
    for chunk in _chunks(app_ids):
        # A list of pairs: a Result has keys() and would pass for a mapping.
        trials.update(
            (row[0], row[1])
            for row in session.execute(
                select(Application.id, Application.trial_ends_at).where(Application.id.in_(chunk))
            )
        )
    plan_ids = {p.plan_id for p in periods} | {f.plan_id for f in firsts.values()}
    plans = _plans(session, plan_ids)

    by_app: dict[int, list[PlanPeriod]] = defaultdict(list)
    for period in periods:
        by_app[period.application_id].append(period)
    by_account: dict[int, list[Subscription]] = defaultdict(list)
    for application_id, rows in by_app.items():
        first = firsts[application_id]
        latest = max(rows, key=lambda r: as_utc(r.started_at))
        trial_ends_at = trials.get(application_id)
        if trial_ends_at is None and application_id not in trials:
            # Deleted since: its trial as its first plan gave it.
            days = plans[first.plan_id].trial_days if first.plan_id in plans else 0
            trial_ends_at = as_utc(first.started_at) + timedelta(days=days) if days else None
        by_account[latest.account_id].append(
            Subscription(
                application_id=application_id,
                app_id=latest.app_id,
                name=latest.application_name,
                started_at=first.started_at,
                first_plan_id=first.plan_id,
                trial_ends_at=trial_ends_at,
                assignments=tuple(Assignment(r.plan_id, r.started_at, r.ended_at) for r in rows),
            )
        )
    wanted = {account_id} if account_id is not None else set(by_account)
    accounts = [
        _AccountMonth(row.id, row.name, row.email, by_account.get(row.id, []))
        for chunk in _chunks(wanted)
        for row in session.scalars(
            select(Account).where(Account.id.in_(chunk)).order_by(Account.id)
        )
    ]
    if account_id is not None and not accounts:
        raise UnknownAccount(f"account {account_id} does not exist")
    app_names = {s.app_id for a in accounts for s in a.subscriptions}
    return _Loaded(accounts, plans, _usage(session, month, app_names, account_id is None))


def _first_periods(session: Session, app_ids: set[int]) -> dict[int, PlanPeriod]:
    """Each application's first plan period: when it started, and on which plan."""
    out: dict[int, PlanPeriod] = {}
    for chunk in _chunks(app_ids):
        first = (
            select(PlanPeriod.application_id, func.min(PlanPeriod.id).label("id"))
            .where(PlanPeriod.application_id.in_(chunk))
            .group_by(PlanPeriod.application_id)
            .subquery()
        )
        rows = session.scalars(select(PlanPeriod).join(first, PlanPeriod.id == first.c.id))
        out.update((row.application_id, row) for row in rows)
    return out


# Ids per IN list: PostgreSQL takes at most 65,535 bound parameters in a statement, some
# SQLite builds 32,766; a month of 100,000 applications is read in slices.
_IDS_PER_QUERY = 10_000


def _chunks(ids: set[int]) -> Iterator[list[int]]:
    """``ids`` in ascending slices of at most _IDS_PER_QUERY."""
    ordered = sorted(ids)
    for i in range(0, len(ordered), _IDS_PER_QUERY):
        yield ordered[i : i + _IDS_PER_QUERY]


def _plans(session: Session, plan_ids: set[int]) -> dict[int, PlanTerms]:
    tiers: dict[int, list[Tier]] = defaultdict(list)
    for rule, metric in session.execute(
        select(PricingRule, Metric.name)
        .join(Metric, Metric.id == PricingRule.metric_id)
        .where(PricingRule.plan_id.in_(plan_ids))
    ).all():
        tiers[rule.plan_id].append(Tier(metric, rule.min, rule.max, rule.cost_per_unit))
    return {
        plan.id: PlanTerms(
            plan.id,
            plan.name,
            plan.setup_fee,
            plan.monthly_fee,
            plan.trial_days,
            tuple(tiers[plan.id]),
        )
        for plan in session.scalars(select(Plan).where(Plan.id.in_(plan_ids)))
    }


def _usage(
    session: Session, month: Month, app_ids: set[str], every: bool
) -> dict[tuple[str, str], int]:
    query = (
        select(UsageRollup.application, UsageRollup.metric, func.sum(UsageRollup.value))
        .where(UsageRollup.granularity == "month", UsageRollup.start == month.epoch)
        .group_by(UsageRollup.application, UsageRollup.metric)
    )
    if not every:
        query = query.where(UsageRollup.application.in_(app_ids))
    return {(app, metric): int(value) for app, metric, value in session.execute(query)}


def _lines(invoice_id: int, drafts: Iterable[Charge]) -> list[InvoiceLine]:
    return [
        InvoiceLine(
            invoice_id=invoice_id,
            position=i,
            kind=c.kind,
            description=c.description[:500],
            application_id=c.application_id,
            app_id=c.app_id,
            plan_id=c.plan_id,
            plan_name=c.plan_name,
            metric=c.metric,
            quantity=c.quantity,
            unit_price=c.unit_price,
            amount=c.amount,
            period_from=c.period_from.isoformat(),
            period_to=c.period_to.isoformat(),
        )
        for i, c in enumerate(drafts, start=1)
    ]


def _line_key(line: InvoiceLine) -> tuple[Any, ...]:
    return (
        line.position,
        line.kind,
        line.description,
        line.application_id,
        line.app_id,
        line.plan_id,
        line.plan_name,
        line.metric,
        int(line.quantity),
        Decimal(line.unit_price),
        Decimal(line.amount),
        line.period_from,
        line.period_to,
    )


def _invoice(session: Session, account_id: int, month: Month) -> Invoice | None:
    return session.scalars(
        select(Invoice)
        .where(Invoice.account_id == account_id, Invoice.period == str(month))
        .with_for_update()
    ).one_or_none()


def _lock_counter(session: Session, year: int) -> InvoiceCounter:
    """The year's counter row, made if missing and locked until the transaction ends."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(
        insert(InvoiceCounter).values(year=year, last=0).on_conflict_do_nothing()  # type: ignore[attr-defined]
    )
    counter = session.scalars(
        select(InvoiceCounter)
        .where(InvoiceCounter.year == year)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one()
    return counter


def _create(
    session: Session,
    month: Month,
    account: _AccountMonth,
    drafts: list[Charge],
    currency: str,
    counter: InvoiceCounter,
) -> Invoice:
    settings = load_settings(session)
    total = sum((c.amount for c in drafts), Decimal(0))
    counter.last += 1
    invoice = Invoice(
        account_id=account.id,
        period=str(month),
        number=f"{settings.invoice_prefix}{month.year}-{counter.last:08d}",
        state="open",
        currency=currency,
        total=total,
        paid=Decimal(0),
        account_name=account.name,
        account_email=account.email,
        issuer_name=settings.issuer_name,
        issuer_address=settings.issuer_address,
    )
    session.add(invoice)
    session.flush()
    session.add_all(_lines(invoice.id, drafts))
    return invoice


def _write_account(
    db: Database, month: Month, account: _AccountMonth, drafts: list[Charge], currency: str
) -> tuple[str, Invoice | None]:
    """Make, update or leave the account's invoice; what happened, and the invoice."""
    total = sum((c.amount for c in drafts), Decimal(0))
    if total >= MAX_AMOUNT or any(c.amount >= MAX_AMOUNT for c in drafts):
        raise BillingError(
            f"account {account.id}: {month} comes to {total} {currency}, beyond what an "
            f"invoice holds (below {MAX_AMOUNT})"
        )
    with db.writer() as session, session.begin():
        settings = load_settings(session)
        invoice = _invoice(session, account.id, month)
        if invoice is None:
            if not any(c.amount for c in drafts):
                return "skipped", None
            counter = _lock_counter(session, month.year)
            # Another run may have made it while this one waited for the counter.
            invoice = _invoice(session, account.id, month)
            if invoice is None:
                return "created", _create(session, month, account, drafts, currency, counter)
        if invoice.state != "open":
            return "unchanged", invoice
        old = session.scalars(
            select(InvoiceLine)
            .where(InvoiceLine.invoice_id == invoice.id)
            .order_by(InvoiceLine.position)
        ).all()
        new = _lines(invoice.id, drafts)
        wanted = {
            "currency": currency,
            "account_name": account.name,
            "account_email": account.email,
            "issuer_name": settings.issuer_name,
            "issuer_address": settings.issuer_address,
        }
        same_lines = [_line_key(x) for x in old] == [_line_key(x) for x in new]
        if same_lines and all(getattr(invoice, k) == v for k, v in wanted.items()):
            return "unchanged", invoice
        for line in old:
            session.delete(line)
        session.flush()
        session.add_all(new)
        for key, value in wanted.items():
            setattr(invoice, key, value)
        invoice.total = total
        return "updated", invoice


def run_billing(
    db: Database,
    month: Month,
    account_id: int | None = None,
    trigger: str = "api",
    actor: str = "",
    progress: Any = None,
) -> RunSummary:
    """Bill ``month`` for one account or for every account with applications in it."""
    started = now()
    if month.start > started:
        raise MonthNotBegun(f"{month} has not begun: bill a month that has")
    with db.session() as session:
        currency = load_settings(session).currency
        loaded = _load(session, month, account_id)
    summary = RunSummary(str(month), account_id, trigger, started, currency)
    for account in loaded.accounts:
        drafts = charges(month, account.subscriptions, loaded.plans, loaded.usage, currency)
        outcome, invoice = _write_account(db, month, account, drafts, currency)
        setattr(summary, outcome, getattr(summary, outcome) + 1)
        summary.accounts += 1
        if invoice is not None:
            summary.total += Decimal(invoice.total)
            summary.invoices.append(invoice.id)
        if progress is not None:
            progress(summary)
    summary.finished_at = now()
    with db.writer() as session, session.begin():
        row = BillingRun(
            period=summary.period,
            account_id=account_id,
            trigger=trigger,
            actor=actor,
            started_at=summary.started_at,
            finished_at=summary.finished_at,
            accounts=summary.accounts,
            created=summary.created,
            updated=summary.updated,
            unchanged=summary.unchanged,
            skipped=summary.skipped,
            currency=currency,
            total=str(summary.total),
        )
        session.add(row)
        session.flush()
        summary.id = row.id
    return summary
