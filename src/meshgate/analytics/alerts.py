"""Usage alerts, as 3scale makes them: when an application's usage of a metric crosses a level
(percent) of one of its plan's limits, once per level per limit per 24 hours, only the
highest level crossed; 100 % and over is a violation.

Ingest only enqueues what a batch touched (:meth:`AlertService.usage_ingested`); a worker
thread evaluates off the ingest path, coalescing repeats, and makes each alert and its
deliveries in one transaction. Two evaluations of one key at once make one alert: they are
serialized by the store (SQLite's write lock, a PostgreSQL advisory lock per key).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import and_, func, select, text
from sqlalchemy.orm import Session

from meshgate.analytics import _deliveries
from meshgate.analytics._mail import SmtpSettings
from meshgate.analytics.alert_models import Alert, AlertLevels
from meshgate.analytics.ingest import Ingested
from meshgate.analytics.windows import usage_in_period
from meshgate.control._db import Database
from meshgate.control.models import Application, Limit, Metric, Product

if TYPE_CHECKING:
    from meshgate.control._plane import ControlPlane

__all__ = [
    "LEVELS",
    "AlertService",
    "AlertSettings",
    "Crossing",
    "Key",
    "crossings",
    "level_reached",
    "list_alerts",
    "record",
]

log = logging.getLogger("meshgate.alerts")

LEVELS = (50, 80, 90, 100, 120, 150, 200, 300)
# (product name, application app_id, metric name): what a usage batch changed.
Key = tuple[str, str, str]
QUIET = timedelta(hours=24)
# Products' levels are read again after this many seconds (a change applies that late).
_LEVELS_TTL = 2.0


@dataclass(frozen=True)
class AlertSettings:
    """Where alerts go besides webhooks, and how deliveries are retried."""

    smtp: SmtpSettings | None = None
    # The operator's mailbox, sent every alert besides the account's own address.
    operator_email: str | None = None
    # Attempt n waits retry_base * 4**(n-1) seconds after the one before, at most retry_cap.
    retry_base: float = 1.0
    retry_cap: float = 3600.0
    max_attempts: int = 8
    send_timeout: float = 5.0
    senders: int = 4

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> AlertSettings:
        """MESHGATE_SMTP_URL (mail off when unset), MESHGATE_ALERT_EMAIL,
        MESHGATE_ALERT_RETRY_BASE, MESHGATE_ALERT_RETRY_CAP, MESHGATE_ALERT_ATTEMPTS;
        ValueError naming the variable that is wrong."""
        smtp_url = environ.get("MESHGATE_SMTP_URL", "").strip()
        operator = environ.get("MESHGATE_ALERT_EMAIL", "").strip() or None
        if operator is not None and ("@" not in operator or any(c.isspace() for c in operator)):
            raise ValueError(f"MESHGATE_ALERT_EMAIL is not an e-mail address: {operator!r}")
        try:
            smtp = SmtpSettings.from_url(smtp_url) if smtp_url else None
        except ValueError as exc:
            raise ValueError(f"MESHGATE_SMTP_URL: {exc}") from None
        return cls(
            smtp=smtp,
            operator_email=operator,
            retry_base=_number(environ, "MESHGATE_ALERT_RETRY_BASE", 1.0, 0.001, 86_400),
            retry_cap=_number(environ, "MESHGATE_ALERT_RETRY_CAP", 3600.0, 0.001, 7 * 86_400),
            max_attempts=int(_number(environ, "MESHGATE_ALERT_ATTEMPTS", 8, 1, 100)),
        )

    def backoff(self, attempts: int) -> float:
        """Seconds before the next try after ``attempts`` failed ones."""
        return float(min(self.retry_cap, self.retry_base * 4 ** max(0, attempts - 1)))


def _number(
    environ: Mapping[str, str], name: str, default: float, low: float, high: float
) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} is not a number: {raw!r}") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low:g} and {high:g}, not {raw}")
    return value


@dataclass(frozen=True)
class Crossing:
    """A level an application's usage reached, not yet alerted within 24 hours."""

    product: str
    application: str
    account_id: int | None
    metric: str
    period: str
    level: int
    usage: int
    limit: int

    @property
    def violation(self) -> bool:
        return self.level >= 100 or self.limit == 0


def level_reached(levels: Iterable[int], usage: int, limit: int) -> int | None:
    """The highest of ``levels`` that ``usage`` reaches of ``limit``; any usage of a limit
    of 0 reaches every level."""
    if usage <= 0:
        return None
    reached = [level for level in levels if limit <= 0 or level * limit <= usage * 100]
    return max(reached, default=None)


def crossings(session: Session, key: Key, levels: Iterable[int], now: float) -> list[Crossing]:
    """The levels ``key`` reached of each of its plan's limits that were not alerted yet."""
    product, app_id, metric = key
    found = session.execute(
        select(Application.account_id, Application.plan_id, Metric.id)
        .join(Product, Product.id == Application.product_id)
        .join(Metric, and_(Metric.product_id == Product.id, Metric.name == metric))
        .where(Application.app_id == app_id, Product.name == product)
    ).first()
    if found is None:
        return []
    account_id, plan_id, metric_id = found
    limits = session.execute(
        select(Limit.period, Limit.value)
        .where(Limit.plan_id == plan_id, Limit.metric_id == metric_id)
        .order_by(Limit.period)
    ).all()
    levels = tuple(levels)
    out = []
    for period, value in limits:
        usage = usage_in_period(session, product, app_id, metric, period, now)
        level = level_reached(levels, usage, value)
        if level is None or _alerted(session, app_id, metric, period, level, now):
            continue
        out.append(Crossing(product, app_id, account_id, metric, period, level, usage, value))
    return out


