"""The monthly run: on the billing day at 00:00 UTC the control plane bills the month before.

Wire it in with ``start(plane)`` in the plane's start and ``await stop()`` in its stop. A run
already made for the month by the schedule is not made again, and a run is idempotent
anyway: a restart on the billing day, or two replicas, are harmless. A control plane that
was down on the day catches up when it starts.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from meshgate.billing.history import now
from meshgate.billing.models import BillingRun
from meshgate.billing.periods import Month
from meshgate.billing.runs import run_billing
from meshgate.billing.settings import load_settings
from meshgate.control._db import Database

__all__ = ["due_month", "next_check", "run_due", "start", "stop"]

log = logging.getLogger("meshgate.billing")

# The settings (day, on/off) are read again this often: a change applies without a restart.
RECHECK_SECONDS = 3600.0
_task: asyncio.Task[None] | None = None


def due_month(at: datetime, billing_day: int) -> Month:
    """The month whose scheduled run is the latest at or before ``at``."""
    month = Month.of(at)
    if at.day < billing_day:
        month = month.previous()
    return month.previous()


def next_check(at: datetime, billing_day: int) -> datetime:
    """The next billing day's 00:00 UTC after ``at``."""
    month = Month.of(at)
    candidate = month.start + timedelta(days=billing_day - 1)
    if candidate <= at:
        candidate = month.next().start + timedelta(days=billing_day - 1)
    return candidate


def run_due(db: Database) -> int | None:
    """Run the month that is due, unless the schedule is off or ran it already; the run's
    id, or None."""
    at = now()
    with db.session() as session:
        settings = load_settings(session)
        if not settings.schedule:
            return None
        month = due_month(at, settings.billing_day)
        done = session.scalar(
            select(BillingRun.id)
            .where(
                BillingRun.period == str(month),
                BillingRun.trigger == "schedule",
                BillingRun.account_id.is_(None),
            )
            .limit(1)
        )
    if done is not None:
        return None
    summary = run_billing(db, month, trigger="schedule", actor="schedule")
    log.info(
        "billing %s: %d accounts, %d invoices made, %d updated, %d unchanged",
        month,
        summary.accounts,
        summary.created,
        summary.updated,
        summary.unchanged,
    )
    return summary.id


def _billing_day(db: Database) -> int:
    with db.session() as session:
        return load_settings(session).billing_day


async def _forever(db: Database) -> None:
    while True:
        try:
            await asyncio.to_thread(run_due, db)
        except Exception:
            log.exception("the scheduled billing run failed; it is tried again later")
        # A store that fails here too (down, restarting) must not end the schedule for good.
        try:
            day = await asyncio.to_thread(_billing_day, db)
            wait = (next_check(now(), day) - now()).total_seconds()
        except Exception:
            log.exception("reading the billing settings failed; tried again later")
            wait = RECHECK_SECONDS
        await asyncio.sleep(max(1.0, min(wait, RECHECK_SECONDS)))


def start(plane: Any) -> None:
    """Start the schedule on the running loop for ``plane`` (a ControlPlane)."""
    global _task
    if _task is None or _task.done():
        _task = asyncio.get_running_loop().create_task(_forever(plane.db))


async def stop() -> None:
    global _task
    task, _task = _task, None
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
