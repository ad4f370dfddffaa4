"""Billing periods: calendar months in UTC, written ``YYYY-MM``."""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

__all__ = ["Month", "as_utc"]

_MONTH = re.compile(r"([0-9]{4})-([0-9]{2})")
# Invoices before the epoch or after 9998 are a typo, not a billing period.
FIRST_YEAR, LAST_YEAR = 1970, 9998


def as_utc(value: datetime) -> datetime:
    """An aware UTC time: SQLite gives naive ones back, which are UTC here."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True, order=True)
class Month:
    year: int
    month: int

    @classmethod
    def parse(cls, text: str) -> Month:
        """``2026-11``; ValueError, saying what is expected, for anything else."""
        match = _MONTH.fullmatch(text)
        if match is None:
            raise ValueError(f"{text[:40]!r} is not a month: write YYYY-MM, e.g. 2026-11")
        year, month = int(match[1]), int(match[2])
        if not 1 <= month <= 12:
            raise ValueError(f"{text!r}: the month must be 01 to 12")
        if not FIRST_YEAR <= year <= LAST_YEAR:
            raise ValueError(f"{text!r}: the year must be {FIRST_YEAR} to {LAST_YEAR}")
        return cls(year, month)

    @classmethod
    def of(cls, moment: datetime) -> Month:
        moment = as_utc(moment)
        return cls(moment.year, moment.month)

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    @property
    def days(self) -> int:
        return calendar.monthrange(self.year, self.month)[1]

    @property
    def first_day(self) -> date:
        return date(self.year, self.month, 1)

    @property
    def last_day(self) -> date:
        return date(self.year, self.month, self.days)

    @property
    def start(self) -> datetime:
        return datetime(self.year, self.month, 1, tzinfo=UTC)

    @property
    def end(self) -> datetime:
        """The first instant of the next month."""
        return self.start + timedelta(days=self.days)

    @property
    def epoch(self) -> int:
        """The month's start in epoch seconds: the ``start`` of its monthly roll-ups."""
        return int(self.start.timestamp())

    def next(self) -> Month:
        return Month.of(self.end)

    def previous(self) -> Month:
        return Month.of(self.start - timedelta(days=1))
