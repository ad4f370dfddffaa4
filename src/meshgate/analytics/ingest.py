"""Ingest: a gateway's usage batch, counted once, added to the roll-ups of every granularity.

A batch's rows are summed per window in memory first (a minute's usage lands in its minute,
hour, day and month), then added to the store with one upsert per window in key order, so two
batches stored at once on PostgreSQL lock the same rows in the same order and never deadlock.
The batch's receipt is written in the same transaction: a batch sent again finds it and adds
nothing, and a batch that failed halfway left nothing to find.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from meshgate.analytics.models import (
    GRANULARITIES,
    LatencyRollup,
    ResponseRollup,
    UsageBatchReceipt,
    UsageRollup,
)
from meshgate.analytics.windows import window_start
from meshgate.config.usage import UsageBatch
from meshgate.control._db import Database
from meshgate.control.models import Application

__all__ = ["MAX_WINDOW_SUM", "BatchTooLarge", "Ingested", "UsageListener", "ingest"]

log = logging.getLogger("meshgate.analytics")

# Application ids per look-up of their accounts.
_CHUNK = 500
_LATENCY_SUM = -1
# What one batch may add to one window: the roll-ups' BIGINT (2**63 - 1) holds nine such.
MAX_WINDOW_SUM = 10**18


class BatchTooLarge(ValueError):
    """A batch whose rows add more to one window than a roll-up can hold: refused whole."""


@dataclass(frozen=True)
class Ingested:
    """What a stored batch changed, for listeners (alerts): called after the commit."""

    batch_id: str
    touched: frozenset[tuple[str, str, str]]  # (product, application, metric)
    at: float


UsageListener = Callable[[Ingested], None]


def ingest(
    db: Database,
    batch: UsageBatch,
    dataplane: str,
    listeners: Sequence[UsageListener] = (),
) -> bool:
    """Store ``batch``; False when a batch of its id was stored before (nothing is added)."""
    usage: dict[tuple[str, str, int, str, str], int] = defaultdict(int)
    responses: dict[tuple[str, str, int, str, int, str], int] = defaultdict(int)
    latency: dict[tuple[str, str, int, int], float] = defaultdict(float)
    touched: set[tuple[str, str, str]] = set()
    for product, application, metric, minute, value in batch.usage:
        touched.add((product, application, metric))
        for g in GRANULARITIES:
            usage[(g, product, window_start(g, minute), application, metric)] += value
    for product, application, status, reason, minute, count in batch.responses:
        for g in GRANULARITIES:
            responses[(g, product, window_start(g, minute), application, status, reason)] += count
    for product, minute, counts, ms_sum in batch.latency:
        for g in GRANULARITIES:
            start = window_start(g, minute)
            for bucket, count in enumerate(counts):
                if count:
                    latency[(g, product, start, bucket)] += count
            latency[(g, product, start, _LATENCY_SUM)] += ms_sum
    for sums in (usage, responses, latency):
        if any(value > MAX_WINDOW_SUM for value in sums.values()):
            raise BatchTooLarge(
                f"the batch adds more than {MAX_WINDOW_SUM} to one window: not usage, a fault"
            )
    rows = len(batch.usage) + len(batch.responses) + len(batch.latency)
    with db.writer() as session, session.begin():
        if not _receipt(session, db, batch.id, dataplane, rows):
            return False
        accounts = _accounts(session, {app for _, app, _ in touched})
        _add(
            session,
            db,
            UsageRollup.__table__,  # type: ignore[arg-type]
            ("granularity", "product", "start", "application", "metric"),
            "value",
            [
                {
                    "granularity": g,
                    "product": p,
                    "start": s,
                    "application": a,
                    "metric": m,
                    "account_id": accounts.get(a),
                    "value": v,
                }
                for (g, p, s, a, m), v in sorted(usage.items())
            ],
        )
        _add(
            session,
            db,
            ResponseRollup.__table__,  # type: ignore[arg-type]
            ("granularity", "product", "start", "application", "status", "reason"),
            "count",
            [
                {
                    "granularity": g,
                    "product": p,
                    "start": s,
                    "application": a,
                    "status": st,
                    "reason": r,
                    "count": c,
                }
                for (g, p, s, a, st, r), c in sorted(responses.items())
            ],
        )
        _add(
            session,
            db,
            LatencyRollup.__table__,  # type: ignore[arg-type]
            ("granularity", "product", "start", "bucket"),
            "count",
            [
                # The milliseconds sum is kept whole: sub-millisecond parts are noise here.
                {"granularity": g, "product": p, "start": s, "bucket": b, "count": round(c)}
                for (g, p, s, b), c in sorted(latency.items())
            ],
        )
    event = Ingested(batch.id, frozenset(touched), time.time())
    for listener in listeners:
        try:
            listener(event)
        except Exception:
            log.exception("a usage listener failed on batch %s", batch.id)
    return True


def _receipt(session: Session, db: Database, batch_id: str, dataplane: str, rows: int) -> bool:
    """Record the batch; False when it was recorded before (a concurrent sender of the same
    id waits here for the first to commit, then finds it)."""
    table: Table = UsageBatchReceipt.__table__  # type: ignore[assignment]
    insert = postgresql.insert(table) if not db.is_sqlite else sqlite.insert(table)
    statement = (
        insert.values(id=batch_id, dataplane=dataplane[:200], rows=rows)
        .on_conflict_do_nothing(index_elements=["id"])
        .returning(table.c.id)
    )
    return session.execute(statement).first() is not None


def _accounts(session: Session, app_ids: set[str]) -> dict[str, int]:
    """The account of each application the store knows (file-only ones have none)."""
    out: dict[str, int] = {}
    names = sorted(a for a in app_ids if a)
    for i in range(0, len(names), _CHUNK):
        chunk = names[i : i + _CHUNK]
        for app_id, account_id in session.execute(
            select(Application.app_id, Application.account_id).where(Application.app_id.in_(chunk))
        ):
            out[app_id] = account_id
    return out


def _add(
    session: Session,
    db: Database,
    table: Table,
    key: Iterable[str],
    column: str,
    rows: list[dict[str, Any]],
) -> None:
    """Insert each row, or add its ``column`` to the row of the same key already there."""
    if not rows:
        return
    dialect: Any = sqlite if db.is_sqlite else postgresql
    # One statement, compiled once, executed for every row (executemany: psycopg pipelines
    # it, sqlite3 loops in C); multi-row VALUES would be compiled anew for each chunk.
    insert = dialect.insert(table)
    statement = insert.on_conflict_do_update(
        index_elements=list(key),
        set_={column: table.c[column] + insert.excluded[column]},
    )
    session.execute(statement, rows)
