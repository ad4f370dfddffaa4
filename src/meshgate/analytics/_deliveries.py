"""The alerts' outbox: deliveries planned with the alert, sent by a worker, retried with
backoff, every attempt logged.

A delivery is claimed by moving its ``next_at`` past the send's lease in a conditional
update, so one replica sends it; one whose sender died is sent again when the lease ends
(at least once: receivers drop repeats by X-Meshgate-Delivery).
"""

from __future__ import annotations

import json
import logging
import smtplib
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from meshgate.analytics import _mail, _webhooks
from meshgate.analytics.alert_models import Alert, Delivery, DeliveryAttempt, Webhook
from meshgate.control._db import Database
from meshgate.control.models import Account

if TYPE_CHECKING:
    from meshgate.analytics.alerts import AlertSettings

__all__ = ["DeliveryWorker", "alert_document", "plan"]

log = logging.getLogger("meshgate.alerts")

# A claimed delivery not settled this long after its send began is sent again.
_LEASE_EXTRA = 30.0
# The worker looks for due deliveries at least this often (others' and retries').
_POLL = 1.0


def alert_document(alert: Alert) -> dict[str, Any]:
    """The alert as the API and the deliveries show it."""
    return {
        "id": alert.id,
        "at": _utc(alert.at).isoformat().replace("+00:00", "Z"),
        "product": alert.product,
        "application": alert.application,
        "account_id": alert.account_id,
        "metric": alert.metric,
        "period": alert.period,
        "level": alert.level,
        "usage": alert.usage,
        "limit": alert.limit,
        "violation": alert.violation,
        "state": alert.state,
    }


def plan(session: Session, alert: Alert, settings: AlertSettings, now: float) -> int:
    """In the alert's transaction: a delivery for each webhook that takes its event and,
    with SMTP set up, for the account's e-mail and the operator's; how many."""
    event = "violation" if alert.violation else "alert"
    document = alert_document(alert)
    hooks = session.scalars(
        select(Webhook).where(
            Webhook.enabled.is_(True),
            or_(Webhook.account_id.is_(None), Webhook.account_id == alert.account_id),
        )
    ).all()
    targets: list[tuple[str, int | None, str | None]] = [
        ("webhook", hook.id, None) for hook in hooks if event in hook.events
    ]
    if settings.smtp is not None:
        recipients = []
        if alert.account_id is not None:
            account = session.get(Account, alert.account_id)
            if account is not None and account.email:
                recipients.append(account.email)
        if settings.operator_email:
            recipients.append(settings.operator_email)
        targets += [("email", None, to) for to in dict.fromkeys(recipients)]
    at = _utc(now)
    for channel, webhook_id, recipient in targets:
        delivery_id = str(uuid.uuid4())
        body = {"event": event, "id": delivery_id, "at": document["at"], "alert": document}
        session.add(
            Delivery(
                id=delivery_id,
                alert_id=alert.id,
                channel=channel,
                webhook_id=webhook_id,
                recipient=recipient,
                event=event,
                body=json.dumps(body, separators=(",", ":")),
                created_at=at,
                state="pending",
                attempts=0,
                next_at=at,
            )
        )
    return len(targets)


@dataclass(frozen=True)
class _Claimed:
    id: str
    channel: str
    event: str
    body: str
    attempts: int
    recipient: str | None
    url: str | None
    secret: str | None
    enabled: bool


