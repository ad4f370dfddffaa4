"""Calendar windows in UTC for the periods a usage limit can be counted over.

A limit per ``day`` resets at 00:00 UTC, per ``week`` on Monday 00:00 UTC (ISO week), per
``month`` on the 1st. Every gateway process and host computes the same window for the same
instant, which is what lets them share one counter per window.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

__all__ = ["PERIODS", "window"]

PERIODS: tuple[str, ...] = ("minute", "hour", "day", "week", "month", "year", "eternity")

_FIXED_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}
_WEEK = 7 * 86400
# 1970-01-01 was a Thursday; weeks are aligned to the first Monday after it.
_FIRST_MONDAY = 4 * 86400


def window(period: str, now: float) -> tuple[int, int | None]:
    """Return ``(start, end)`` in epoch seconds of the ``period`` window holding ``now``.

    ``start <= now < end``; ``end`` is ``None`` for ``eternity`` (start is 0).
    Raises ``ValueError`` for an unknown period.
    """
    t = math.floor(now)
    size = _FIXED_SECONDS.get(period)
    if size is not None:
        start = t - t % size
        return start, start + size
    if period == "week":
        start = t - (t - _FIRST_MONDAY) % _WEEK
        return start, start + _WEEK
    if period == "month":
        day = datetime.fromtimestamp(t, UTC)
        year, month = day.year, day.month
        start_at = datetime(year, month, 1, tzinfo=UTC)
        end_at = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
        return int(start_at.timestamp()), int(end_at.timestamp())
    if period == "year":
        year = datetime.fromtimestamp(t, UTC).year
        start_at = datetime(year, 1, 1, tzinfo=UTC)
        end_at = datetime(year + 1, 1, 1, tzinfo=UTC)
        return int(start_at.timestamp()), int(end_at.timestamp())
    if period == "eternity":
        return 0, None
    raise ValueError(f"unknown period {period!r}; expected one of {', '.join(PERIODS)}")
