"""Resilience through a sidecar: retries, budgets, timeouts, faults, mirrors, ejection,
circuit breaking, consistent hashing and locality, against real instances on loopback."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from harness import free_port
from mesh_support import metric, running, served_by, start_app, start_sidecar, static_service


def test_a_retry_lands_on_another_instance(tmp_path: Path) -> None:
    good = start_app(tmp_path, "payments", "v1")
    bad = start_app(tmp_path, "payments", "v1")
    caller = start_app(tmp_path, "orders")
    bad.fail(503)
    dead_port = free_port()  # nothing listens: connect-failure
    service = static_service(
        "payments",
        [good, bad],
        routes=[{"retries": {"attempts": 2, "retry_on": ["5xx", "connect-failure"]}}],
        # Ejection would hide the retries this test counts.
        policy={"outlier_detection": None},
    )
    service["instances"].append({"address": "127.0.0.1", "port": dead_port})
    sidecar = start_sidecar(tmp_path, "orders", caller.port, config={"services": [service]})
    with running(good, bad, caller, sidecar), sidecar.client() as client:
        answers = [client.get("http://payments/pay") for _ in range(30)]
        assert {r.status_code for r in answers} == {200}
        assert served_by(answers) == {good.instance: 30}
        metrics = sidecar.metrics()
        # Round robin sent 2 of every 3 first attempts to a failing instance: each retried.
        assert metric(metrics, "meshgate_mesh_retries_total", service="payments") >= 20
        deadline = time.monotonic() + 5
        while len(sidecar.access_log()) < 30 and time.monotonic() < deadline:
            time.sleep(0.1)
        attempts = [e["attempts"] for e in sidecar.access_log() if e["direction"] == "outbound"]
        assert len(attempts) == 30 and max(attempts) >= 2


def test_no_retry_for_a_status_not_asked_for(tmp_path: Path) -> None:
    bad = start_app(tmp_path, "payments")
    caller = start_app(tmp_path, "orders")
    bad.fail(500)
    # The default policy retries connection failures only.
    service = static_service("payments", [bad])
    sidecar = start_sidecar(tmp_path, "orders", caller.port, config={"services": [service]})
    with running(bad, caller, sidecar), sidecar.client() as client:
        assert client.get("http://payments/x").status_code == 500
        assert bad.requests() == 1


def test_retry_budget_stops_a_retry_storm(tmp_path: Path) -> None:
    a = start_app(tmp_path, "payments")
    b = start_app(tmp_path, "payments")
    caller = start_app(tmp_path, "orders")
    a.fail(503)
    b.fail(503)
    service = static_service(
        "payments",
        [a, b],
        routes=[{"retries": {"attempts": 3, "retry_on": ["5xx"]}}],
        policy={
            "outlier_detection": None,
            "retry_budget": {"percent": 20, "min_retries_per_second": 0, "ttl": 10},
        },
    )
    sidecar = start_sidecar(tmp_path, "orders", caller.port, config={"services": [service]})
    with running(a, b, caller, sidecar), sidecar.client() as client:
        n = 200
        answers = [client.get("http://payments/x") for _ in range(n)]
        assert {r.status_code for r in answers} == {503}
        sent = a.requests() + b.requests()
        # Without the budget: 4 attempts each (800). With it: at most 20 % extra.
        assert n <= sent <= n * 1.2 + 2, sent
        metrics = sidecar.metrics()
        assert metric(metrics, "meshgate_mesh_retry_budget_exhausted_total", service="payments") > 0


def test_route_timeout_and_per_try_timeout(tmp_path: Path) -> None:
    slow = start_app(tmp_path, "search")
    fast = start_app(tmp_path, "search")
    caller = start_app(tmp_path, "web")
    slow.slow(3)
    service = static_service(
        "search",
        [slow, fast],
        policy={"outlier_detection": None},
        routes=[
            {
                "match": [{"path": {"prefix": "/total"}}],
                "timeout": 0.3,
                "retries": {"attempts": 0},
            },
            {"retries": {"attempts": 1, "per_try_timeout": 0.3, "retry_on": ["gateway-error"]}},
        ],
    )
    sidecar = start_sidecar(tmp_path, "web", caller.port, config={"services": [service]})
    with running(slow, fast, caller, sidecar), sidecar.client() as client:
        statuses = []
        for _ in range(4):
            started = time.monotonic()
            r = client.get("http://search/total")
            statuses.append(r.status_code)
            assert time.monotonic() - started < 1.5
        # Round robin: half went to the slow instance and timed out.
        assert sorted(statuses) == [200, 200, 504, 504]
        for _ in range(4):
            started = time.monotonic()
            r = client.get("http://search/retried")
            assert r.status_code == 200
            assert r.headers["x-served-by"] == fast.instance
            assert time.monotonic() - started < 1.5


def test_fault_injection_rates(tmp_path: Path) -> None:
    app = start_app(tmp_path, "ratings")
    caller = start_app(tmp_path, "web")
    service = static_service(
        "ratings",
        [app],
        routes=[
            {
                "match": [{"path": {"prefix": "/abort"}}],
                "fault": {"abort": {"status": 418, "percent": 30}},
            },
            {"fault": {"delay": {"seconds": 0.2, "percent": 50}}},
        ],
    )
    sidecar = start_sidecar(tmp_path, "web", caller.port, config={"services": [service]})
    with running(app, caller, sidecar), sidecar.client() as client:
        n = 5000
        aborted = sum(client.get("http://ratings/abort").status_code == 418 for _ in range(n))
        assert abs(aborted / n - 0.30) <= 0.02, aborted
        # The aborted ones never reached the instance.
        assert app.requests() == n - aborted
        with ThreadPoolExecutor(8) as pool:

            def timed(_: int) -> float:
                started = time.monotonic()
                client.get("http://ratings/delayed")
                return time.monotonic() - started

            durations = list(pool.map(timed, range(400)))
        delayed = sum(d >= 0.2 for d in durations) / len(durations)
        assert 0.40 <= delayed <= 0.60, delayed


def test_mirror_gets_a_copy_and_the_caller_never_waits(tmp_path: Path) -> None:
    main = start_app(tmp_path, "reviews", "v1")
    shadow = start_app(tmp_path, "reviews", "v2")
    caller = start_app(tmp_path, "web")
    shadow.slow(2)
    service = static_service(
        "reviews",
        [main, shadow],
        subsets=[
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ],
        routes=[{"destinations": [{"subset": "v1"}], "mirror": {"subset": "v2", "percent": 100}}],
    )
    sidecar = start_sidecar(tmp_path, "web", caller.port, config={"services": [service]})
    with running(main, shadow, caller, sidecar), sidecar.client() as client:
        started = time.monotonic()
        answers = [client.get("http://reviews/r") for _ in range(10)]
        posted = client.post("http://reviews/r", content=b"x" * 1000)
        assert time.monotonic() - started < 1.5
        assert served_by(answers) == {main.instance: 10}
        assert posted.json()["body_bytes"] == 1000
        deadline = time.monotonic() + 10
        while shadow.requests() < 11 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert shadow.requests() == 11


def test_outlier_ejection_and_return(tmp_path: Path) -> None:
    a = start_app(tmp_path, "payments")
    b = start_app(tmp_path, "payments")
    caller = start_app(tmp_path, "orders")
    service = static_service(
        "payments",
        [a, b],
        routes=[{"retries": {"attempts": 0}}],
        policy={
            "outlier_detection": {
                "consecutive_5xx": 3,
                "interval": 1,
                "base_ejection_time": 1,
                "max_ejection_percent": 50,
            }
        },
    )
    sidecar = start_sidecar(tmp_path, "orders", caller.port, config={"services": [service]})
    with running(a, b, caller, sidecar), sidecar.client() as client:
        a.fail(500)
        first = [client.get("http://payments/x") for _ in range(10)]
        # Three failures eject a; everything after goes to b.
        assert sum(r.status_code == 500 for r in first) == 3
        assert all(r.status_code == 200 for r in first[6:])
        ejected = {e["address"]: e["ejected"] for e in sidecar.clusters()["payments"]}
        assert ejected[f"127.0.0.1:{a.port}"] is True
        a.recover()
        time.sleep(1.3)
        back = [client.get("http://payments/x") for _ in range(10)]
        assert served_by(back) == {a.instance: 5, b.instance: 5}


def test_circuit_breaking_under_a_burst(tmp_path: Path) -> None:
    app = start_app(tmp_path, "inventory")
    caller = start_app(tmp_path, "web")
    app.slow(0.5)
    service = static_service(
        "inventory",
        [app],
        policy={"connection_pool": {"max_requests": 5}, "outlier_detection": None},
    )
    sidecar = start_sidecar(tmp_path, "web", caller.port, config={"services": [service]})
    clients = [httpx.Client(proxy=sidecar.proxy, timeout=10) for _ in range(20)]
    start = threading.Barrier(20)
    with running(app, caller, sidecar):

        def call(client: httpx.Client) -> tuple[int, float]:
            start.wait()
            started = time.monotonic()
            r = client.get("http://inventory/x")
            return r.status_code, time.monotonic() - started

        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(call, clients))
        for c in clients:
            c.close()
        statuses = [s for s, _ in results]
        assert statuses.count(200) >= 5
        assert statuses.count(503) >= 10
        # The overflow is refused at once, not queued behind the slow ones.
        assert all(d < 0.4 for s, d in results if s == 503)
        assert app.requests() == statuses.count(200)
        metrics = sidecar.metrics()
        assert metric(
            metrics, "meshgate_mesh_overflows_total", service="inventory"
        ) == statuses.count(503)


def test_consistent_hash_keeps_a_key_on_one_instance(tmp_path: Path) -> None:
    apps = [start_app(tmp_path, "carts") for _ in range(3)]
    caller = start_app(tmp_path, "web")
    config = {
        "services": [
            static_service("carts", apps, policy={"consistent_hash": {"header": "x-user"}})
        ]
    }
    sidecar = start_sidecar(tmp_path, "web", caller.port, config=config)
    with running(*apps, caller, sidecar):
        users = [f"user-{i}" for i in range(60)]
        with sidecar.client() as client:
            first = {
                u: client.get("http://carts/c", headers={"x-user": u}).headers["x-served-by"]
                for u in users
            }
            again = {
                u: client.get("http://carts/c", headers={"x-user": u}).headers["x-served-by"]
                for u in users
            }
        assert first == again
        assert len(set(first.values())) == 3
        # One instance leaves: only its keys move.
        gone = apps[2]
        config["services"][0]["instances"] = config["services"][0]["instances"][:2]
        sidecar.write_config(config)
        time.sleep(0.5)
        with sidecar.client() as client:
            after = {
                u: client.get("http://carts/c", headers={"x-user": u}).headers["x-served-by"]
                for u in users
            }
        for u in users:
            if first[u] != gone.instance:
                assert after[u] == first[u]
            else:
                assert after[u] != gone.instance


def test_locality_prefers_the_same_zone_and_fails_over(tmp_path: Path) -> None:
    near = start_app(tmp_path, "payments")
    far = start_app(tmp_path, "payments")
    caller = start_app(tmp_path, "orders")
    service = {
        "name": "payments",
        "instances": [
            {"address": "127.0.0.1", "port": near.port, "zone": "a"},
            {"address": "127.0.0.1", "port": far.port, "zone": "b"},
        ],
        "policy": {
            "outlier_detection": {
                "consecutive_5xx": 2,
                "base_ejection_time": 30,
                "max_ejection_percent": 100,
            }
        },
        "routes": [{"retries": {"attempts": 0}}],
    }
    sidecar = start_sidecar(
        tmp_path, "orders", caller.port, config={"services": [service]}, extra=["--zone", "a"]
    )
    with running(near, far, caller, sidecar), sidecar.client() as client:
        assert served_by([client.get("http://payments/x") for _ in range(10)]) == {
            near.instance: 10
        }
        near.fail(503)
        [client.get("http://payments/x") for _ in range(2)]
        assert served_by([client.get("http://payments/x") for _ in range(10)]) == {far.instance: 10}
