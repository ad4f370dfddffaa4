"""The Redis counter backend end to end: exact limits across worker processes, and what
happens while Redis is down and after it returns."""

from __future__ import annotations

import asyncio
import copy
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from gateway_e2e_support import (
    TIMEOUT,
    drop_keys,
    private_redis,
    sample_sum,
    scrape,
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


def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(tmp_path: Path) -> None:
    plans = [{"name": "basic", "limits": [{"metric": "hits", "period": "eternity", "value": 99}]}]
    with private_redis(tmp_path) as redis_server, echo_upstream(tmp_path) as upstream:
        deny = gateway_config(
            [example_product(upstream, plans=plans)],
            limits=redis_limits(redis_server.url, "deny"),
        )
        allow = gateway_config(
            [example_product(upstream, plans=plans)],
            limits=redis_limits(redis_server.url, "allow", on_backend_error="allow"),
        )
        with (
            run_gateway(deny, tmp_path, name="deny") as denying,
            run_gateway(allow, tmp_path, name="allow") as allowing,
        ):
            # What each answer was: refused (503), let through uncounted (no RateLimit
            # fields), or counted.
            seen: dict[str, Counter[str]] = {"deny": Counter(), "allow": Counter()}

            def counted(gw: Any, name: str) -> bool:
                answer = httpx.get(f"{gw.url}/echo/x", headers=KEY, timeout=TIMEOUT)
                if answer.status_code == 503:
                    kind = "refused"
                else:
                    assert answer.status_code == 200, answer.text
                    kind = "counted" if "ratelimit" in answer.headers else "uncounted"
                seen[name][kind] += 1
                return kind == "counted"

            assert counted(denying, "deny") and counted(allowing, "allow")
            redis_server.stop()
            for _ in range(7):
                assert not counted(denying, "deny") and not counted(allowing, "allow")
            # A reload in the middle of an outage neither ends it nor starts another.
            reloaded = copy.deepcopy(deny)
            reloaded["products"][0]["applications"].append({"id": "app2", "plan": "basic"})
            denying.write_config(reloaded)
            wait_for(
                lambda: sample_sum(scrape(denying), "meshgate_config_reloads_total") == 1,
                what="the reload",
            )
            assert not counted(denying, "deny")
            redis_server.start()
            wait_for(lambda: counted(denying, "deny"), what="deny: counting again")
            wait_for(lambda: counted(allowing, "allow"), what="allow: counting again")
            for _ in range(3):
                assert counted(denying, "deny") and counted(allowing, "allow")
            assert seen["deny"]["refused"] >= 7 and seen["deny"]["uncounted"] == 0
            assert seen["allow"]["uncounted"] >= 7 and seen["allow"]["refused"] == 0

            for name, gw, during in (
                ("deny", denying, "refusing requests (503)"),
                ("allow", allowing, "letting requests through uncounted"),
            ):
                log = gw.proc.stderr()
                assert log.count("usage limits unavailable") == 1, log
                assert f"usage limits unavailable, {during} until the counter backend" in log
                assert log.count("usage limits available again") == 1, log
                refused, uncounted = seen[name]["refused"], seen[name]["uncounted"]
                assert (
                    f"meanwhile {refused} requests were refused (503) and {uncounted} let "
                    "through uncounted" in log
                ), log


def test_a_redis_stall_counts_only_the_requests_let_through(tmp_path: Path) -> None:
    plans = [
        {"name": "basic", "limits": [{"metric": "hits", "period": "eternity", "value": 10**6}]}
    ]
    with private_redis(tmp_path) as redis_server, echo_upstream(tmp_path) as upstream:
        limits = redis_limits(redis_server.url, "stall", redis_timeout=0.3)
        config = gateway_config([example_product(upstream, plans=plans)], limits=limits)
        with run_gateway(config, tmp_path) as gw:
            codes: Counter[int] = Counter()
            stop = threading.Event()

            def client() -> None:
                with httpx.Client(base_url=gw.url, timeout=TIMEOUT) as http:
                    while not stop.is_set():
                        code = http.get("/echo/x", headers=KEY).status_code
                        with lock:
                            codes[code] += 1

            lock = threading.Lock()
            threads = [threading.Thread(target=client) for _ in range(6)]
            for thread in threads:
                thread.start()
            assert redis_server.popen is not None
            try:
                time.sleep(0.5)
                # Redis stops reading and answering (a long command, a fork, a paused VM),
                # then resumes and runs what it had read meanwhile.
                redis_server.popen.send_signal(signal.SIGSTOP)
                time.sleep(0.8)
            finally:
                redis_server.popen.send_signal(signal.SIGCONT)
            time.sleep(0.5)
            stop.set()
            for thread in threads:
                thread.join(TIMEOUT)
            time.sleep(0.5)
            assert set(codes) == {200, 503} and codes[503] >= 6, codes
            # Every request let through is counted, and none of those refused.
            assert values(gw, "app1") == {("hits", "eternity"): codes[200]}, codes
