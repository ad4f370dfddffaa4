"""Alerts are made as 3scale makes them, on SQLite and PostgreSQL: each level once per 24
hours, only the highest crossed, violations from 100 %, one alert however many evaluate."""

from __future__ import annotations

import threading

from alert_support import DAY0, Clock, subscribe, use
from sqlalchemy import select

from meshgate.analytics.alert_models import Alert, Delivery, Webhook
from meshgate.analytics.alerts import AlertService, AlertSettings, level_reached
from meshgate.control._db import Database


def _alerts(db: Database) -> list[tuple[str, str, int, bool, int, int]]:
    with db.session() as session:
        rows = session.scalars(select(Alert).order_by(Alert.id)).all()
        return [(a.application, a.period, a.level, a.violation, a.usage, a.limit) for a in rows]


def test_crossing_50_80_and_100_percent_alerts_each_level_once(db: Database) -> None:
    sub = subscribe(db, {"day": 1000}, levels=[50, 80, 100])
    clock = Clock()
    service = AlertService(db, AlertSettings(), clock)
    made = []
    for used in (300, 250, 100, 150, 150, 50, 10):  # 30, 55, 65, 80, 95, 100, 101 %
        use(db, sub, used, clock.now)
        made.append([a.level for a in service.evaluate([sub.key])])
        clock.now += 60
    assert made == [[], [50], [], [80], [], [100], []]
    assert _alerts(db) == [
        (sub.app_id, "day", 50, False, 550, 1000),
        (sub.app_id, "day", 80, False, 800, 1000),
        (sub.app_id, "day", 100, True, 1000, 1000),
    ]
    # Evaluated again and again within the 24 hours: nothing more.
    assert service.evaluate([sub.key]) == []
    assert len(_alerts(db)) == 3


def test_a_jump_from_40_to_130_percent_makes_only_the_120_alert(db: Database) -> None:
    sub = subscribe(db, {"month": 100}, levels=[50, 80, 90, 100, 120, 150])
    clock = Clock()
    service = AlertService(db, AlertSettings(), clock)
    use(db, sub, 40, clock.now)
    assert service.evaluate([sub.key]) == []
    use(db, sub, 90, clock.now)
    assert [(a.level, a.usage, a.violation) for a in service.evaluate([sub.key])] == [
        (120, 130, True)
    ]
    # Lower levels are not made afterwards either: 120 within 24 h covers them.
    assert service.evaluate([sub.key]) == []
    assert [row[2] for row in _alerts(db)] == [120]


def test_a_new_daily_window_after_24_hours_alerts_again(db: Database) -> None:
    sub = subscribe(db, {"day": 100}, levels=[50, 100])
    clock = Clock(DAY0 + 10 * 3600)
    service = AlertService(db, AlertSettings(), clock)
    use(db, sub, 60, clock.now)
    assert [a.level for a in service.evaluate([sub.key])] == [50]
    # The next day, 15 hours later: a new window, but within 24 hours of the alert.
    clock.now = DAY0 + 86400 + 3600
    use(db, sub, 70, clock.now)
    assert service.evaluate([sub.key]) == []
    # 24 hours after the alert, still the same day: the level alerts again.
    clock.now = DAY0 + 86400 + 10 * 3600 + 1
    assert [(a.level, a.usage) for a in service.evaluate([sub.key])] == [(50, 70)]
    # The same day's higher level is not held back by the lower.
    use(db, sub, 40, clock.now)
    assert [(a.level, a.usage) for a in service.evaluate([sub.key])] == [(100, 110)]


def test_each_limit_of_the_metric_is_its_own_alert(db: Database) -> None:
    sub = subscribe(db, {"minute": 10, "hour": 100, "week": 10_000}, levels=[50, 100, 200])
    clock = Clock()
    service = AlertService(db, AlertSettings(), clock)
    use(db, sub, 60, clock.now)
    made = sorted((a.period, a.level, a.usage, a.limit) for a in service.evaluate([sub.key]))
    assert made == [("hour", 50, 60, 100), ("minute", 200, 60, 10)]


