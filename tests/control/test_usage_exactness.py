"""Usage end to end: requests through two gateways land in the control plane's analytics as
exactly the counts the clients saw, per application, metric and status, while the control
plane restarts mid-run and one gateway is killed (Redis counters, SIGKILL) or stopped
(memory counters, SIGTERM)."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from control_support import (
    ControlPlane,
    attached_gateway,
    make_product,
    postgres_schema,
    postgres_url,
    start_control,
)
from harness import echo_upstream, free_port, shared_redis_url, within

REQUESTS = 20_000
THREADS = 8


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[int]:
    with echo_upstream(tmp_path) as port:
        yield port


def _catalogue(cp: ControlPlane, upstream: int) -> dict[str, Any]:
    """Product "exact": hits with a method "search"; plan "capped" (search limited per
    minute, so some requests are refused 429) and plan "free" (no limit at all)."""
    product = make_product(cp, upstream, name="exact", path_prefix="/exact")
    pid = product["id"]
    [hits] = cp.api.get(f"/products/{pid}/metrics").json()["items"]
    search = cp.post(f"/products/{pid}/metrics", {"name": "search", "parent_id": hits["id"]})
    cp.post(
        f"/products/{pid}/mapping_rules",
        {"http_method": "GET", "pattern": "/search", "metric_id": search["id"], "last": True},
    )
    capped = cp.post(f"/products/{pid}/plans", {"name": "capped", "state": "published"})
    cp.post(
        f"/plans/{capped['id']}/limits",
        {"metric_id": search["id"], "period": "minute", "value": 700},
    )
    free = cp.post(f"/products/{pid}/plans", {"name": "free", "state": "published"})
    account = cp.post("/accounts", {"name": "exact-dev"})
    apps = {}
    for name, plan in (("capped", capped), ("free", free)):
        app = cp.post(
            "/applications", {"account_id": account["id"], "plan_id": plan["id"], "name": name}
        )
        apps[name] = {"app_id": app["app_id"], "key": app["key"]}
    cp.post(f"/products/{pid}/promote")
    return apps


class Load:
    """Clients spread over the gateways; what each saw, by (application, status)."""

    def __init__(self, apps: dict[str, Any], ports: list[int]) -> None:
        capped, free = apps["capped"], apps["free"]
        # (application as analytics names it, path, key): a limited method, an unlimited
        # hit, backend answers other than 200, a wrong key (403, no application) and a path
        # no product serves (404).
        self.kinds = [
            (capped["app_id"], "/exact/search", capped["key"]),
            (capped["app_id"], "/exact/search", capped["key"]),
            (free["app_id"], "/exact/items/1", free["key"]),
            (free["app_id"], "/exact/items/2", free["key"]),
            # Let through, then answered otherwise than the presumed 200.
            (free["app_id"], "/exact/status/503", free["key"]),
            (capped["app_id"], "/exact/status/201", capped["key"]),
            ("", "/exact/items/3", "wrong-key"),
            ("", "/nowhere", None),
        ]
        self.ports = ports
        self.alive = list(ports)
        self.seen: Counter[tuple[str, int]] = Counter()
        self.in_flight = 0  # requests whose connection broke: counted or not, never seen
        self.sent = 0
        self.lock = threading.Lock()

    def run(self, thread: int, count: int) -> None:
        clients: dict[int, httpx.Client] = {}
        for i in range(count):
            app, path, key = self.kinds[(thread + i) % len(self.kinds)]
            port = self.alive[(thread + i) % len(self.alive)]
            client = clients.get(port)
            if client is None:
                client = clients[port] = httpx.Client(
                    base_url=f"http://127.0.0.1:{port}", timeout=10
                )
            try:
                status = client.get(path, headers={"X-API-Key": key} if key else {}).status_code
            except httpx.HTTPError:
                with self.lock:
                    self.in_flight += 1
                continue
            with self.lock:
                self.seen[(app, status)] += 1
                self.sent += 1
        for client in clients.values():
            client.close()

    def drop(self, port: int) -> None:
        self.alive = [p for p in self.alive if p != port]


def _analytics(cp: ControlPlane, apps: dict[str, Any]) -> tuple[Counter[Any], Counter[Any]]:
    """What the analytics store holds: responses by (application, status), usage by
    (application, metric)."""
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3 * 3600))
    window = {"granularity": "hour", "since": since}
    responses: Counter[tuple[str, int]] = Counter()
    for app in ("", apps["capped"]["app_id"], apps["free"]["app_id"]):
        body = cp.api.get("/analytics/responses", params={"application": app, **window}).json()
        for row in body["totals"]:
            responses[(app, row["status"])] += row["count"]
    usage: Counter[tuple[str, str]] = Counter()
    for app in (apps["capped"]["app_id"], apps["free"]["app_id"]):
        for metric in ("hits", "search"):
            body = cp.api.get(
                "/analytics/usage", params={"application": app, "metric": metric, **window}
            ).json()
            usage[(app, metric)] = body["total"]
    return responses, usage


def _expected_usage(seen: Counter[tuple[str, int]], apps: dict[str, Any]) -> Counter[Any]:
    capped, free = apps["capped"]["app_id"], apps["free"]["app_id"]
    return Counter(
        {
            (capped, "search"): seen[(capped, 200)],
            # The product's first rule (/ → hits) and /search (search, and hits, its parent).
            (capped, "hits"): 2 * seen[(capped, 200)] + seen[(capped, 201)],
            (free, "hits"): seen[(free, 200)] + seen[(free, 503)],
            (free, "search"): 0,
        }
    )


def _run(
    tmp_path: Path,
    database_url: str,
    upstream: int,
    limits: dict[str, Any],
    stop_one: signal.Signals,
) -> None:
    port = free_port()
    planes = [start_control(tmp_path, database_url, port)]
    try:
        _run_against(tmp_path, database_url, upstream, limits, stop_one, port, planes)
    finally:
        # Each one started (the test restarts the control plane on the way), failed or not.
        for plane in planes:
            plane.stop()


def _run_against(
    tmp_path: Path,
    database_url: str,
    upstream: int,
    limits: dict[str, Any],
    stop_one: signal.Signals,
    port: int,
    planes: list[ControlPlane],
) -> None:
    cp = planes[0]
    apps = _catalogue(cp, upstream)
    settings = {
        "limits": limits,
        "usage": {"interval": 0.5},
        "access_log": False,
        "timeouts": {"shutdown_grace": 10},
    }
    with ExitStack() as stack:
        gateways = [
            stack.enter_context(
                attached_gateway(tmp_path, cp.url, cp.token, name=name, settings_extra=settings)
            )
            for name in ("gw-a", "gw-b")
        ]
        ports = [int(gw.url.rsplit(":", 1)[1]) for gw in gateways]
        load = Load(apps, ports)
        free_app, free_key = apps["free"]["app_id"], apps["free"]["key"]
        warm_up = 0

        def served(gw: Any) -> bool:
            # Every answer counts, a 404 before the snapshot arrived included.
            nonlocal warm_up
            status = gw.get("/exact/items/0", free_key).status_code
            warm_up += 1
            load.seen[(free_app if status in (200, 429) else "", status)] += 1
            return bool(status == 200)

        for gw in gateways:
            within(15, lambda gw=gw: served(gw), "served")
        per_thread = REQUESTS // THREADS
        threads = [threading.Thread(target=load.run, args=(t, per_thread)) for t in range(THREADS)]
        for t in threads:
            t.start()
        # A third of the way: the control plane goes away for a while and comes back.
        within(60, lambda: load.sent >= REQUESTS // 3, "a third of the requests")
        cp.stop()
        time.sleep(2)
        cp = start_control(tmp_path, database_url, port)
        planes.append(cp)
        # Two thirds: one gateway goes, killed outright or stopped.
        within(60, lambda: load.sent >= 2 * REQUESTS // 3, "two thirds of the requests")
        load.drop(ports[1])
        gateways[1].proc.signal(stop_one)
        gateways[1].proc.popen.wait(30)
        for t in threads:
            t.join(120)
        assert sum(load.seen.values()) + load.in_flight == REQUESTS + warm_up
        assert load.seen[(apps["capped"]["app_id"], 429)] > 0, load.seen
        if stop_one == signal.SIGKILL:
            # Restarted with its cache (and spool): anything it resends counts once.
            stack.enter_context(
                attached_gateway(tmp_path, cp.url, cp.token, name="gw-b", settings_extra=settings)
            )
        expected_usage = _expected_usage(load.seen, apps)

        def landed() -> bool:
            responses, usage = _analytics(cp, apps)
            return all(
                load.seen[k] <= responses[k] <= load.seen[k] + load.in_flight
                for k in set(load.seen) | set(responses)
            ) and all(
                expected_usage[k] <= usage[k] <= expected_usage[k] + load.in_flight
                for k in set(expected_usage) | set(usage)
            )

        try:
            within(30, landed, "the analytics to hold every request")
        finally:
            responses, usage = _analytics(cp, apps)
            print("seen", dict(load.seen), "in flight", load.in_flight)
            print("analytics", dict(responses), dict(usage))
        # Exact: a request in flight at the kill may have been counted (its check ran) or
        # not; each one that was seen is there once, no more.
        assert sum(responses.values()) - sum(load.seen.values()) <= load.in_flight


@pytest.fixture
def postgresql_url() -> Iterator[str]:
    """PostgreSQL, in a schema of this test's own."""
    yield from postgres_schema(postgres_url())


def test_redis_counters_lose_nothing_to_a_restart_or_a_kill(
    tmp_path: Path, upstream: int, postgresql_url: str
) -> None:
    # On PostgreSQL; the memory run below is on SQLite.
    database_url = postgresql_url
    url = shared_redis_url()
    prefix = f"exact-{uuid.uuid4().hex[:8]}"
    try:
        _run(
            tmp_path,
            database_url,
            upstream,
            {"backend": "redis", "redis_url": url, "key_prefix": prefix},
            signal.SIGKILL,
        )
    finally:
        client = redis.Redis.from_url(url)
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(key)
        client.close()


def test_memory_counters_lose_nothing_to_a_restart_or_a_sigterm(
    tmp_path: Path, upstream: int
) -> None:
    database_url = f"sqlite:///{tmp_path / 'control.db'}"
    _run(tmp_path, database_url, upstream, {"backend": "memory"}, signal.SIGTERM)
