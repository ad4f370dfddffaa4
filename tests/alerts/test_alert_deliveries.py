"""Alerts reach webhooks (signed, retried with backoff, every attempt logged, resumed after
a restart) and mailboxes through a real SMTP server, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import hmac
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from alert_support import Subscription, smtp_server, subscribe, use, webhook_receiver
from harness import within
from sqlalchemy import select

from meshgate.analytics._mail import SmtpSettings
from meshgate.analytics.alert_models import Delivery, DeliveryAttempt, Webhook
from meshgate.analytics.alerts import AlertService, AlertSettings
from meshgate.control._db import Database

FAST = AlertSettings(retry_base=0.05, retry_cap=0.2, max_attempts=4, send_timeout=1.0)


def _hook(db: Database, url: str, secret: str = "whsec_test", **fields: object) -> int:
    with db.writer() as session, session.begin():
        row = Webhook(url=url, secret=secret, events=["alert", "violation"], **fields)
        session.add(row)
        session.flush()
        return row.id


def _log(db: Database) -> list[tuple[str, int, list[tuple[int | None, str | None]]]]:
    with db.session() as session:
        out = []
        for delivery in session.scalars(select(Delivery).order_by(Delivery.created_at)):
            attempts = session.execute(
                select(DeliveryAttempt.status_code, DeliveryAttempt.error)
                .where(DeliveryAttempt.delivery_id == delivery.id)
                .order_by(DeliveryAttempt.id)
            ).all()
            out.append((delivery.state, delivery.attempts, [tuple(a) for a in attempts]))
        return out  # type: ignore[return-value]


@contextmanager
def running(db: Database, settings: AlertSettings) -> Iterator[AlertService]:
    service = AlertService(db, settings)
    service.start_workers()
    try:
        yield service
    finally:
        service.stop_workers()


def _alert(db: Database, service: AlertService, sub: Subscription, used: int = 100) -> None:
    use(db, sub, used, time.time())
    service.enqueue([sub.key])


def test_a_webhook_that_fails_twice_gets_the_third_try_signed(db: Database) -> None:
    sub = subscribe(db, {"day": 100}, levels=[50, 100])
    with webhook_receiver([500, 503]) as receiver, running(db, FAST) as service:
        _hook(db, receiver.url)
        _alert(db, service, sub)
        within(10, lambda: _log(db) and _log(db)[0][0] == "delivered", "delivered")
    assert len(receiver.requests) == 3
    [(state, attempts, log)] = _log(db)
    assert (state, attempts) == ("delivered", 3)
    assert log == [(500, "answered 500"), (503, "answered 503"), (200, None)]
    first, _, third = receiver.requests
    # The same delivery each time, signed anew with its own timestamp.
    assert first.body == third.body
    assert first.headers["X-Meshgate-Delivery"] == third.headers["X-Meshgate-Delivery"]
    headers = third.headers
    expected = hmac.new(
        b"whsec_test",
        headers["X-Meshgate-Timestamp"].encode() + b"." + third.body,
        hashlib.sha256,
    ).hexdigest()
    assert headers["X-Meshgate-Signature"] == f"sha256={expected}"
    assert headers["X-Meshgate-Event"] == "violation"
    assert headers["Content-Type"] == "application/json"
    assert abs(int(headers["X-Meshgate-Timestamp"]) - time.time()) < 30
    [document] = receiver.documents()[2:]
    assert document["event"] == "violation"
    assert document["id"] == headers["X-Meshgate-Delivery"]
    assert document["alert"]["application"] == sub.app_id
    assert document["alert"]["level"] == 100
    assert document["alert"]["violation"] is True
    assert (document["alert"]["usage"], document["alert"]["limit"]) == (100, 100)
    # A different secret does not verify.
    wrong = hmac.new(b"whsec_other", third.body, hashlib.sha256).hexdigest()
    assert headers["X-Meshgate-Signature"] != f"sha256={wrong}"


def test_a_webhook_that_never_answers_2xx_is_given_up_after_the_last_attempt(
    db: Database,
) -> None:
    sub = subscribe(db, {"day": 100}, levels=[50])
    with webhook_receiver([500] * 10 + [302]) as receiver, running(db, FAST) as service:
        _hook(db, receiver.url)
        _alert(db, service, sub, 60)
        within(10, lambda: _log(db) and _log(db)[0][0] == "failed", "given up")
        time.sleep(0.4)  # no attempt after giving up
    assert len(receiver.requests) == FAST.max_attempts
    [(state, attempts, log)] = _log(db)
    assert (state, attempts, len(log)) == ("failed", 4, 4)


def test_a_refused_or_silent_receiver_is_logged_with_its_error(db: Database) -> None:
    sub = subscribe(db, {"day": 100}, levels=[50])
    # A port nothing listens on, and a listener that accepts and never answers.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused_port = closed.getsockname()[1]
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    settings = AlertSettings(retry_base=10, max_attempts=3, send_timeout=0.5)
    try:
        with running(db, settings) as service:
            _hook(db, f"http://127.0.0.1:{refused_port}/")
            _hook(db, f"http://127.0.0.1:{silent.getsockname()[1]}/")
            started = time.monotonic()
            _alert(db, service, sub, 60)
            within(10, lambda: all(len(log) == 1 for _, _, log in _log(db) or [(0, 0, [])]), "1")
            assert time.monotonic() - started < 5
    finally:
        silent.close()
    errors = sorted(log[0][1] or "" for _, _, log in _log(db))
    assert [state for state, _, _ in _log(db)] == ["pending", "pending"]
    assert "refused" in errors[0].lower(), errors
    assert errors[1] == "timed out", errors


def test_pending_deliveries_resume_after_a_restart(db: Database) -> None:
    sub = subscribe(db, {"day": 100}, levels=[50])
    slow = AlertSettings(retry_base=1.0, max_attempts=5, send_timeout=1.0)
    with webhook_receiver([500]) as receiver:
        with running(db, slow) as service:
            _hook(db, receiver.url)
            _alert(db, service, sub, 60)
            within(10, lambda: len(receiver.requests) == 1, "first attempt")
            within(5, lambda: _log(db)[0][2] != [], "first attempt logged")
        # Stopped with the retry a second away: a new process sends it.
        assert _log(db)[0][0] == "pending"
        with running(Database(db.url), slow):
            within(10, lambda: _log(db)[0][0] == "delivered", "delivered after restart")
    assert len(receiver.requests) == 2
    assert receiver.requests[0].body == receiver.requests[1].body


def test_two_workers_send_each_delivery_once(db: Database) -> None:
    subs = [subscribe(db, {"day": 100}, levels=[50]) for _ in range(5)]
    with webhook_receiver() as receiver:
        _hook(db, receiver.url)
        first = AlertService(db, FAST)
        for sub in subs:
            use(db, sub, 60, time.time())
        first.evaluate([sub.key for sub in subs])
        # Two control planes' delivery workers find the same five due deliveries.
        services = [AlertService(Database(db.url), FAST) for _ in range(2)]
        barrier = threading.Barrier(2)

        def start(service: AlertService) -> None:
            barrier.wait()
            service.start_workers()

        threads = [threading.Thread(target=start, args=(s,)) for s in services]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        try:
            within(10, lambda: [s for s, _, _ in _log(db)] == ["delivered"] * 5, "delivered")
            time.sleep(0.3)
        finally:
            for service in services:
                service.stop_workers()
    assert len(receiver.requests) == 5
    assert len({r.headers["X-Meshgate-Delivery"] for r in receiver.requests}) == 5


def test_the_account_and_the_operator_receive_the_mail(db: Database) -> None:
    sub = subscribe(db, {"month": 1000}, levels=[80, 100], email="dev@acme.test")
    with smtp_server() as box:
        settings = AlertSettings(
            smtp=SmtpSettings.from_url(box.url),
            operator_email="ops@meshgate.test",
            retry_base=0.05,
            send_timeout=2.0,
        )
        with running(db, settings) as service:
            _alert(db, service, sub, 850)
            within(10, lambda: len(box.messages) == 2, "two messages")
            within(5, lambda: [s for s, _, _ in _log(db)] == ["delivered"] * 2, "logged")
    recipients = sorted(rcpt for rcpt, _ in box.messages)
    assert recipients == [["dev@acme.test"], ["ops@meshgate.test"]]
    for rcpt, message in box.messages:
        assert message["To"] == rcpt[0]
        assert message["From"] == "alerts@meshgate.test"
        assert message["Subject"] == f"[meshgate] Usage alert: {sub.app_id}: hits per month at 80%"
        text = message.get_content()
        assert f"Application {sub.app_id} of product {sub.product} has used 850" in text
        assert "limit of 1000 hits" in text


def test_mail_is_retried_until_the_smtp_server_is_up(db: Database) -> None:
    sub = subscribe(db, {"day": 10}, levels=[100], email=None)
    with smtp_server() as box:
        port = box.port
    settings = AlertSettings(
        smtp=SmtpSettings("127.0.0.1", port, "alerts@meshgate.test"),
        operator_email="ops@meshgate.test",
        retry_base=0.2,
        retry_cap=0.2,
        max_attempts=50,
        send_timeout=1.0,
    )
    with running(db, settings) as service:
        _alert(db, service, sub, 12)
        within(10, lambda: _log(db) and len(_log(db)[0][2]) >= 2, "two failed attempts")
        # The server comes up on the same port: the next attempt gets through.
        from aiosmtpd.controller import Controller

        received: list[str] = []

        class Handler:
            async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
                received.append(envelope.content.decode())  # type: ignore[attr-defined]
                return "250 OK"

        controller = Controller(Handler(), hostname="127.0.0.1", port=port)
        controller.start()
        try:
            within(10, lambda: _log(db)[0][0] == "delivered", "delivered")
        finally:
            controller.stop()
    [(state, _, log)] = _log(db)
    assert log[0][0] is None and log[0][1]
    assert log[-1] == (250, None)
    assert len(received) == 1 and "Subject: [meshgate] Limit violation:" in received[0]


def test_a_deleted_or_disabled_webhook_is_not_called_again(db: Database) -> None:
    from sqlalchemy import delete, update

    subs = [subscribe(db, {"day": 100}, levels=[50]) for _ in range(2)]
    settings = AlertSettings(retry_base=0.3, max_attempts=5, send_timeout=1.0)
    with webhook_receiver([500] * 20) as gone, webhook_receiver([500] * 20) as off:
        with running(db, settings) as service:
            gone_id = _hook(db, gone.url, account_id=subs[0].account_id)
            off_id = _hook(db, off.url, account_id=subs[1].account_id)
            for sub in subs:
                _alert(db, service, sub, 60)
            within(5, lambda: len(gone.requests) == 1 and len(off.requests) == 1, "first tries")
            with db.writer() as session, session.begin():
                session.execute(delete(Webhook).where(Webhook.id == gone_id))
                session.execute(update(Webhook).where(Webhook.id == off_id).values(enabled=False))
            within(5, lambda: [s for s, _, _ in _log(db)] == ["failed"], "the disabled one failed")
            time.sleep(0.5)
    assert (len(gone.requests), len(off.requests)) == (1, 1)
    [(_, _, log)] = _log(db)
    assert log[-1] == (None, "the webhook is disabled")


def test_a_receiver_that_trickles_its_answer_is_cut_off_at_the_deadline() -> None:
    from meshgate.analytics._webhooks import post

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            # A header line every 0.2 s: each read is quick, the whole answer never ends.
            while not stop.is_set():
                try:
                    conn.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    return
                time.sleep(0.2)

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        started = time.monotonic()
        outcome = post(f"http://127.0.0.1:{port}/hook", "s", "alert", "d-1", b"{}", timeout=1.0)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join(5)
        listener.close()
    assert not outcome.delivered and outcome.error == "timed out", outcome
    assert elapsed < 2.0, elapsed