class DeliveryWorker:
    """Sends due deliveries on a few threads; wakes when alerts are made, else polls."""

    def __init__(
        self, db: Database, settings: AlertSettings, clock: Callable[[], float] = time.time
    ) -> None:
        self.db = db
        self.settings = settings
        self.clock = clock
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        self._stopping = False
        self._pool = ThreadPoolExecutor(self.settings.senders, thread_name_prefix="meshgate-send")
        self._thread = threading.Thread(target=self._run, name="meshgate-deliveries", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def busy(self) -> bool:
        with self._lock:
            return self._in_flight > 0

    def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            wait = _POLL
            try:
                self.send_due()
                wait = self._until_due()
            except Exception:
                log.exception("reading the alert deliveries failed; will try again")
            self._wake.wait(wait)

    def _until_due(self) -> float:
        """Seconds until the next pending delivery is due, at most the polling interval."""
        with self.db.session() as session:
            due = session.scalar(
                select(func.min(Delivery.next_at)).where(Delivery.state == "pending")
            )
        if due is None:
            return _POLL
        return min(_POLL, max(0.005, _utc(due).timestamp() - self.clock()))

    def send_due(self) -> int:
        """Claim what is due, as many as the senders have room for, and send it."""
        assert self._pool is not None
        with self._lock:
            room = self.settings.senders * 2 - self._in_flight
        if room <= 0:
            return 0
        claimed = self.claim(room)
        for item in claimed:
            with self._lock:
                self._in_flight += 1
            self._pool.submit(self._send, item)
        return len(claimed)

    def claim(self, limit: int) -> list[_Claimed]:
        now = self.clock()
        lease = _utc(now + self.settings.send_timeout + _LEASE_EXTRA)
        claimed = []
        with self.db.writer() as session, session.begin():
            due = session.execute(
                select(
                    Delivery.id,
                    Delivery.channel,
                    Delivery.event,
                    Delivery.body,
                    Delivery.attempts,
                    Delivery.recipient,
                    Delivery.next_at,
                    Webhook.url,
                    Webhook.secret,
                    Webhook.enabled,
                )
                .outerjoin(Webhook, Webhook.id == Delivery.webhook_id)
                .where(Delivery.state == "pending", Delivery.next_at <= _utc(now))
                .order_by(Delivery.next_at)
                .limit(limit)
            ).all()
            for row in due:
                taken = session.execute(
                    update(Delivery)
                    .where(
                        Delivery.id == row.id,
                        Delivery.state == "pending",
                        Delivery.next_at == row.next_at,
                    )
                    .values(next_at=lease, attempts=Delivery.attempts + 1)
                    .execution_options(synchronize_session=False)
                )
                if taken.rowcount == 1:  # type: ignore[attr-defined]
                    claimed.append(
                        _Claimed(
                            row.id,
                            row.channel,
                            row.event,
                            row.body,
                            row.attempts + 1,
                            row.recipient,
                            row.url,
                            row.secret,
                            bool(row.enabled) if row.channel == "webhook" else True,
                        )
                    )
        return claimed

    def _send(self, item: _Claimed) -> None:
        try:
            outcome = self.attempt(item)
            self.settle(item, outcome)
        except Exception:
            log.exception("delivery %s failed unexpectedly; will try again", item.id)
        finally:
            with self._lock:
                self._in_flight -= 1
            self._wake.set()

    def attempt(self, item: _Claimed) -> _webhooks.Outcome:
        if item.channel == "webhook":
            if not item.enabled or item.url is None or item.secret is None:
                return _webhooks.Outcome(None, "the webhook is disabled", 0.0)
            return _webhooks.post(
                item.url,
                item.secret,
                item.event,
                item.id,
                item.body.encode(),
                self.settings.send_timeout,
                self.clock(),
            )
        return self._mail(item)

    def _mail(self, item: _Claimed) -> _webhooks.Outcome:
        smtp = self.settings.smtp
        if smtp is None or item.recipient is None:
            return _webhooks.Outcome(None, "SMTP is not set up", 0.0)
        started = time.monotonic()
        subject, text = _mail_text(json.loads(item.body))
        try:
            _mail.send(smtp, item.recipient, subject, text, self.settings.send_timeout)
        except (OSError, smtplib.SMTPException) as exc:
            reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            return _webhooks.Outcome(None, reason, _since(started))
        # 250: what the server answered the message with (SMTP's 2xx, as a webhook's).
        return _webhooks.Outcome(250, None, _since(started))

    def settle(self, item: _Claimed, outcome: _webhooks.Outcome) -> None:
        now = self.clock()
        if outcome.delivered:
            state, next_at = "delivered", now
        elif item.attempts >= self.settings.max_attempts or not item.enabled:
            state, next_at = "failed", now
        else:
            state, next_at = "pending", now + self.settings.backoff(item.attempts)
        with self.db.writer() as session, session.begin():
            kept = session.execute(
                update(Delivery)
                .where(Delivery.id == item.id)
                .values(state=state, next_at=_utc(next_at))
                .execution_options(synchronize_session=False)
            )
            if kept.rowcount == 0:  # type: ignore[attr-defined]
                return  # its alert or webhook was deleted meanwhile, and the log with it
            session.add(
                DeliveryAttempt(
                    delivery_id=item.id,
                    at=_utc(now),
                    status_code=outcome.status_code,
                    error=outcome.error,
                    duration_ms=outcome.duration_ms,
                )
            )
        if state == "failed":
            log.warning(
                "alert delivery %s (%s) gave up after %d attempts: %s",
                item.id,
                item.channel,
                item.attempts,
                outcome.error,
            )


def _mail_text(document: dict[str, Any]) -> tuple[str, str]:
    alert = document["alert"]
    what = f"{alert['application']}: {alert['metric']} per {alert['period']}"
    if alert["violation"]:
        subject = f"[meshgate] Limit violation: {what} at {alert['level']}%"
    else:
        subject = f"[meshgate] Usage alert: {what} at {alert['level']}%"
    lines = [
        f"Application {alert['application']} of product {alert['product']} has used "
        f"{alert['usage']} of its {alert['period']} limit of {alert['limit']} "
        f"{alert['metric']} ({alert['level']}% level reached).",
        "",
        f"Alert {alert['id']} at {alert['at']}.",
    ]
    return subject, "\n".join(lines) + "\n"


def _since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


def _utc(value: float | datetime) -> datetime:
    if isinstance(value, datetime):
        # SQLite gives naive datetimes back; everything stored is UTC.
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return datetime.fromtimestamp(value, UTC)
