"""The usage alerts' tables: levels per product, alerts made, webhooks, and the outbox of
deliveries (webhook calls and e-mails) with a log of every attempt.

Deliveries are rows, not in-memory jobs, so that a control plane restarted with alerts
still unsent sends them when it is back.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column

from meshgate.control.models import Base, utcnow

__all__ = ["Alert", "AlertLevels", "Delivery", "DeliveryAttempt", "Webhook"]


class AlertLevels(Base):
    """The levels (percent of a limit) at which a product's applications are alerted."""

    __tablename__ = "product_alert_levels"
    product_id: Mapped[int] = mapped_column(
        ForeignKey("products.id", ondelete="CASCADE"), primary_key=True
    )
    levels: Mapped[list[Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class Alert(Base):
    """An application's usage of a metric crossed a level of one of its plan's limits."""

    __tablename__ = "alerts"
    __table_args__ = (
        # The 24-hour look-back of every evaluation, and an account's own list.
        Index("ix_alerts_key", "application", "metric", "period", "at"),
        Index("ix_alerts_account", "account_id", "at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    product: Mapped[str] = mapped_column(String(200))
    application: Mapped[str] = mapped_column(String(200))
    account_id: Mapped[int | None] = mapped_column(Integer)
    metric: Mapped[str] = mapped_column(String(200))
    period: Mapped[str] = mapped_column(String(16))
    level: Mapped[int] = mapped_column(SmallInteger)
    usage: Mapped[int] = mapped_column(BigInteger)
    limit: Mapped[int] = mapped_column(BigInteger)
    violation: Mapped[bool] = mapped_column(Boolean)
    state: Mapped[str] = mapped_column(String(8), default="unread")


class Webhook(Base):
    """Where alerts are posted: for one account's applications, or (no account) for all."""

    __tablename__ = "webhooks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )
    url: Mapped[str] = mapped_column(String(2000))
    # Kept as given, not hashed: every delivery is signed with it.
    secret: Mapped[str] = mapped_column(String(100))
    events: Mapped[list[Any]] = mapped_column(JSON)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    account_id: Mapped[int | None] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    description: Mapped[str] = mapped_column(String(1000), default="")


class Delivery(Base):
    """One alert to one webhook or one mailbox: pending until sent or out of attempts."""

    __tablename__ = "alert_deliveries"
    __table_args__ = (Index("ix_alert_deliveries_due", "state", "next_at"),)
    # Random, and the same on every attempt: the receiver's key to drop a repeat.
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"), index=True)
    channel: Mapped[str] = mapped_column(String(8))
    webhook_id: Mapped[int | None] = mapped_column(
        ForeignKey("webhooks.id", ondelete="CASCADE"), index=True
    )
    recipient: Mapped[str | None] = mapped_column(String(320))
    event: Mapped[str] = mapped_column(String(16))
    # The JSON document sent (webhook) or written into the mail, fixed when the alert is made.
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    state: Mapped[str] = mapped_column(String(12), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When the next attempt is due; while one runs, when it is taken to have died.
    next_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DeliveryAttempt(Base):
    """One try of a delivery: what the receiver answered, or why nothing was."""

    __tablename__ = "alert_delivery_attempts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(
        ForeignKey("alert_deliveries.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    status_code: Mapped[int | None] = mapped_column(SmallInteger)
    error: Mapped[str | None] = mapped_column(String(500))
    duration_ms: Mapped[float] = mapped_column(Float)
