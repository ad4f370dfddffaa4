"""Usage batches into analytics: counted once, exact under concurrency, refused whole when bad;
series, summaries, limits now and CSV out; a usage token reads its own account only."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from control_support import TOKEN, ControlPlane, count_rows, make_product, problem
from sqlalchemy import select, text

from meshgate.analytics.alert_models import Alert
from meshgate.analytics.api import percentile
from meshgate.analytics.retention import apply_retention
from meshgate.control._db import Database

# 2026-11-30 23:59 UTC: its hour, day and month end a minute later.
LAST_MINUTE = int(datetime(2026, 11, 30, 23, 59, tzinfo=UTC).timestamp())
NEXT_MINUTE = LAST_MINUTE + 60


def _register(cp: ControlPlane, name: str = "gw-1") -> dict[str, str]:
    """Headers of a dataplane the control plane knows: it pulled a snapshot once."""
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Meshgate-Dataplane": name}
    httpx.get(f"{cp.url}/dp/v1/snapshot", params={"env": "production"}, headers=headers)
    return headers


def _send(cp: ControlPlane, headers: dict[str, str], batch: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{cp.url}/dp/v1/usage", json=batch, headers=headers, timeout=60)


def _batch(**parts: Any) -> dict[str, Any]:
    return {"id": f"test:{uuid.uuid4()}", **parts}


def _series(cp: ControlPlane, **params: Any) -> dict[str, Any]:
    response = cp.api.get("/analytics/usage", params=params)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_a_batch_counts_once_in_every_granularity(control: ControlPlane) -> None:
    cp = control
    headers = _register(cp)
    batch = _batch(
        usage=[
            ["shop", "app-a", "hits", LAST_MINUTE, 3],
            ["shop", "app-a", "hits", NEXT_MINUTE, 4],
            ["shop", "app-b", "hits", NEXT_MINUTE, 5],
            ["shop", "app-a", "orders", NEXT_MINUTE, 1],
        ],
        responses=[
            ["shop", "app-a", 200, "ok", NEXT_MINUTE, 7],
            ["shop", "app-b", 429, "limited", NEXT_MINUTE, 2],
            ["", "", 401, "unauthenticated", NEXT_MINUTE, 1],
        ],
        latency=[["shop", NEXT_MINUTE, [0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2], 30010.0]],
    )
    first = _send(cp, headers, batch)
    assert first.status_code == 200 and first.json() == {"accepted": True, "duplicate": False}
    again = _send(cp, headers, batch)
    assert again.status_code == 200 and again.json() == {"accepted": True, "duplicate": True}

    since, until = "2026-11-30T23:00:00Z", "2026-12-01T01:00:00Z"
    hourly = _series(cp, product="shop", granularity="hour", since=since, until=until)
    assert [p["value"] for p in hourly["series"]] == [3, 9] and hourly["total"] == 12
    minutes = _series(
        cp, application="app-a", granularity="minute", since=since, until="2026-12-01T00:01:00Z"
    )
    assert minutes["series"][-2:] == [
        {"start": "2026-11-30T23:59:00Z", "value": 3},
        {"start": "2026-12-01T00:00:00Z", "value": 4},
    ]
    monthly = _series(
        cp, product="shop", granularity="month", since="2026-11-01", until="2027-01-01"
    )
    assert [p["value"] for p in monthly["series"]] == [3, 9]
    orders = _series(cp, metric="orders", granularity="day", since="2026-11-30", until="2026-12-02")
    assert [p["value"] for p in orders["series"]] == [0, 1]

    top = cp.api.get(
        "/analytics/top_applications",
        params={"product": "shop", "since": "2026-11-01", "until": "2026-12-31"},
    ).json()["items"]
    assert [(t["application"], t["value"]) for t in top] == [("app-a", 7), ("app-b", 5)]

    codes = cp.api.get(
        "/analytics/responses", params={"since": "2026-12-01", "until": "2026-12-02"}
    ).json()
    assert codes["totals"] == [
        {"status": 200, "reason": "ok", "count": 7},
        {"status": 401, "reason": "unauthenticated", "count": 1},
        {"status": 429, "reason": "limited", "count": 2},
    ]
    assert codes["series"][0]["2xx"] == 7 and codes["series"][0]["4xx"] == 3

    slow = cp.api.get(
        "/analytics/latency",
        params={"product": "shop", "since": "2026-12-01T00:00:00Z", "until": "2026-12-01T01:00"},
    ).json()
    assert slow["count"] == 7 and slow["mean_ms"] == pytest.approx(30010 / 7, abs=0.01)
    assert 1 < slow["p50"] <= 2 and slow["p99"] == 10000.0


def test_concurrent_batches_and_resends_add_up_exactly(control: ControlPlane) -> None:
    cp = control
    headers = _register(cp)
    batches = [
        _batch(
            usage=[
                ["shop", f"app-{i % 5}", "hits", NEXT_MINUTE + 60 * (i % 3), i + 1],
                ["shop", "shared", "hits", NEXT_MINUTE, 1],
            ],
            responses=[["shop", "shared", 200, "ok", NEXT_MINUTE, 1]],
        )
        for i in range(40)
    ]
    failures: list[str] = []

    def send(chunk: list[dict[str, Any]]) -> None:
        for batch in chunk:
            # Every batch twice, from two senders: a resend racing the original.
            response = _send(cp, headers, batch)
            if response.status_code != 200:
                failures.append(response.text)

    threads = [threading.Thread(target=send, args=(batches[i::4],)) for i in range(4)]
    threads += [threading.Thread(target=send, args=(batches[::-1][i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    day = _series(cp, product="shop", granularity="day", since="2026-12-01", until="2026-12-02")
    assert day["total"] == sum(range(1, 41)) + 40
    shared = _series(
        cp, application="shared", granularity="hour", since="2026-12-01", until="2026-12-01T01:00"
    )
    assert shared["total"] == 40
    assert count_rows(cp.database_url, "usage_batches") == 40


def test_bad_batches_are_refused_whole(control: ControlPlane) -> None:
    cp = control
    headers = _register(cp)
    url = f"{cp.url}/dp/v1/usage"
    good_row = ["shop", "app-a", "hits", NEXT_MINUTE, 1]

    assert httpx.post(url, json=_batch(usage=[good_row])).status_code == 401
    wrong = {**headers, "Authorization": "Bearer mgt_nope"}
    assert httpx.post(url, json=_batch(usage=[good_row]), headers=wrong).status_code == 401
    stranger = {**headers, "X-Meshgate-Dataplane": "never-seen"}
    assert "unknown" in problem(_send(cp, stranger, _batch(usage=[good_row])), 403)["detail"]
    anonymous = {k: v for k, v in headers.items() if k != "X-Meshgate-Dataplane"}
    problem(_send(cp, anonymous, _batch(usage=[good_row])), 422)

    for bad in (
        b"{not json",
        b"[]",
        json.dumps({"id": "x", "usage": [good_row]}).encode(),  # id too short
        json.dumps(
            _batch(usage=[good_row, ["shop", "app-a", "hits", NEXT_MINUTE + 1, 1]])
        ).encode(),
        json.dumps(_batch(usage=[good_row, ["shop", "app-a", "hits", 60, 1]])).encode(),
        json.dumps(_batch(usage=[good_row, ["shop", "app-a", "hits", NEXT_MINUTE, -5]])).encode(),
        json.dumps(
            _batch(usage=[good_row, ["shop", "app-a", "bad metric!", NEXT_MINUTE, 1]])
        ).encode(),
        json.dumps(_batch(usage=[good_row, ["shop", "a\x00b", "hits", NEXT_MINUTE, 1]])).encode(),
        json.dumps(_batch(responses=[["shop", "a", 200, "why-not", NEXT_MINUTE, 1]])).encode(),
        json.dumps(_batch(latency=[["shop", NEXT_MINUTE, [1, 2], 3.0]])).encode(),
        json.dumps(_batch(usage=[good_row], extra=1)).encode(),
        json.dumps(_batch(usage=[good_row] * 200_001)).encode(),
        # Each row within bounds, their sum in one window beyond what a roll-up holds.
        json.dumps(
            _batch(usage=[["shop", "app-a", "hits", NEXT_MINUTE, 10**15]] * 10_000)
        ).encode(),
        json.dumps(_batch(latency=[["shop", NEXT_MINUTE, [1] + [0] * 13, 1e18]] * 10)).encode(),
    ):
        response = httpx.post(
            url, content=bad, headers={**headers, "Content-Type": "application/json"}, timeout=60
        )
        # Malformed JSON is 400, a batch that parses but does not hold 422.
        expected = 400 if bad == b"{not json" else 422
        assert response.status_code == expected, (bad[:80], response.status_code, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
    huge = b'{"id": "oversized-1", "usage": [' + b" " * (33 * 2**20) + b"]}"
    assert httpx.post(url, content=huge, headers=headers, timeout=60).status_code == 413
    assert count_rows(cp.database_url, "usage_rollups") == 0
    assert count_rows(cp.database_url, "usage_batches") == 0


def test_series_ranges_are_checked(control_sqlite: ControlPlane) -> None:
    cp = control_sqlite
    reversed_range = cp.api.get(
        "/analytics/usage", params={"since": "2026-12-02", "until": "2026-12-01"}
    )
    problem(reversed_range, 422, "query.since")
    huge = cp.api.get(
        "/analytics/usage",
        params={"granularity": "minute", "since": "2020-01-01", "until": "2026-01-01"},
    )
    assert "at most 10000" in problem(huge, 422)["detail"]
    for params in (
        {"granularity": "week"},
        {"since": "yesterday"},
        {"until": "9999-99-99"},
        {"metric": "x" * 201},
        {"format": "xml"},
    ):
        problem(cp.api.get("/analytics/usage", params=params), 422)
    assert cp.api.get("/analytics/top_applications", params={"limit": 0}).status_code == 422
    # Ranges whose windows (or default since) would fall outside the calendar.
    for params in (
        {"granularity": "month", "until": "9999-12-31T00:00:00Z"},
        {"granularity": "day", "until": "0001-01-01T00:00:00Z"},
        {"granularity": "day", "since": "0001-01-01T00:00:00Z", "until": "0001-01-02T00:00:00Z"},
    ):
        for path in ("usage", "top_applications", "responses", "latency"):
            problem(cp.api.get(f"/analytics/{path}", params=params), 422)


def test_csv_export(control_sqlite: ControlPlane) -> None:
    cp = control_sqlite
    headers = _register(cp)
    batch = _batch(
        usage=[
            ["shop", "=cmd|' /C calc'!A0", "hits", NEXT_MINUTE, 2],
            ["shop", "\t=cmd|' /C calc'!A0", "hits", NEXT_MINUTE, 1],
        ]
    )
    assert _send(cp, headers, batch).status_code == 200
    response = cp.api.get(
        "/analytics/usage",
        params={
            "granularity": "hour",
            "since": "2026-12-01",
            "until": "2026-12-01T03:00",
            "format": "csv",
        },
    )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(response.text)))
    assert rows == [
        ["start", "value"],
        ["2026-12-01T00:00:00Z", "3"],
        ["2026-12-01T01:00:00Z", "0"],
        ["2026-12-01T02:00:00Z", "0"],
    ]
    top = cp.api.get(
        "/analytics/top_applications",
        params={"since": "2026-12-01", "until": "2026-12-02", "format": "csv"},
    )
    firsts = [row[0] for row in list(csv.reader(io.StringIO(top.text)))[1:]]
    # A cell a spreadsheet would run as a formula is quoted.
    assert firsts == ["'=cmd|' /C calc'!A0", "'\t=cmd|' /C calc'!A0"]


def _subscribed(cp: ControlPlane) -> dict[str, Any]:
    name = f"lim-{uuid.uuid4().hex[:6]}"
    product = make_product(cp, name=name, path_prefix=f"/{name}")
    hits = next(m for m in cp.api.get(f"/products/{product['id']}/metrics").json()["items"])
    plan = cp.post(f"/products/{product['id']}/plans", {"name": "basic", "state": "published"})
    cp.post(f"/plans/{plan['id']}/limits", {"metric_id": hits["id"], "period": "day", "value": 10})
    cp.post(
        f"/plans/{plan['id']}/limits",
        {"metric_id": hits["id"], "period": "eternity", "value": 1000},
    )
    accounts, apps = [], []
    for who in ("a", "b"):
        account = cp.post("/accounts", {"name": f"{name}-{who}"})
        app = cp.post(
            "/applications", {"account_id": account["id"], "plan_id": plan["id"], "name": who}
        )
        accounts.append(account)
        apps.append(app)
    return {"product": product, "accounts": accounts, "apps": apps}


def test_usage_against_limits_and_the_usage_token(control_sqlite: ControlPlane) -> None:
    cp = control_sqlite
    made = _subscribed(cp)
    product = made["product"]["name"]
    app_a, app_b = (a["app_id"] for a in made["apps"])
    now = int(time.time()) // 60 * 60
    headers = _register(cp)
    batch = _batch(
        usage=[[product, app_a, "hits", now, 4], [product, app_b, "hits", now, 9]],
        responses=[[product, app_a, 200, "ok", now, 4]],
    )
    assert _send(cp, headers, batch).status_code == 200

    limits = cp.api.get(f"/analytics/applications/{app_a}/limits").json()
    by_period = {item["period"]: item for item in limits["limits"]}
    assert by_period["day"]["usage"] == 4 and by_period["day"]["percent"] == 40.0
    assert by_period["day"]["remaining"] == 6 and by_period["eternity"]["usage"] == 4
    problem(cp.api.get("/analytics/applications/no-such-app/limits"), 404)

    account_a = made["accounts"][0]["id"]
    token = cp.post(f"/analytics/accounts/{account_a}/tokens")["token"]
    own = httpx.Client(base_url=f"{cp.url}/admin/api", headers={"Authorization": f"Bearer {token}"})
    assert own.get(f"/analytics/applications/{app_a}/limits").status_code == 200
    problem(own.get(f"/analytics/applications/{app_b}/limits"), 404)
    mine = own.get("/analytics/usage", params={"granularity": "minute"}).json()
    assert mine["total"] == 4  # account a's only, though no account was asked for
    problem(own.get("/analytics/usage", params={"account_id": made["accounts"][1]["id"]}), 404)
    problem(own.get("/analytics/usage", params={"application": app_b}), 404)
    assert own.get("/analytics/responses", params={"application": app_a}).status_code == 200
    problem(own.get("/analytics/responses"), 403)
    problem(own.get("/analytics/latency"), 403)
    problem(own.get("/products"), 403)
    problem(own.post(f"/analytics/accounts/{account_a}/tokens"), 403)
    top = own.get("/analytics/top_applications", params={"granularity": "minute"}).json()
    assert [t["application"] for t in top["items"]] == [app_a]
    problem(cp.api.post("/analytics/accounts/2147483647/tokens"), 404)


def test_a_deleted_accounts_usage_token_reads_nothing_of_an_account_made_after(
    control: ControlPlane,
) -> None:
    cp = control
    made = _subscribed(cp)
    product = made["product"]["name"]
    # The newest account: SQLite gives its id to the next account made after its deletion.
    last = cp.post("/accounts", {"name": f"last-{uuid.uuid4().hex[:6]}"})
    app = cp.post(
        "/applications",
        {"account_id": last["id"], "plan_id": made["apps"][0]["plan_id"], "name": "old"},
    )
    now = int(time.time()) // 60 * 60
    headers = _register(cp)
    batch = _batch(usage=[[product, app["app_id"], "hits", now, 7]])
    assert _send(cp, headers, batch).status_code == 200
    token = cp.post(f"/analytics/accounts/{last['id']}/tokens")["token"]
    old = httpx.Client(base_url=f"{cp.url}/admin/api", headers={"Authorization": f"Bearer {token}"})
    assert old.get("/analytics/usage", params={"granularity": "minute"}).json()["total"] == 7

    assert cp.api.delete(f"/accounts/{last['id']}").status_code == 204
    # Its token went with it, at once (though the token cache trusts a token 5 s).
    problem(old.get("/analytics/usage", params={"granularity": "minute"}), 401)
    names = [t["name"] for t in cp.api.get("/tokens").json()]
    assert not any(n.startswith(f"usage-account-{last['id']}-") for n in names)
    newer = cp.post("/accounts", {"name": f"newer-{uuid.uuid4().hex[:6]}"})
    token = cp.post(f"/analytics/accounts/{newer['id']}/tokens")["token"]
    new = httpx.Client(base_url=f"{cp.url}/admin/api", headers={"Authorization": f"Bearer {token}"})
    assert new.get("/analytics/usage", params={"granularity": "minute"}).json()["total"] == 0
    top = new.get("/analytics/top_applications", params={"granularity": "minute"}).json()
    assert top["items"] == []
    # The usage itself is kept, for the operator.
    assert _series(cp, granularity="minute", product=product)["total"] == 7


def test_retention_keeps_each_granularity_its_time(tmp_path: Any) -> None:
    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    db.migrate()
    now = NEXT_MINUTE + 400 * 86400
    rows = [
        ("minute", now - 3 * 86400),
        ("minute", now - 86400),
        ("hour", now - 91 * 86400),
        ("hour", now - 89 * 86400),
        ("day", now - 367 * 86400),
        ("day", now - 300 * 86400),
    ]
    with db.writer() as session, session.begin():
        for granularity, start in rows:
            session.execute(
                text(
                    "INSERT INTO usage_rollups (granularity, product, start, application, "
                    "metric, value) VALUES (:g, 'p', :s, 'a', 'hits', 1)"
                ),
                {"g": granularity, "s": start},
            )
    with db.writer() as session, session.begin():
        for days in (367, 300):
            session.add(
                Alert(
                    at=datetime.fromtimestamp(now - days * 86400, UTC),
                    product="p",
                    application="a",
                    metric="hits",
                    period="day",
                    level=80,
                    usage=8,
                    limit=10,
                    violation=False,
                )
            )
    assert apply_retention(db, now) == 4
    with db.session() as session:
        kept_alerts = session.scalars(select(Alert.at)).all()
    assert [a.replace(tzinfo=UTC).timestamp() for a in kept_alerts] == [now - 300 * 86400]
    with db.session() as session:
        kept = session.execute(
            text("SELECT granularity, start FROM usage_rollups ORDER BY 1, 2")
        ).all()
    assert [tuple(r) for r in kept] == [
        ("day", now - 300 * 86400),
        ("hour", now - 89 * 86400),
        ("minute", now - 86400),
    ]
    db.dispose()


def test_percentiles_interpolate_within_a_bucket() -> None:
    counts = [0] * 14
    counts[4] = 100  # all in 10..25 ms
    assert percentile(counts, 0.5) == pytest.approx(17.5)
    assert percentile([0] * 14, 0.5) is None
    counts = [0] * 13 + [3]
    assert percentile(counts, 0.99) == 10000.0


def test_the_usage_command(control_sqlite: ControlPlane) -> None:
    cp = control_sqlite
    headers = _register(cp)
    batch = _batch(usage=[["shop", "app-a", "hits", NEXT_MINUTE, 7]])
    assert _send(cp, headers, batch).status_code == 200
    base = [sys.executable, "-m", "meshgate", "usage"]
    auth = ["--control-plane", cp.url, "--token", TOKEN]
    window = ["--since", "2026-12-01", "--until", "2026-12-01T02:00"]
    table = subprocess.run(
        [*base, "series", "--granularity", "hour", *window, *auth],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["window", "hits"] and lines[-1] == "total 7"
    assert lines[1].split() == ["2026-12-01T00:00:00Z", "7"]
    as_csv = subprocess.run(
        [*base, "series", "--granularity", "hour", *window, "--csv", *auth],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert as_csv.stdout.splitlines()[:2] == ["start,value", "2026-12-01T00:00:00Z,7"]
    bad = subprocess.run(
        [*base, "series", "--granularity", "week", *auth], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "error: HTTP 422" in bad.stderr and "Traceback" not in bad.stderr
