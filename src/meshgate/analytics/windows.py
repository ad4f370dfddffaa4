"""Roll-up windows: where a minute falls at each granularity, and usage within a limit's period.

A limit's period (``limits.periods``) is a calendar window in UTC; its usage is read from the
roll-up whose windows tile it: one row for a minute, hour, day or month, the days of a week,
the months of a year or of all time.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from meshgate.analytics.models import UsageRollup
from meshgate.config.periods import window

__all__ = [
    "GRANULARITY_SECONDS",
    "month_start",
    "next_start",
    "usage_in_period",
    "usage_in_periods",
    "window_start",
]

# Nominal length of a window: a month's is its longest, for sizing ranges.
GRANULARITY_SECONDS = {"minute": 60, "hour": 3600, "day": 86400, "month": 31 * 86400}

# The roll-up that tiles each limit period, and whether several of its windows are summed.
_TILES = {
    "minute": ("minute", False),
    "hour": ("hour", False),
    "day": ("day", False),
    "week": ("day", True),
    "month": ("month", False),
    "year": ("month", True),
    "eternity": ("month", True),
}


def month_start(t: int) -> int:
    day = datetime.fromtimestamp(t, UTC)
    return int(datetime(day.year, day.month, 1, tzinfo=UTC).timestamp())


def window_start(granularity: str, t: int) -> int:
    """The start (epoch seconds) of the ``granularity`` window holding ``t``."""
    if granularity == "month":
        return month_start(t)
    size = GRANULARITY_SECONDS[granularity]
    return t - t % size


def next_start(granularity: str, start: int) -> int:
    """The start of the window after the one starting at ``start``."""
    if granularity == "month":
        day = datetime.fromtimestamp(start, UTC)
        year, month = day.year + day.month // 12, day.month % 12 + 1
        return int(datetime(year, month, 1, tzinfo=UTC).timestamp())
    return start + GRANULARITY_SECONDS[granularity]


def usage_in_period(
    session: Session, product: str, application: str, metric: str, period: str, now: float
) -> int:
    """The application's usage of ``metric`` in the current window of ``period`` at ``now``."""
    return usage_in_periods(session, product, application, [(metric, period)], now)[
        (metric, period)
    ]


def usage_in_periods(
    session: Session,
    product: str,
    application: str,
    limits: Iterable[tuple[str, str]],
    now: float,
) -> dict[tuple[str, str], int]:
    """``usage_in_period`` for several (metric, period) pairs of one application."""
    out: dict[tuple[str, str], int] = {}
    for metric, period in limits:
        start, end = window(period, now)
        granularity, summed = _TILES[period]
        query = select(func.coalesce(func.sum(UsageRollup.value), 0)).where(
            UsageRollup.granularity == granularity,
            UsageRollup.product == product,
            UsageRollup.application == application,
            UsageRollup.metric == metric,
        )
        if summed:
            query = query.where(UsageRollup.start >= start)
            if end is not None:
                query = query.where(UsageRollup.start < end)
        else:
            query = query.where(UsageRollup.start == start)
        out[(metric, period)] = int(session.scalar(query) or 0)
    return out
