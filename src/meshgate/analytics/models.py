"""The analytics store: usage batches received, and roll-ups by minute, hour, day and month.

Every roll-up row is a sum over one window (``start``, epoch seconds UTC, of a minute, hour,
day or calendar month) that ingest adds to: the same aggregate lands in the four
granularities at once, so a series at any granularity is one indexed range scan.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Index, Integer, SmallInteger, String
from sqlalchemy.orm import Mapped, mapped_column

from meshgate.control.models import Base, utcnow

__all__ = [
    "GRANULARITIES",
    "LatencyRollup",
    "ResponseRollup",
    "UsageBatchReceipt",
    "UsageRollup",
]

GRANULARITIES = ("minute", "hour", "day", "month")


class UsageBatchReceipt(Base):
    """A batch counted: its id makes a resent batch count once."""

    __tablename__ = "usage_batches"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    dataplane: Mapped[str] = mapped_column(String(200), default="")
    received_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )
    rows: Mapped[int] = mapped_column(Integer, default=0)


class UsageRollup(Base):
    """Usage of one metric by one application in one window."""

    __tablename__ = "usage_rollups"
    __table_args__ = (
        Index("ix_usage_rollups_application", "application", "granularity", "start"),
        Index("ix_usage_rollups_account", "account_id", "granularity", "start"),
    )
    granularity: Mapped[str] = mapped_column(String(8), primary_key=True)
    product: Mapped[str] = mapped_column(String(200), primary_key=True)
    start: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    application: Mapped[str] = mapped_column(String(200), primary_key=True)
    metric: Mapped[str] = mapped_column(String(200), primary_key=True)
    # The application's account when ingest knew it (a control plane's application), else
    # None (a gateway's file-only application).
    account_id: Mapped[int | None] = mapped_column(Integer)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class ResponseRollup(Base):
    """Responses of one status and reason to one application (or to none) in one window."""

    __tablename__ = "response_rollups"
    granularity: Mapped[str] = mapped_column(String(8), primary_key=True)
    product: Mapped[str] = mapped_column(String(200), primary_key=True)
    start: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    application: Mapped[str] = mapped_column(String(200), primary_key=True)
    status: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    reason: Mapped[str] = mapped_column(String(16), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)


class LatencyRollup(Base):
    """One bucket of a product's latency histogram in one window (see LATENCY_BOUNDS_MS)."""

    __tablename__ = "latency_rollups"
    granularity: Mapped[str] = mapped_column(String(8), primary_key=True)
    product: Mapped[str] = mapped_column(String(200), primary_key=True)
    start: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    # 0..len(LATENCY_BOUNDS_MS); -1 holds the milliseconds summed (for the mean).
    bucket: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)
