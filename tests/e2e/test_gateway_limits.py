"""Plan limits end to end: all or nothing across limits, limit 0, and every period's window."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_e2e_support import (
    TIMEOUT,
    drop_keys,
    seconds_left,
    unique_prefix,
    usage,
    values,
)
from harness import echo_upstream, example_product, gateway_config, run_gateway, shared_redis_url

KEY = {"X-API-Key": "k1"}


@pytest.fixture(scope="module")
def upstream_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with echo_upstream(tmp_path_factory.mktemp("echo")) as port:
        yield port


PERIODS = ("minute", "hour", "day", "week", "month", "year", "eternity")


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_request_refused_by_one_limit_increments_none(
    tmp_path: Path, upstream_port: int, backend: str
) -> None:
    limits: dict[str, Any] = {"backend": "memory"}
    if backend == "redis":
        limits = {
            "backend": "redis",
            "redis_url": shared_redis_url(),
            "key_prefix": unique_prefix(),
        }
    child_refuses = [
        {"metric": "hits", "period": "eternity", "value": 100},
        {"metric": "hits", "period": "year", "value": 100},
        {"metric": "search", "period": "eternity", "value": 2},
    ]
    # search is checked (and tentatively counted) before its parent hits refuses.
    parent_refuses = [
        {"metric": "hits", "period": "eternity", "value": 2},
        {"metric": "search", "period": "eternity", "value": 100},
        {"metric": "search", "period": "year", "value": 100},
    ]
    products = [
        example_product(upstream_port, name=name, path_prefix=f"/{name}", plans=[plan])
        for name, plan in (
            ("child", {"name": "basic", "limits": child_refuses}),
            ("parent", {"name": "basic", "limits": parent_refuses}),
        )
    ]
    try:
        with (
            run_gateway(gateway_config(products, limits=limits), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            for name in ("child", "parent"):
                for _ in range(2):
                    assert client.get(f"/{name}/search", headers=KEY).status_code == 200
            counted = {("hits", "eternity"): 2, ("hits", "year"): 2, ("search", "eternity"): 2}
            assert values(gw, "app1", "child") == counted
            for _ in range(3):
                refused = client.get("/child/search", headers=KEY)
                assert refused.status_code == 429
                assert refused.json()["metric"] == "search"
                assert refused.headers["ratelimit-policy"] == '"search-eternity";q=2'
                assert refused.headers["ratelimit"] == '"search-eternity";r=0'
                assert "retry-after" not in refused.headers  # eternity never resets
            # The hits limits had room, yet the refused requests did not count there either.
            assert values(gw, "app1", "child") == counted
            # Other metrics are still allowed.
            assert client.get("/child/other", headers=KEY).status_code == 200
            assert values(gw, "app1", "child")[("hits", "eternity")] == 3

            refused = client.get("/parent/search", headers=KEY)
            assert refused.status_code == 429 and refused.json()["metric"] == "hits"
            assert values(gw, "app1", "parent") == {
                ("hits", "eternity"): 2,
                ("search", "eternity"): 2,
                ("search", "year"): 2,
            }
    finally:
        if backend == "redis":
            drop_keys(limits["redis_url"], limits["key_prefix"])


def test_limit_zero_forbids_the_metric(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        product = example_product(
            upstream,
            plans=[
                {
                    "name": "basic",
                    "limits": [
                        {"metric": "hits", "period": "day", "value": 100},
                        {"metric": "search", "period": "month", "value": 0},
                    ],
                }
            ],
        )
        with (
            run_gateway(gateway_config([product]), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            before = time.time()
            refused = client.get("/echo/search", headers=KEY)
            after = time.time()
            assert refused.status_code == 429
            assert refused.headers["ratelimit"].startswith('"search-month";r=0;t=')
            retry = int(refused.headers["retry-after"])
            assert seconds_left("month", after) - 2 <= retry <= seconds_left("month", before) + 2
            assert client.get("/echo/hello", headers=KEY).status_code == 200
            assert values(gw, "app1") == {("hits", "day"): 1, ("search", "month"): 0}


def test_usage_windows_follow_the_utc_calendar(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        product = example_product(
            upstream,
            plans=[
                {
                    "name": "basic",
                    "limits": [
                        {"metric": "hits", "period": p, "value": 1000 + i}
                        for i, p in enumerate(PERIODS)
                    ],
                }
            ],
        )
        with (
            run_gateway(gateway_config([product]), tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            assert client.get("/echo/hello", headers=KEY).status_code == 200
            before = time.time()
            report = usage(gw, "app1")
            after = time.time()
            assert set(report) == {("hits", p) for p in PERIODS}
            for i, period in enumerate(PERIODS):
                entry = report[("hits", period)]
                limit = 1000 + i
                assert (entry["limit"], entry["remaining"]) == (limit, limit - entry["value"])
                if period == "eternity":
                    assert entry["value"] == 1 and entry["reset_seconds"] is None
                    continue
                # 0 only if the window began between the request and the read.
                assert entry["value"] in (0, 1)
                low, high = seconds_left(period, after), seconds_left(period, before)
                assert low - 2 <= entry["reset_seconds"] <= high + 2, (period, entry, low, high)
