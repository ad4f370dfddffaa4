"""Usage in the current window of a limit period, summed from the roll-ups.

A stand-in with the signature the lead's module has (issue 12): replaced at merge.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from meshgate.analytics.models import UsageRollup

__all__ = ["usage_in_period"]

_FIXED = {"minute": 60, "hour": 3600, "day": 86400}
_FIRST_MONDAY = 4 * 86400


def _bounds(period: str, now: float) -> tuple[str, int, int | None]:
    """The granularity to sum, and the window's start and end (None: no end)."""
    t = math.floor(now)
    if period in _FIXED:
        size = _FIXED[period]
        return period, t - t % size, t - t % size + size
    if period == "week":
        start = t - (t - _FIRST_MONDAY) % (7 * 86400)
        return "day", start, start + 7 * 86400
    day = datetime.fromtimestamp(t, UTC)
    if period == "month":
        start_at = datetime(day.year, day.month, 1, tzinfo=UTC)
        end_at = datetime(day.year + day.month // 12, day.month % 12 + 1, 1, tzinfo=UTC)
        return "month", int(start_at.timestamp()), int(end_at.timestamp())
    if period == "year":
        start_at = datetime(day.year, 1, 1, tzinfo=UTC)
        return (
            "month",
            int(start_at.timestamp()),
            int(start_at.replace(year=day.year + 1).timestamp()),
        )
    if period == "eternity":
        return "month", 0, None
    raise ValueError(f"unknown period {period!r}")


def usage_in_period(
    session: Session, product: str, application: str, metric: str, period: str, now: float
) -> int:
    """The application's usage of ``metric`` in the window of ``period`` holding ``now``."""
    granularity, start, end = _bounds(period, now)
    query = select(func.coalesce(func.sum(UsageRollup.value), 0)).where(
        UsageRollup.granularity == granularity,
        UsageRollup.product == product,
        UsageRollup.application == application,
        UsageRollup.metric == metric,
        UsageRollup.start >= start,
    )
    if end is not None:
        query = query.where(UsageRollup.start < end)
    return int(session.scalar(query) or 0)
