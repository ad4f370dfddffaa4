"""The billing rules as a pure function: proration, trials, setup fees, tiers, rounding."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from meshgate.billing.charges import Assignment, PlanTerms, Subscription, Tier, charges
from meshgate.billing.money import check_currency, round_amount
from meshgate.billing.periods import Month

DECEMBER = Month(2026, 12)  # 31 days
BASIC = PlanTerms(1, "basic", Decimal("10"), Decimal("31"))
PRO = PlanTerms(2, "pro", Decimal("50"), Decimal("62"))
FREE = PlanTerms(3, "free", Decimal(0), Decimal(0))
PLANS = {p.id: p for p in (BASIC, PRO, FREE)}


def at(day: int, month: int = 12, year: int = 2026, hour: int = 9) -> datetime:
    return datetime(year, month, day, hour, tzinfo=UTC)


def sub(*assignments: Assignment, started: datetime | None = None, trial=None) -> Subscription:
    first = min(assignments, key=lambda a: a.started_at)
    return Subscription(
        application_id=7,
        app_id="app7",
        name="shop",
        started_at=started or first.started_at,
        first_plan_id=first.plan_id,
        trial_ends_at=trial,
        assignments=assignments,
    )


def fees(lines):  # type: ignore[no-untyped-def]
    return [(c.plan_name, c.quantity, c.amount) for c in lines if c.kind == "monthly_fee"]


# An application older than the month, moved from basic to pro on a day of December.
@pytest.mark.parametrize(
    ("day", "expected"),
    [
        (1, [("pro", 31, Decimal("62.00"))]),
        (15, [("basic", 14, Decimal("14.00")), ("pro", 17, Decimal("34.00"))]),
        (31, [("basic", 30, Decimal("30.00")), ("pro", 1, Decimal("2.00"))]),
    ],
)
def test_a_plan_change_prorates_both_plans_by_day(day: int, expected: list) -> None:  # type: ignore[type-arg]
    change = at(day, hour=23)
    s = sub(Assignment(1, at(3, 10), change), Assignment(2, change))
    lines = charges(DECEMBER, [s], PLANS, {}, "EUR")
    assert fees(lines) == expected
    assert [c.kind for c in lines] == ["monthly_fee"] * len(expected)
    days = [(c.period_from.day, c.period_to.day) for c in lines]
    assert days == ([(1, 31)] if day == 1 else [(1, day - 1), (day, 31)])


def test_a_whole_month_on_one_plan_is_the_monthly_fee_exactly() -> None:
    s = sub(Assignment(1, at(5, 6)))
    [line] = charges(DECEMBER, [s], PLANS, {}, "EUR")
    assert (line.quantity, line.amount, line.description) == (
        31,
        Decimal("31.00"),
        "Monthly fee, plan basic, shop (app7)",
    )


def test_a_trial_ending_mid_month_frees_the_days_before_its_end() -> None:
    s = sub(Assignment(2, at(20, 11)), trial=at(10, hour=15))
    [line] = charges(DECEMBER, [s], PLANS, {}, "EUR")
    # December 10 to 31: 22 of 31 days of 62.
    assert (line.quantity, line.amount) == (22, Decimal("44.00"))
    assert line.period_from.isoformat() == "2026-12-10"


def test_a_trial_covering_the_month_bills_no_fee() -> None:
    s = sub(Assignment(2, at(20, 11)), trial=at(2, 1, 2027))
    assert charges(DECEMBER, [s], PLANS, {}, "EUR") == []


def test_the_setup_fee_is_billed_in_the_first_month_only() -> None:
    s = sub(Assignment(1, at(11)))
    december = charges(DECEMBER, [s], PLANS, {}, "EUR")
    assert [(c.kind, c.amount) for c in december] == [
        ("setup_fee", Decimal("10.00")),
        ("monthly_fee", Decimal("21.00")),
    ]
    january = charges(Month(2027, 1), [s], PLANS, {}, "EUR")
    assert [(c.kind, c.amount) for c in january] == [("monthly_fee", Decimal("31.00"))]


def test_the_setup_fee_is_billed_during_a_trial_and_is_the_first_plans() -> None:
    s = sub(Assignment(1, at(11), at(20)), Assignment(2, at(20)), trial=at(25, 1, 2027))
    lines = charges(DECEMBER, [s], PLANS, {}, "EUR")
    assert [(c.kind, c.plan_name, c.amount) for c in lines] == [
        ("setup_fee", "basic", Decimal("10.00"))
    ]


def test_a_free_plan_without_usage_charges_nothing() -> None:
    s = sub(Assignment(3, at(1, 1)))
    assert charges(DECEMBER, [s], PLANS, {("app7", "hits"): 5000}, "EUR") == []


def test_an_application_that_ended_before_the_month_or_starts_after_is_not_billed() -> None:
    gone = sub(Assignment(1, at(1, 10), at(30, 11)))
    later = sub(Assignment(1, at(2, 1, 2027)))
    assert charges(DECEMBER, [gone, later], PLANS, {("app7", "hits"): 3}, "EUR") == []


def test_a_deleted_plan_bills_nothing_for_its_days() -> None:
    s = sub(Assignment(99, at(1, 10), at(16)), Assignment(1, at(16)))
    assert fees(charges(DECEMBER, [s], PLANS, {}, "EUR")) == [("basic", 16, Decimal("16.00"))]


TIERED = PlanTerms(
    4,
    "metered",
    Decimal(0),
    Decimal(0),
    tiers=(
        Tier("hits", 1, 100, Decimal("0")),
        Tier("hits", 101, 1000, Decimal("0.01")),
        Tier("hits", 1001, None, Decimal("0.005")),
        Tier("search", 50, 60, Decimal("1")),
    ),
)


def usage_lines(used: int, metric: str = "hits") -> list[tuple[int, Decimal]]:
    s = sub(Assignment(4, at(1, 1)))
    lines = charges(DECEMBER, [s], {4: TIERED}, {("app7", metric): used}, "EUR")
    assert all(c.kind == "usage" and c.metric == metric for c in lines)
    return [(c.quantity, c.amount) for c in lines]


@pytest.mark.parametrize(
    ("used", "expected"),
    [
        (49, []),  # min - 1
        (50, [(1, Decimal("1.00"))]),  # min
        (60, [(11, Decimal("11.00"))]),  # max
        (61, [(11, Decimal("11.00"))]),  # max + 1: past the last tier, free
    ],
)
def test_each_boundary_of_a_single_tier(used: int, expected: list) -> None:  # type: ignore[type-arg]
    assert usage_lines(used, "search") == expected


@pytest.mark.parametrize(
    ("used", "expected"),
    [
        (0, []),
        (100, [(100, Decimal("0.00"))]),
        (101, [(100, Decimal("0.00")), (1, Decimal("0.01"))]),
        (1000, [(100, Decimal("0.00")), (900, Decimal("9.00"))]),
        (
            1001,
            [(100, Decimal("0.00")), (900, Decimal("9.00")), (1, Decimal("0.01"))],
        ),
        (
            1003,
            [(100, Decimal("0.00")), (900, Decimal("9.00")), (3, Decimal("0.02"))],
        ),
    ],
)
def test_tiers_each_price_their_own_units(used: int, expected: list) -> None:  # type: ignore[type-arg]
    # 3 x 0.005 = 0.015: rounded half up, once, on the line.
    assert usage_lines(used) == expected


def test_usage_is_priced_by_the_plan_held_at_the_end_of_the_month() -> None:
    s = sub(Assignment(4, at(1, 1), at(20)), Assignment(1, at(20)))
    lines = charges(DECEMBER, [s], {**PLANS, 4: TIERED}, {("app7", "hits"): 500}, "EUR")
    assert [c.kind for c in lines] == ["monthly_fee"]


def test_huge_usage_keeps_every_digit() -> None:
    s = sub(Assignment(4, at(1, 1)))
    used = 2**63 - 1
    lines = charges(DECEMBER, [s], {4: TIERED}, {("app7", "hits"): used}, "EUR")
    assert lines[-1].quantity == used - 1000
    # 9223372036854774807 x 0.005 = 46116860184273874.035: every digit, then half up.
    assert lines[-1].amount == Decimal("46116860184273874.04")


def test_amounts_round_half_up_to_the_currencys_minor_unit() -> None:
    assert round_amount(Decimal("0.005"), "EUR") == Decimal("0.01")
    assert round_amount(Decimal("0.015"), "EUR") == Decimal("0.02")
    assert round_amount(Decimal("12.5"), "JPY") == Decimal("13")
    assert round_amount(Decimal("1.0005"), "KWD") == Decimal("1.001")
    with pytest.raises(ValueError):
        check_currency("EUX")


@pytest.mark.parametrize(
    "text",
    ["2026-13", "2026-00", "x", "", "11-2026", "2026-1", "99999-01", "1969-12", "２０２６-11"],
)
def test_a_month_is_yyyy_mm(text: str) -> None:
    with pytest.raises(ValueError):
        Month.parse(text)
    assert str(Month.parse("2026-02")) == "2026-02" and Month.parse("2028-02").days == 29