def _alerted(
    session: Session, app_id: str, metric: str, period: str, level: int, now: float
) -> bool:
    since = _utc(now) - QUIET
    return (
        session.scalar(
            select(Alert.id)
            .where(
                Alert.application == app_id,
                Alert.metric == metric,
                Alert.period == period,
                Alert.at > since,
                Alert.level >= level,
            )
            .limit(1)
        )
        is not None
    )


def record(session: Session, crossing: Crossing, now: float) -> Alert | None:
    """Inside a write transaction: the alert for ``crossing``, unless one at its level or
    higher was made within 24 hours (by this process or another, also at this moment)."""
    if session.get_bind().dialect.name == "postgresql":
        name = f"{crossing.application}\0{crossing.metric}\0{crossing.period}".encode()
        lock = int.from_bytes(hashlib.sha256(name).digest()[:8], "big", signed=True)
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock})
    if _alerted(
        session, crossing.application, crossing.metric, crossing.period, crossing.level, now
    ):
        return None
    alert = Alert(
        at=_utc(now),
        product=crossing.product,
        application=crossing.application,
        account_id=crossing.account_id,
        metric=crossing.metric,
        period=crossing.period,
        level=crossing.level,
        usage=crossing.usage,
        limit=crossing.limit,
        violation=crossing.violation,
        state="unread",
    )
    session.add(alert)
    session.flush()
    return alert


def list_alerts(
    session: Session,
    *,
    account_id: int | None = None,
    application: str | None = None,
    product: str | None = None,
    metric: str | None = None,
    violation: bool | None = None,
    state: str | None = None,
    since: datetime | None = None,
    page: int = 1,
    per_page: int = 50,
) -> tuple[list[Alert], int]:
    """Alerts matching every filter given, newest first, and how many match in all."""
    query = select(Alert)
    for column, value in (
        (Alert.account_id, account_id),
        (Alert.application, application),
        (Alert.product, product),
        (Alert.metric, metric),
        (Alert.violation, violation),
        (Alert.state, state),
    ):
        if value is not None:
            query = query.where(column == value)
    if since is not None:
        query = query.where(Alert.at >= since)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(
        query.order_by(Alert.at.desc(), Alert.id.desc())
        .offset((page - 1) * per_page)
        .limit(per_page)
    ).all()
    return list(rows), int(total)


class AlertService:
    """The evaluation queue and worker, and the delivery worker, of one control plane."""

    def __init__(
        self, db: Database, settings: AlertSettings, clock: Callable[[], float] = time.time
    ) -> None:
        self.db = db
        self.settings = settings
        self.clock = clock
        self.deliveries = _deliveries.DeliveryWorker(db, settings, clock)
        self._pending: set[Key] = set()
        self._busy = False
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._levels: dict[str, tuple[int, ...]] = {}
        self._levels_read = -_LEVELS_TTL

    def usage_ingested(self, ingested: Ingested) -> None:
        """Ingest's listener: enqueue and return."""
        self.enqueue(ingested.touched)

    def enqueue(self, keys: Iterable[Key]) -> None:
        with self._cond:
            self._pending.update(keys)
            self._cond.notify()

    async def start(self, plane: ControlPlane) -> None:
        """The control plane's service: listen to ingest, start the workers."""
        plane.usage_listeners.append(self.usage_ingested)
        self.start_workers()

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_workers)

    def start_workers(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="meshgate-alerts", daemon=True)
        self._thread.start()
        self.deliveries.start()

    def stop_workers(self) -> None:
        """Evaluate what is queued, then stop; deliveries in flight finish or time out."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.deliveries.stop()

    def idle(self) -> bool:
        """Nothing queued and nothing being evaluated (tests wait for it)."""
        with self._cond:
            return not self._pending and not self._busy

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                keys, self._pending = self._pending, set()
                self._busy = bool(keys)
                stopping = self._stopping
            try:
                self.evaluate(keys)
            except Exception:
                log.exception("evaluating usage alerts failed; will try again")
                self.enqueue(keys)
                time.sleep(1.0)
            finally:
                with self._cond:
                    self._busy = False
            if stopping:
                return

    def evaluate(self, keys: Iterable[Key]) -> list[Alert]:
        """Make the alerts ``keys`` call for now, with their deliveries; the alerts made."""
        now = self.clock()
        levels = self._product_levels()
        made: list[Alert] = []
        for key in sorted(keys):
            if not levels.get(key[0]):
                continue  # alerts are off for the product: nothing to read
            with self.db.session() as session:
                found = crossings(session, key, levels[key[0]], now)
            for crossing in found:
                with self.db.writer() as session, session.begin():
                    alert = record(session, crossing, now)
                    if alert is not None:
                        _deliveries.plan(session, alert, self.settings, now)
                        made.append(alert)
        if made:
            for alert in made:
                log.info(
                    "alert: %s %s %s per %s at %d%% (%d of %d)",
                    alert.product,
                    alert.application,
                    alert.metric,
                    alert.period,
                    alert.level,
                    alert.usage,
                    alert.limit,
                )
            self.deliveries.wake()
        return made

    def _product_levels(self) -> dict[str, tuple[int, ...]]:
        now = time.monotonic()
        if now - self._levels_read >= _LEVELS_TTL:
            with self.db.session() as session:
                rows = session.execute(
                    select(Product.name, AlertLevels.levels).join(
                        AlertLevels, AlertLevels.product_id == Product.id
                    )
                ).all()
            self._levels = {name: tuple(levels) for name, levels in rows if levels}
            self._levels_read = now
        return self._levels

    def levels_changed(self) -> None:
        """A product's levels were set: read them again on the next evaluation."""
        self._levels_read = -_LEVELS_TTL


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)
