"""Calendar windows: every period, its boundaries, month and year lengths, ISO weeks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshgate.limits.periods import PERIODS, window


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp())


def reference(period: str, t: int) -> tuple[int, int | None]:
    """The window by plain datetime arithmetic, to compare the fast path against."""
    at = datetime.fromtimestamp(t, UTC)
    if period == "eternity":
        return 0, None
    if period == "minute":
        start = at.replace(second=0)
        end = start + timedelta(minutes=1)
    elif period == "hour":
        start = at.replace(minute=0, second=0)
        end = start + timedelta(hours=1)
    elif period == "day":
        start = at.replace(hour=0, minute=0, second=0)
        end = start + timedelta(days=1)
    elif period == "week":
        start = at.replace(hour=0, minute=0, second=0) - timedelta(days=at.weekday())
        end = start + timedelta(weeks=1)
    elif period == "month":
        start = at.replace(day=1, hour=0, minute=0, second=0)
        end = (start + timedelta(days=32)).replace(day=1)
    else:
        start = at.replace(month=1, day=1, hour=0, minute=0, second=0)
        end = start.replace(year=start.year + 1)
    return int(start.timestamp()), int(end.timestamp())


LEAP_DAY_AFTERNOON = ts(2024, 2, 29, 13, 45, 30) + 0.75  # a Thursday


@pytest.mark.parametrize(
    ("period", "start", "end"),
    [
        ("minute", ts(2024, 2, 29, 13, 45), ts(2024, 2, 29, 13, 46)),
        ("hour", ts(2024, 2, 29, 13), ts(2024, 2, 29, 14)),
        ("day", ts(2024, 2, 29), ts(2024, 3, 1)),
        ("week", ts(2024, 2, 26), ts(2024, 3, 4)),
        ("month", ts(2024, 2, 1), ts(2024, 3, 1)),
        ("year", ts(2024, 1, 1), ts(2025, 1, 1)),
        ("eternity", 0, None),
    ],
)
def test_window_of_each_period(period: str, start: int, end: int | None) -> None:
    assert window(period, LEAP_DAY_AFTERNOON) == (start, end)


@pytest.mark.parametrize("period", [p for p in PERIODS if p != "eternity"])
def test_start_belongs_to_the_window_and_end_to_the_next(period: str) -> None:
    start, end = window(period, LEAP_DAY_AFTERNOON)
    assert end is not None
    assert window(period, start) == (start, end)
    assert window(period, end - 0.001) == (start, end)
    assert window(period, end)[0] == end
    assert window(period, start - 0.001)[1] == start


def test_december_rolls_into_january() -> None:
    last_moment = ts(2023, 12, 31, 23, 59, 59) + 0.999
    assert window("month", last_moment) == (ts(2023, 12, 1), ts(2024, 1, 1))
    assert window("year", last_moment) == (ts(2023, 1, 1), ts(2024, 1, 1))
    assert window("day", last_moment) == (ts(2023, 12, 31), ts(2024, 1, 1))
    assert window("month", ts(2024, 1, 1)) == (ts(2024, 1, 1), ts(2024, 2, 1))
    assert window("year", ts(2024, 1, 1)) == (ts(2024, 1, 1), ts(2025, 1, 1))


@pytest.mark.parametrize(
    ("year", "february_days", "year_days"),
    [(2023, 28, 365), (2024, 29, 366), (2000, 29, 366), (2100, 28, 365)],
)
def test_leap_years(year: int, february_days: int, year_days: int) -> None:
    start, end = window("month", ts(year, 2, 15))
    assert end is not None and end - start == february_days * 86400
    start, end = window("year", ts(year, 6, 1))
    assert end is not None and end - start == year_days * 86400


@pytest.mark.parametrize("month", range(1, 13))
def test_every_month_starts_on_the_first(month: int) -> None:
    start, end = window("month", ts(2025, month, 10, 12))
    assert start == ts(2025, month, 1)
    assert end == (ts(2025, month + 1, 1) if month < 12 else ts(2026, 1, 1))


def test_weeks_start_on_monday_and_follow_iso_weeks() -> None:
    day = datetime(2020, 12, 20, 6, tzinfo=UTC)
    for _ in range(60):  # crosses the ISO year boundary of 2020 (week 53)
        start, end = window("week", day.timestamp())
        monday = datetime.fromtimestamp(start, UTC)
        assert monday.weekday() == 0 and (monday.hour, monday.minute) == (0, 0)
        assert end == start + 7 * 86400
        assert monday.isocalendar()[:2] == day.isocalendar()[:2]
        day += timedelta(days=1)
    assert window("week", ts(2021, 1, 1)) == (ts(2020, 12, 28), ts(2021, 1, 4))
    assert window("week", ts(2024, 3, 4)) == (ts(2024, 3, 4), ts(2024, 3, 11))


def test_around_the_epoch() -> None:
    assert window("week", 0) == (ts(1969, 12, 29), ts(1970, 1, 5))
    assert window("minute", -0.5) == (-60, 0)
    assert window("day", -1) == (-86400, 0)
    assert window("month", -1) == (ts(1969, 12, 1), 0)


def test_windows_are_integers() -> None:
    for period in PERIODS:
        start, end = window(period, LEAP_DAY_AFTERNOON)
        assert type(start) is int and (end is None or type(end) is int)


def test_unknown_period_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown period 'fortnight'"):
        window("fortnight", 0)


@given(t=st.integers(min_value=ts(1971, 1, 1), max_value=ts(2200, 1, 1)))
def test_matches_calendar_arithmetic(t: int) -> None:
    for period in PERIODS:
        assert window(period, t) == reference(period, t)


@given(now=st.floats(min_value=0, max_value=ts(2200, 1, 1), allow_nan=False))
def test_window_holds_now(now: float) -> None:
    for period in PERIODS:
        start, end = window(period, now)
        assert start <= now and (end is None or now < end)
