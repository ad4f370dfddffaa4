"""Helpers for the alerts' tests: a subscription written straight into the store, usage in
the roll-ups as ingest writes it, a clock tests move, and receivers on loopback."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sqlalchemy import select

from meshgate.analytics.alert_models import AlertLevels
from meshgate.analytics.models import UsageRollup
from meshgate.control._db import Database
from meshgate.control.models import Account, Application, Limit, Metric, Plan, Product

# 2030-06-10 00:00:00 UTC, a Monday.
DAY0 = 1_907_107_200.0


class Clock:
    """The time an evaluation sees; tests move it."""

    def __init__(self, now: float = DAY0 + 3600) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Subscription:
    product: str
    app_id: str
    metric: str
    account_id: int
    product_id: int

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.product, self.app_id, self.metric)


def subscribe(
    db: Database,
    limits: dict[str, int],
    levels: list[int] | None = None,
    email: str | None = "dev@example.com",
) -> Subscription:
    """A product with the hits metric, a plan with ``limits`` (period: value) on it, an
    account and an application, and the product's alert levels."""
    tag = uuid.uuid4().hex[:8]
    with db.writer() as session, session.begin():
        product = Product(name=f"p-{tag}", auth={"type": "api_key"}, key_salt=tag)
        account = Account(name=f"acme-{tag}", email=email)
        session.add_all([product, account])
        session.flush()
        metric = Metric(product_id=product.id, name="hits")
        plan = Plan(product_id=product.id, name="basic", state="published")
        session.add_all([metric, plan])
        session.flush()
        for period, value in limits.items():
            session.add(Limit(plan_id=plan.id, metric_id=metric.id, period=period, value=value))
        session.add(
            Application(
                account_id=account.id,
                plan_id=plan.id,
                product_id=product.id,
                name="app",
                app_id=f"app-{tag}",
            )
        )
        if levels is not None:
            session.add(AlertLevels(product_id=product.id, levels=levels))
    return Subscription(product.name, f"app-{tag}", "hits", account.id, product.id)


def _starts(at: float) -> dict[str, int]:
    t = int(at)
    day = datetime.fromtimestamp(t, UTC)
    month = int(datetime(day.year, day.month, 1, tzinfo=UTC).timestamp())
    return {"minute": t - t % 60, "hour": t - t % 3600, "day": t - t % 86400, "month": month}


def use(db: Database, sub: Subscription, value: int, at: float) -> None:
    """Add ``value`` to the application's usage at ``at``, in every granularity."""
    with db.writer() as session, session.begin():
        for granularity, start in _starts(at).items():
            row = session.scalars(
                select(UsageRollup).where(
                    UsageRollup.granularity == granularity,
                    UsageRollup.product == sub.product,
                    UsageRollup.start == start,
                    UsageRollup.application == sub.app_id,
                    UsageRollup.metric == sub.metric,
                )
            ).first()
            if row is None:
                session.add(
                    UsageRollup(
                        granularity=granularity,
                        product=sub.product,
                        start=start,
                        application=sub.app_id,
                        metric=sub.metric,
                        account_id=sub.account_id,
                        value=value,
                    )
                )
            else:
                row.value += value


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A webhook receiver on loopback answering from ``statuses`` (then 200)."""

    url: str
    statuses: list[int]
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def documents(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(r.body) for r in self.requests]


@contextmanager
def webhook_receiver(statuses: list[int] | None = None, path: str = "/hook") -> Iterator[Receiver]:
    receiver = Receiver("", list(statuses or []))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            with receiver.lock:
                receiver.requests.append(Received(dict(self.headers.items()), body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
            payload = b"x" * 100_000 if status >= 500 else b"ok"
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}{path}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Mailbox:
    """What a real SMTP server on loopback received."""

    host: str
    port: int
    messages: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}?from=alerts@meshgate.test"


@contextmanager
def smtp_server() -> Iterator[Mailbox]:
    """aiosmtpd on a free loopback port; each message parsed as the mail client would."""
    from email import message_from_bytes, policy

    from aiosmtpd.controller import Controller
    from harness import free_port

    box = Mailbox("127.0.0.1", free_port())

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            message = message_from_bytes(envelope.content, policy=policy.default)
            box.messages.append((list(envelope.rcpt_tos), message))
            return "250 OK"

    controller = Controller(Handler(), hostname=box.host, port=box.port)
    controller.start()
    try:
        yield box
    finally:
        controller.stop()