def test_usage_of_a_limit_of_zero_is_a_violation(db: Database) -> None:
    sub = subscribe(db, {"day": 0}, levels=[80, 150])
    clock = Clock()
    service = AlertService(db, AlertSettings(), clock)
    assert service.evaluate([sub.key]) == []  # unused: nothing
    use(db, sub, 1, clock.now)
    assert [(a.level, a.violation, a.limit) for a in service.evaluate([sub.key])] == [
        (150, True, 0)
    ]


def test_no_levels_no_application_no_limit_make_nothing(db: Database) -> None:
    off = subscribe(db, {"day": 10})
    empty = subscribe(db, {"day": 10}, levels=[])
    unlimited = subscribe(db, {}, levels=[50])
    clock = Clock()
    service = AlertService(db, AlertSettings(), clock)
    for sub in (off, empty, unlimited):
        use(db, sub, 100, clock.now)
    keys = [off.key, empty.key, unlimited.key]
    keys += [(off.product, "no-such-app", "hits"), (unlimited.product, unlimited.app_id, "nope")]
    # Another product's application under this product's name: not its limits.
    keys.append((unlimited.product, off.app_id, "hits"))
    assert service.evaluate(keys) == []
    assert _alerts(db) == []


def test_evaluations_of_one_key_at_once_make_one_alert(db: Database) -> None:
    subs = [subscribe(db, {"day": 100}, levels=[50, 100]) for _ in range(3)]
    clock = Clock()
    for sub in subs:
        use(db, sub, 100, clock.now)
    # Two control planes (two workers, each its own connections) given the same batches.
    services = [AlertService(Database(db.url), AlertSettings(), clock) for _ in range(4)]
    barrier = threading.Barrier(len(services))
    errors: list[BaseException] = []

    def evaluate(service: AlertService) -> None:
        try:
            barrier.wait()
            service.evaluate([sub.key for sub in subs])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=evaluate, args=(s,)) for s in services]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for service in services:
        service.db.dispose()
    assert errors == []
    assert sorted(_alerts(db)) == sorted((s.app_id, "day", 100, True, 100, 100) for s in subs)


def test_an_alert_plans_a_delivery_per_webhook_and_mailbox(db: Database) -> None:
    from meshgate.analytics._mail import SmtpSettings

    sub = subscribe(db, {"day": 100}, levels=[50, 100], email="dev@example.com")
    other = subscribe(db, {"day": 100}, levels=[50])
    with db.writer() as session, session.begin():
        session.add_all(
            [
                Webhook(url="http://a/", secret="s", events=["alert", "violation"]),
                Webhook(url="http://b/", secret="s", events=["violation"]),
                Webhook(url="http://c/", secret="s", events=["alert"], enabled=False),
                Webhook(url="http://d/", secret="s", events=["alert"], account_id=sub.account_id),
                Webhook(url="http://e/", secret="s", events=["alert"], account_id=other.account_id),
            ]
        )
    smtp = SmtpSettings("127.0.0.1", 25, "alerts@example.com")
    settings = AlertSettings(smtp=smtp, operator_email="ops@example.com")
    clock = Clock()
    service = AlertService(db, settings, clock)
    use(db, sub, 60, clock.now)
    [alert] = service.evaluate([sub.key])
    with db.session() as session:
        rows = session.execute(
            select(Delivery.channel, Webhook.url, Delivery.recipient, Delivery.event)
            .outerjoin(Webhook, Webhook.id == Delivery.webhook_id)
            .where(Delivery.alert_id == alert.id)
        ).all()
    assert sorted(rows, key=str) == sorted(
        [
            ("webhook", "http://a/", None, "alert"),
            ("webhook", "http://d/", None, "alert"),
            ("email", None, "dev@example.com", "alert"),
            ("email", None, "ops@example.com", "alert"),
        ],
        key=str,
    )


def test_level_reached_is_exact_at_the_boundaries() -> None:
    levels = (50, 80, 90, 100, 120, 150, 200, 300)
    assert level_reached(levels, 49, 100) is None
    assert level_reached(levels, 50, 100) == 50
    assert level_reached(levels, 2, 3) == 50  # 66.7 %
    assert level_reached(levels, 1, 3) is None  # 33.3 %
    assert level_reached(levels, 10**15, 1) == 300
    assert level_reached(levels, 0, 0) is None
    assert level_reached((), 100, 1) is None
