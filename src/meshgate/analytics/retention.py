"""Retention: roll-ups kept as 3scale keeps them, older windows deleted by a periodic job."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import delete, func, select

from meshgate.analytics import graph
from meshgate.analytics.alert_models import Alert
from meshgate.analytics.models import (
    LatencyRollup,
    ResponseRollup,
    UsageBatchReceipt,
    UsageRollup,
)
from meshgate.control._db import Database

if TYPE_CHECKING:
    from meshgate.control._plane import ControlPlane

__all__ = ["ALERTS_DAYS", "KEEP", "RECEIPTS_DAYS", "Retention", "apply_retention"]

log = logging.getLogger("meshgate.analytics")

# Seconds each granularity is kept: minutes two days, hours 90 days, days a year, months ten
# years.
KEEP = {
    "minute": 2 * 86400,
    "hour": 90 * 86400,
    "day": 366 * 86400,
    "month": 10 * 366 * 86400,
}
# A batch id is remembered this long: a gateway resends a batch at most this late.
RECEIPTS_DAYS = 30
# Alerts (with their deliveries and attempts) are kept as long as daily usage is.
ALERTS_DAYS = 366


# Windows deleted per transaction: a short hold of SQLite's write lock (ingest waits for it),
# however much has expired (a control plane that was off for a month).
_SLICE = {"minute": 3600, "hour": 86400, "day": 30 * 86400, "month": 366 * 86400}


def apply_retention(db: Database, now: float | None = None) -> int:
    """Delete windows past their granularity's retention, a slice of windows per
    transaction; the rows deleted."""
    now = time.time() if now is None else now
    deleted = 0
    for model in (UsageRollup, ResponseRollup, LatencyRollup):
        for granularity, keep in KEEP.items():
            cutoff = int(now - keep)
            with db.session() as session:
                oldest = session.scalar(
                    select(func.min(model.start)).where(model.granularity == granularity)
                )
            if oldest is None:
                continue
            edge = oldest
            while edge < cutoff:
                edge = min(edge + _SLICE[granularity], cutoff)
                with db.writer() as session, session.begin():
                    result = session.execute(
                        delete(model).where(model.granularity == granularity, model.start < edge)
                    )
                    deleted += result.rowcount  # type: ignore[attr-defined]
    moment = datetime.fromtimestamp(now, UTC)
    with db.writer() as session, session.begin():
        cutoff_at = moment - timedelta(days=RECEIPTS_DAYS)
        result = session.execute(
            delete(UsageBatchReceipt).where(UsageBatchReceipt.received_at < cutoff_at)
        )
        deleted += result.rowcount  # type: ignore[attr-defined]
        # Their deliveries and attempts go with them (ON DELETE CASCADE).
        result = session.execute(
            delete(Alert).where(Alert.at < moment - timedelta(days=ALERTS_DAYS))
        )
        deleted += result.rowcount  # type: ignore[attr-defined]
    deleted += graph.purge(db, now)
    return deleted


class Retention:
    """Applies retention soon after start, then every ``interval`` seconds."""

    def __init__(self, interval: float = 3600.0) -> None:
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def start(self, plane: ControlPlane) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(plane.db))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self, db: Database) -> None:
        while True:
            await asyncio.sleep(min(60.0, self.interval))
            try:
                deleted = await asyncio.to_thread(apply_retention, db)
                if deleted:
                    log.info("analytics retention deleted %d rows", deleted)
            except Exception:
                log.exception("analytics retention failed; it runs again later")
            await asyncio.sleep(max(0.0, self.interval - 60.0))
