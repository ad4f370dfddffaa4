"""The Redis counter backend end to end: exact limits across worker processes, and what
happens while Redis is down and after it returns."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from gateway_e2e_support import (
    TIMEOUT,
    drop_keys,
    private_redis,
    serving_workers,
    unique_prefix,
    values,
    wait_for,
)
from harness import echo_upstream, example_product, gateway_config, run_gateway, shared_redis_url

KEY = {"X-API-Key": "k1"}


def redis_limits(url: str, prefix: str, **overrides: Any) -> dict[str, Any]:
    return {"backend": "redis", "redis_url": url, "key_prefix": prefix, **overrides}


async def burst(url: str, total: int) -> Counter[int]:
    """``total`` requests at once, each on its own connection; their status codes."""
    limits = httpx.Limits(max_connections=total, max_keepalive_connections=0)
    timeout = httpx.Timeout(60.0, pool=120.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        start = asyncio.Event()

        async def one() -> int:
            await start.wait()
            return (await client.get("/echo/hello", headers=KEY)).status_code

        tasks = [asyncio.create_task(one()) for _ in range(total)]
        await asyncio.sleep(0)
        start.set()
        return Counter(await asyncio.gather(*tasks))


def test_four_workers_let_exactly_the_limit_through(tmp_path: Path) -> None:
    url, prefix = shared_redis_url(), unique_prefix()
    try:
        with echo_upstream(tmp_path) as upstream:
            product = example_product(
                upstream,
                plans=[
                    {
                        "name": "basic",
                        "limits": [{"metric": "hits", "period": "eternity", "value": 100}],
                    }
                ],
            )
            config = gateway_config([product], limits=redis_limits(url, prefix), access_log=False)
            with run_gateway(config, tmp_path, "--workers", "4") as gw:
                wait_for(lambda: serving_workers(gw) == 4, what="4 workers serving")
                codes = asyncio.run(burst(gw.url, 500))
                assert codes == {200: 100, 429: 400}, codes
                assert values(gw, "app1") == {("hits", "eternity"): 100}
    finally:
        drop_keys(url, prefix)


def test_redis_down_then_back_with_deny(tmp_path: Path) -> None:
    with private_redis(tmp_path) as redis_server, echo_upstream(tmp_path) as upstream:
        product = example_product(
            upstream,
            plans=[
                {"name": "basic", "limits": [{"metric": "hits", "period": "eternity", "value": 50}]}
            ],
        )
        config = gateway_config([product], limits=redis_limits(redis_server.url, "deny"))
        with (
            run_gateway(config, tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            for _ in range(3):
                assert client.get("/echo/hello", headers=KEY).status_code == 200
            assert httpx.get(f"{gw.admin_url}/readyz").json()["status"] == "ready"

            redis_server.stop()
            for _ in range(3):
                refused = client.get("/echo/hello", headers=KEY)
                assert refused.status_code == 503
                assert refused.headers["retry-after"] == "1"
                assert refused.headers["content-type"] == "application/problem+json"
            ready = httpx.get(f"{gw.admin_url}/readyz")
            assert ready.status_code == 503
            assert ready.json()["status"] == "unavailable"
            assert httpx.get(f"{gw.admin_url}/healthz").status_code == 200
            assert httpx.get(f"{gw.admin_url}/usage/app1").status_code == 503
            metrics = httpx.get(f"{gw.admin_url}/metrics").text
            assert 'meshgate_counter_backend_errors_total{policy="deny"} 3.0' in metrics

            # Same port, empty data: counting resumes with no gateway restart.
            redis_server.start()
            wait_for(
                lambda: client.get("/echo/hello", headers=KEY).status_code == 200,
                what="requests allowed again",
            )
            assert httpx.get(f"{gw.admin_url}/readyz").status_code == 200
            before = values(gw, "app1")[("hits", "eternity")]
            assert before >= 1
            for _ in range(4):
                assert client.get("/echo/hello", headers=KEY).status_code == 200
            assert values(gw, "app1") == {("hits", "eternity"): before + 4}


def test_redis_down_then_back_with_allow(tmp_path: Path) -> None:
    with private_redis(tmp_path) as redis_server, echo_upstream(tmp_path) as upstream:
        product = example_product(
            upstream,
            plans=[
                {"name": "basic", "limits": [{"metric": "hits", "period": "eternity", "value": 5}]}
            ],
        )
        limits = redis_limits(redis_server.url, "allow", on_backend_error="allow")
        config = gateway_config([product], limits=limits)
        with (
            run_gateway(config, tmp_path) as gw,
            httpx.Client(base_url=gw.url, timeout=TIMEOUT) as client,
        ):
            assert client.get("/echo/hello", headers=KEY).status_code == 200
            redis_server.stop()
            # Past the limit of 5, yet let through: nothing can be counted.
            for _ in range(8):
                passed = client.get("/echo/hello", headers=KEY)
                assert passed.status_code == 200
                assert "ratelimit" not in passed.headers
            assert httpx.get(f"{gw.admin_url}/readyz").status_code == 200
            redis_server.start()
            deadline = time.monotonic() + TIMEOUT
            while "ratelimit" not in client.get("/echo/hello", headers=KEY).headers:
                assert time.monotonic() < deadline, "counting did not resume"
            assert values(gw, "app1") == {("hits", "eternity"): 1}
            codes = [client.get("/echo/hello", headers=KEY).status_code for _ in range(5)]
            assert codes == [200] * 4 + [429]
