"""What an account owes for a month, as a pure function of its applications' plan history,
the plans' fees and pricing rules, and the month's usage: no store, no clock.

The rules, as 3scale bills:

- A day (UTC) is billed on the plan the application holds at the end of it: a change made on
  the 15th bills the 15th on the new plan; a change on the 1st bills the whole month on it.
- A plan's monthly fee is prorated by day: fee x days on the plan / days in the month.
- Days before the trial's end (its date) cost no fee.
- The setup fee of the first plan is billed in the month the application started.
- The month's usage of each metric is priced by the pricing rules of the plan held on the
  month's last billed day: units are numbered from 1, and units min..max of a rule (max
  open: no upper bound) cost its price each. Each rule that prices some units is a line.
- Amounts are rounded to the currency's minor unit once, per line (ROUND_HALF_UP); an
  invoice's total is the sum of its lines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal, localcontext

from meshgate.billing.money import WIDE, round_amount
from meshgate.billing.periods import Month, as_utc

__all__ = ["Assignment", "Charge", "PlanTerms", "Subscription", "Tier", "charges", "priced_units"]


@dataclass(frozen=True)
class Tier:
    """A pricing rule: units ``min`` to ``max`` (None: no upper bound) of a metric in a month."""

    metric: str
    min: int
    max: int | None
    cost_per_unit: Decimal


@dataclass(frozen=True)
class PlanTerms:
    id: int
    name: str
    setup_fee: Decimal
    monthly_fee: Decimal
    trial_days: int = 0
    tiers: tuple[Tier, ...] = ()


@dataclass(frozen=True)
class Assignment:
    """The application on ``plan_id`` from ``started_at`` until ``ended_at`` (None: still)."""

    plan_id: int
    started_at: datetime
    ended_at: datetime | None = None


@dataclass(frozen=True)
class Subscription:
    """An application as billing sees it: when it started, on which plan, its trial, and
    its plan assignments that touch the month."""

    application_id: int
    app_id: str
    name: str
    started_at: datetime
    first_plan_id: int
    trial_ends_at: datetime | None
    assignments: tuple[Assignment, ...]


@dataclass(frozen=True)
class Charge:
    kind: str  # setup_fee, monthly_fee, usage
    description: str
    application_id: int
    app_id: str
    plan_id: int
    plan_name: str
    metric: str | None
    quantity: int
    unit_price: Decimal
    amount: Decimal
    period_from: date
    period_to: date


def priced_units(usage: int, tier: Tier) -> int:
    """How many of units 1..usage fall in the tier's min..max."""
    high = usage if tier.max is None else min(usage, tier.max)
    return max(0, high - tier.min + 1)


def _billed_days(assignment: Assignment, month: Month, free_until: date | None) -> list[date]:
    first = max(as_utc(assignment.started_at).date(), month.first_day)
    if free_until is not None:
        first = max(first, free_until)
    # The day of the end belongs to whatever comes next (another plan, or nothing).
    stop = month.last_day + timedelta(days=1)
    if assignment.ended_at is not None:
        stop = min(stop, as_utc(assignment.ended_at).date())
    return [first + timedelta(days=i) for i in range((stop - first).days)]


def _last_plan(subscription: Subscription, month: Month) -> tuple[int, date] | None:
    """The plan held on the month's last day the application was on a plan, and that day."""
    best: tuple[int, date] | None = None
    for assignment in subscription.assignments:
        days = _billed_days(assignment, month, None)
        if days and (best is None or days[-1] >= best[1]):
            best = (assignment.plan_id, days[-1])
    return best


def _subscription_charges(
    subscription: Subscription,
    month: Month,
    plans: Mapping[int, PlanTerms],
    usage: Mapping[tuple[str, str], int],
    currency: str,
) -> list[Charge]:
    out: list[Charge] = []

    def charge(kind: str, plan: PlanTerms, description: str, **fields: object) -> None:
        out.append(
            Charge(
                kind=kind,
                description=description,
                application_id=subscription.application_id,
                app_id=subscription.app_id,
                plan_id=plan.id,
                plan_name=plan.name,
                **fields,  # type: ignore[arg-type]
            )
        )

    label = f"{subscription.name} ({subscription.app_id})"
    started = as_utc(subscription.started_at)
    first_plan = plans.get(subscription.first_plan_id)
    if Month.of(started) == month and first_plan is not None and first_plan.setup_fee:
        charge(
            "setup_fee",
            first_plan,
            f"Setup fee, plan {first_plan.name}, {label}",
            metric=None,
            quantity=1,
            unit_price=first_plan.setup_fee,
            amount=round_amount(first_plan.setup_fee, currency),
            period_from=started.date(),
            period_to=started.date(),
        )
    trial = subscription.trial_ends_at
    free_until = as_utc(trial).date() if trial is not None else None
    ordered = sorted(subscription.assignments, key=lambda a: as_utc(a.started_at))
    for assignment in ordered:
        plan = plans.get(assignment.plan_id)
        if plan is None or not plan.monthly_fee:
            continue
        days = _billed_days(assignment, month, free_until)
        if not days:
            continue
        count = len(days)
        share = "" if count == month.days else f", {count} of {month.days} days"
        charge(
            "monthly_fee",
            plan,
            f"Monthly fee, plan {plan.name}{share}, {label}",
            metric=None,
            quantity=count,
            unit_price=plan.monthly_fee,
            amount=round_amount(plan.monthly_fee * count / month.days, currency),
            period_from=days[0],
            period_to=days[-1],
        )
    last = _last_plan(subscription, month)
    plan = plans.get(last[0]) if last is not None else None
    if plan is None:
        return out
    for tier in sorted(plan.tiers, key=lambda t: (t.metric, t.min)):
        used = usage.get((subscription.app_id, tier.metric), 0)
        units = priced_units(used, tier)
        if units <= 0:
            continue
        upper = "" if tier.max is None else str(tier.max)
        charge(
            "usage",
            plan,
            f"{tier.metric}: units {tier.min}-{upper} of {used}, plan {plan.name}, {label}",
            metric=tier.metric,
            quantity=units,
            unit_price=tier.cost_per_unit,
            amount=round_amount(tier.cost_per_unit * units, currency),
            period_from=month.first_day,
            period_to=month.last_day,
        )
    return out


def charges(
    month: Month,
    subscriptions: Sequence[Subscription],
    plans: Mapping[int, PlanTerms],
    usage: Mapping[tuple[str, str], int],
    currency: str,
) -> list[Charge]:
    """The lines of one account's invoice for ``month``: each application's in turn.

    ``usage`` maps (app_id, metric name) to the month's count. A plan missing from ``plans``
    (deleted since) bills nothing.
    """
    out: list[Charge] = []
    with localcontext(WIDE):
        for subscription in sorted(subscriptions, key=lambda s: s.application_id):
            out.extend(_subscription_charges(subscription, month, plans, usage, currency))
    return out
