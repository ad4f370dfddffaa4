"""The alerts' admin API on a real control plane: levels, alerts, webhooks and deliveries,
end to end from a gateway's usage batch to a signed webhook and a mail; bad input refused
with problem+json."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from alert_support import smtp_server, webhook_receiver
from control_support import TOKEN, ControlPlane, problem, start_control
from harness import within


def _subscription(cp: ControlPlane, limit: int, period: str = "eternity") -> dict[str, Any]:
    """A product, a plan limiting hits per ``period``, an account with an e-mail address and
    an application: their bodies."""
    tag = uuid.uuid4().hex[:8]
    product = cp.post(
        "/products", {"name": f"shop-{tag}", "path_prefix": f"/{tag}", "auth": {"type": "api_key"}}
    )
    [hits] = cp.api.get(f"/products/{product['id']}/metrics").json()["items"]
    plan = cp.post(f"/products/{product['id']}/plans", {"name": "basic", "state": "published"})
    cp.post(
        f"/plans/{plan['id']}/limits", {"metric_id": hits["id"], "period": period, "value": limit}
    )
    account = cp.post("/accounts", {"name": f"acme-{tag}", "email": f"dev-{tag}@acme.test"})
    app = cp.post(
        "/applications", {"account_id": account["id"], "plan_id": plan["id"], "name": "a"}
    )
    return {"product": product, "account": account, "application": app}


def _send_usage(cp: ControlPlane, product: str, app_id: str, value: int) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Meshgate-Dataplane": "gw-alerts"}
    httpx.get(f"{cp.url}/dp/v1/snapshot", params={"env": "production"}, headers=headers)
    minute = int(time.time()) // 60 * 60
    batch = {"id": f"test:{uuid.uuid4()}", "usage": [[product, app_id, "hits", minute, value]]}
    response = httpx.post(f"{cp.url}/dp/v1/usage", json=batch, headers=headers, timeout=30)
    assert response.status_code == 200, response.text


def _alerts(cp: ControlPlane, **params: Any) -> list[dict[str, Any]]:
    response = cp.api.get("/alerts", params={"per_page": 500, **params})
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


def test_usage_batches_alert_by_webhook_and_mail_end_to_end(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with smtp_server() as box, webhook_receiver([500, 502]) as receiver:
        monkeypatch.setenv("MESHGATE_SMTP_URL", box.url)
        monkeypatch.setenv("MESHGATE_ALERT_EMAIL", "ops@meshgate.test")
        monkeypatch.setenv("MESHGATE_ALERT_RETRY_BASE", "0.05")
        cp = start_control(tmp_path, database_url)
        try:
            sub = _subscription(cp, 100)
            product, app_id = sub["product"]["name"], sub["application"]["app_id"]
            levels = cp.api.put(
                f"/products/{sub['product']['id']}/alert_levels", json={"levels": [100, 50, 80]}
            )
            assert levels.json() == {"product_id": sub["product"]["id"], "levels": [50, 80, 100]}
            hook = cp.post("/webhooks", {"url": receiver.url, "events": ["alert", "violation"]})
            assert hook["secret"].startswith("whsec_")

            for value, expected in ((40, []), (15, [50]), (10, [50]), (20, [80, 50])):
                _send_usage(cp, product, app_id, value)
                within(10, lambda e=expected: [a["level"] for a in _alerts(cp)] == e, "alerts")
            _send_usage(cp, product, app_id, 30)  # 115 %
            within(10, lambda: len(_alerts(cp)) == 3, "the violation")
            alerts = _alerts(cp, application=app_id)
            assert [(a["level"], a["usage"], a["violation"]) for a in alerts] == [
                (100, 115, True),
                (80, 85, False),
                (50, 55, False),
            ]
            assert {a["account_id"] for a in alerts} == {sub["account"]["id"]}

            # Each alert posted once, the first after two failures; every attempt logged.
            def settled() -> dict[str, Any]:
                return dict(cp.api.get(f"/webhooks/{hook['id']}/deliveries").json())

            within(10, lambda: sum(len(d["log"]) for d in settled()["items"]) == 5, "logged")
            deliveries = settled()
            assert len(receiver.requests) == 5
            assert deliveries["total"] == 3
            logs = sorted([a["status_code"] for a in d["log"]] for d in deliveries["items"])
            assert logs == [[200], [200], [500, 502, 200]]
            assert {d["state"] for d in deliveries["items"]} == {"delivered"}
            for request in receiver.requests:
                signed = request.headers["X-Meshgate-Timestamp"].encode() + b"." + request.body
                mac = hmac.new(hook["secret"].encode(), signed, hashlib.sha256).hexdigest()
                assert request.headers["X-Meshgate-Signature"] == f"sha256={mac}"
            events = sorted(d["event"] for d in receiver.documents())
            assert events.count("violation") == 1

            # The account's address and the operator's, for each of the three alerts.
            within(10, lambda: len(box.messages) == 6, "six mails")
            to = sorted(rcpt[0] for rcpt, _ in box.messages)
            assert to == [sub["account"]["email"]] * 3 + ["ops@meshgate.test"] * 3
            subjects = {m["Subject"] for _, m in box.messages}
            assert f"[meshgate] Limit violation: {app_id}: hits per eternity at 100%" in subjects
            mails = cp.api.get(f"/alerts/{alerts[0]['id']}/deliveries").json()["items"]
            assert sorted(d["channel"] for d in mails) == ["email", "email", "webhook"]

            # Read, filtered, deleted.
            read = cp.api.post(f"/alerts/{alerts[0]['id']}/read")
            assert read.status_code == 200 and read.json()["state"] == "read"
            assert [a["id"] for a in _alerts(cp, state="unread")] == [
                alerts[1]["id"],
                alerts[2]["id"],
            ]
            assert [a["level"] for a in _alerts(cp, violation=True)] == [100]
            assert _alerts(cp, account_id=sub["account"]["id"] + 1000) == []
            assert _alerts(cp, since="2100-01-01T00:00:00Z") == []
            assert cp.api.delete(f"/alerts/{alerts[0]['id']}").status_code == 204
            problem(cp.api.get(f"/alerts/{alerts[0]['id']}"), 404)
            assert len(_alerts(cp)) == 2
        finally:
            cp.stop()


def test_alert_levels_are_checked(control_shared: ControlPlane) -> None:
    cp = control_shared
    sub = _subscription(cp, 10)
    path = f"/products/{sub['product']['id']}/alert_levels"
    assert cp.api.get(path).json() == {"product_id": sub["product"]["id"], "levels": []}
    problem(cp.api.put(path, json={"levels": [50, 55]}), 422, "body.levels[1]")
    problem(cp.api.put(path, json={"levels": [50, 80, 50]}), 422, "body.levels")
    problem(cp.api.put(path, json={"levels": [50] * 1000}), 422, "body.levels")
    problem(cp.api.put(path, json={"levels": ["50"]}), 422, "body.levels[0]")
    problem(cp.api.put(path, json={"levels": [True]}), 422, "body.levels[0]")
    problem(cp.api.put(path, json={"levels": [50.0]}), 422, "body.levels[0]")
    problem(cp.api.put(path, json={"levels": 50}), 422, "body.levels")
    problem(cp.api.put(path, json={}), 422, "body.levels")
    problem(cp.api.put(path, json={"levels": [50], "extra": 1}), 422, "body.extra")
    problem(
        cp.api.put(path, content=b"{not json", headers={"content-type": "application/json"}), 400
    )
    problem(cp.api.put(path, content=b"levels=50", headers={"content-type": "text/plain"}), 415)
    problem(
        cp.api.put(path, content=b"[" * 100_000, headers={"content-type": "application/json"}), 400
    )
    problem(cp.api.put("/products/99999999/alert_levels", json={"levels": [50]}), 404)
    problem(cp.api.get("/products/99999999/alert_levels"), 404)
    problem(cp.api.get("/products/0/alert_levels"), 422)
    problem(cp.api.get("/products/nope/alert_levels"), 422)
    assert cp.api.get(path).json()["levels"] == []  # nothing refused was stored
    every = [300, 200, 150, 120, 100, 90, 80, 50]
    assert cp.api.put(path, json={"levels": every}).json()["levels"] == sorted(every)
    assert cp.api.put(path, json={"levels": []}).json()["levels"] == []
    problem(httpx.get(f"{cp.url}/admin/api{path}"), 401)


def test_concurrent_level_changes_each_succeed_and_one_is_kept(
    control_shared: ControlPlane,
) -> None:
    cp = control_shared
    sub = _subscription(cp, 10)
    path = f"/products/{sub['product']['id']}/alert_levels"
    choices = [[50], [80, 100], [90, 120, 150], [200, 300], [50, 100]] * 4
    statuses: list[int] = []

    def put(levels: list[int]) -> None:
        with httpx.Client(base_url=cp.api.base_url, headers=cp.api.headers, timeout=30) as c:
            statuses.append(c.put(path, json={"levels": levels}).status_code)

    threads = [threading.Thread(target=put, args=(levels,)) for levels in choices]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * len(choices)
    assert cp.api.get(path).json()["levels"] in choices


def test_alerts_refuse_unknown_ids_and_bad_filters(control_shared: ControlPlane) -> None:
    cp = control_shared
    for response in (
        cp.api.get("/alerts/2147483647"),
        cp.api.post("/alerts/2147483647/read"),
        cp.api.delete("/alerts/2147483647"),
        cp.api.get("/alerts/2147483647/deliveries"),
    ):
        body = problem(response, 404)
        assert body["detail"] == "alert 2147483647 does not exist"
    problem(cp.api.get("/alerts/2147483648"), 422)
    problem(cp.api.get("/alerts/-1"), 422)
    problem(cp.api.get("/alerts", params={"since": "yesterday"}), 422, "query.since")
    problem(cp.api.get("/alerts", params={"since": "1700000000"}), 422, "query.since")
    for early_or_late in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"):
        problem(cp.api.get("/alerts", params={"since": early_or_late}), 422, "query.since")
    problem(cp.api.get("/alerts", params={"per_page": 501}), 422, "query.per_page")
    problem(cp.api.get("/alerts", params={"page": 0}), 422, "query.page")
    problem(cp.api.get("/alerts", params={"violation": "maybe"}), 422, "query.violation")
    problem(cp.api.get("/alerts", params={"state": "archived"}), 422, "query.state")
    problem(cp.api.get("/alerts", params={"application": "a\x00b"}), 422, "query.application")
    problem(cp.api.get("/alerts", params={"account_id": "x"}), 422, "query.account_id")
    problem(cp.api.get("/alerts", params={"product": "p" * 201}), 422, "query.product")
    empty = cp.api.get("/alerts", params={"application": "none-such", "page": 3})
    assert empty.json() == {"items": [], "page": 3, "per_page": 50, "total": 0}
    problem(httpx.get(f"{cp.url}/admin/api/alerts"), 401)


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "http://user:pw@127.0.0.1/hook",
        "https://token@example.com/hook",
        "ftp://example.com/",
        "javascript:alert(1)",
        "http://",
        "http:///path",
        "http://example.com:99999/",
        "http://example.com:0/",
        "http://exa mple.com/",
        "http://example.com/\r\nX-Injected: 1",
        "http://example.com/#frag",
        "//example.com/",
        "",
        "http://example.com/" + "a" * 2000,
    ],
)
def test_webhooks_refuse_urls_they_must_not_call(control_shared: ControlPlane, url: str) -> None:
    cp = control_shared
    before = cp.api.get("/webhooks").json()["total"]
    problem(cp.api.post("/webhooks", json={"url": url}), 422, "body.url")
    assert cp.api.get("/webhooks").json()["total"] == before


def test_webhooks_crud_and_bad_input(control_shared: ControlPlane) -> None:
    cp = control_shared
    sub = _subscription(cp, 10)
    created = cp.api.post(
        "/webhooks",
        json={"url": "https://hooks.example.com/x?y=1", "account_id": sub["account"]["id"]},
    )
    assert created.status_code == 201, created.text
    hook = created.json()
    assert created.headers["location"] == f"/admin/api/webhooks/{hook['id']}"
    assert hook["events"] == ["alert", "violation"] and hook["enabled"] is True
    secret = hook["secret"]
    read = cp.api.get(f"/webhooks/{hook['id']}").json()
    assert "secret" not in read and read["secret_hint"] == secret[:10] + "…"
    assert secret not in cp.api.get("/webhooks").text

    changed = cp.api.patch(
        f"/webhooks/{hook['id']}", json={"events": ["violation"], "enabled": False}
    )
    assert changed.status_code == 200, changed.text
    assert (changed.json()["events"], changed.json()["enabled"]) == (["violation"], False)
    rotated = cp.api.post(f"/webhooks/{hook['id']}/secret").json()
    assert rotated["secret"] != secret and rotated["secret"].startswith("whsec_")
    listed = cp.api.get("/webhooks", params={"account_id": sub["account"]["id"]}).json()
    assert [h["id"] for h in listed["items"]] == [hook["id"]]

    item = f"/webhooks/{hook['id']}"
    problem(cp.api.patch(item, json={"url": "file:///x"}), 422, "body.url")
    problem(cp.api.patch(item, json={"events": []}), 422, "body.events")
    problem(cp.api.patch(item, json={"events": ["alert", "alert"]}), 422, "body.events")
    problem(cp.api.patch(item, json={"events": ["billing"]}), 422, "body.events[0]")
    problem(cp.api.patch(item, json={"enabled": "yes"}), 422, "body.enabled")
    problem(cp.api.patch(item, json={"account_id": 1}), 422, "body.account_id")
    problem(cp.api.post("/webhooks", json={"url": "http://x/", "account_id": 2**31 - 1}), 422)
    problem(cp.api.post("/webhooks", json={}), 422, "body.url")
    problem(cp.api.post("/webhooks", json={"url": 5}), 422, "body.url")
    problem(cp.api.post("/webhooks", json={"url": "http://x/", "description": "\x00"}), 422)
    big = {"url": "http://x/", "description": "d" * 200_000}
    problem(cp.api.post("/webhooks", json=big), 413)
    assert cp.api.get(item).json()["url"] == "https://hooks.example.com/x?y=1"

    for response in (
        cp.api.get("/webhooks/2147483647"),
        cp.api.patch("/webhooks/2147483647", json={"enabled": True}),
        cp.api.delete("/webhooks/2147483647"),
        cp.api.post("/webhooks/2147483647/secret"),
        cp.api.get("/webhooks/2147483647/deliveries"),
    ):
        problem(response, 404)
    problem(cp.api.get(f"{item}/deliveries", params={"state": "lost"}), 422, "query.state")
    assert cp.api.get(f"{item}/deliveries").json()["total"] == 0
    assert cp.api.delete(item).status_code == 204
    problem(cp.api.get(item), 404)


def test_concurrent_webhook_creations_each_get_their_own(control_shared: ControlPlane) -> None:
    cp = control_shared
    made: list[dict[str, Any]] = []

    def create(i: int) -> None:
        with httpx.Client(base_url=cp.api.base_url, headers=cp.api.headers, timeout=30) as c:
            response = c.post("/webhooks", json={"url": f"http://127.0.0.1:9/{i}"})
            assert response.status_code == 201, response.text
            made.append(response.json())

    threads = [threading.Thread(target=create, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({h["id"] for h in made}) == 12 and len({h["secret"] for h in made}) == 12
    for hook in made:
        assert cp.api.delete(f"/webhooks/{hook['id']}").status_code == 204


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MESHGATE_SMTP_URL", "ftp://mail.example.com"),
        ("MESHGATE_SMTP_URL", "smtp://mail.example.com"),
        ("MESHGATE_ALERT_EMAIL", "not an address"),
        ("MESHGATE_ALERT_RETRY_BASE", "soon"),
    ],
)
def test_a_bad_alert_setting_stops_the_start_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError) as failed:
        start_control(tmp_path, f"sqlite:///{tmp_path / 'control.db'}")
    assert name in str(failed.value)
    assert "Traceback" not in str(failed.value)
