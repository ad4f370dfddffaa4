"""Every application's plan over time, recorded wherever a plan is assigned.

One ORM hook sees every path that writes an application (the admin API's create and
change_plan, its generic update, declarative apply) inside the same flush, so the history
commits or rolls back with the change itself. A test sets the clock with :func:`use_clock`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import event, insert, update
from sqlalchemy.orm import Session, attributes

from meshgate.billing.models import PlanPeriod
from meshgate.control.models import Application, utcnow

__all__ = ["now", "use_clock"]

_clock: Callable[[], datetime] = utcnow


def now() -> datetime:
    """The billing clock: UTC, whole seconds."""
    return _clock()


@contextmanager
def use_clock(clock: Callable[[], datetime]) -> Iterator[None]:
    """Within the block, plan history and billing read time from ``clock``."""
    global _clock
    previous, _clock = _clock, clock
    try:
        yield
    finally:
        _clock = previous


def _opened(app: Application, at: datetime) -> dict[str, Any]:
    return {
        "account_id": app.account_id,
        "application_id": app.id,
        "app_id": app.app_id,
        "application_name": app.name,
        "plan_id": app.plan_id,
        "started_at": at,
        "ended_at": None,
    }


def _close(session: Session, application_id: int, at: datetime) -> None:
    session.connection().execute(
        update(PlanPeriod)
        .where(PlanPeriod.application_id == application_id, PlanPeriod.ended_at.is_(None))
        .values(ended_at=at)
    )


@event.listens_for(Session, "after_flush")
def _record(session: Session, _context: Any) -> None:
    # After the flush the new rows have their ids; new, dirty and deleted still hold
    # what this flush wrote, with each attribute's history.
    at: datetime | None = None
    opened: list[dict[str, Any]] = []
    for obj in session.new:
        if isinstance(obj, Application):
            at = at or now()
            opened.append(_opened(obj, at))
    for obj in session.dirty:
        if isinstance(obj, Application) and attributes.get_history(obj, "plan_id").deleted:
            at = at or now()
            _close(session, obj.id, at)
            opened.append(_opened(obj, at))
    for obj in session.deleted:
        if isinstance(obj, Application):
            _close(session, obj.id, at := at or now())
    if opened:
        session.connection().execute(insert(PlanPeriod), opened)
