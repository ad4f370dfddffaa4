"""Fixtures for the counter backends: Redis to test against, private key prefixes, both kinds."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Awaitable, Callable, Iterator

import pytest
import redis
from harness import shared_redis_url, unavailable

from meshgate.limits import CounterBackend, MemoryCounters, RedisCounters

Scenario = Callable[[CounterBackend], Awaitable[None]]


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared Redis the tests may write to (under their own key prefixes only)."""
    return shared_redis_url()


@pytest.fixture(scope="session")
def redis_server_binary() -> str:
    """The redis-server program, for tests that start (and kill) a Redis of their own."""
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("no redis-server binary on PATH to run a private Redis")
    return binary  # type: ignore[return-value]


@pytest.fixture
def key_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test alone; its keys are deleted afterwards."""
    prefix = f"meshgate-test-{uuid.uuid4().hex}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(params=["memory", "redis"])
def with_backend(request: pytest.FixtureRequest) -> Callable[[Scenario], None]:
    """Run a scenario against a fresh backend of each kind, in its own event loop."""

    def make() -> CounterBackend:
        if request.param == "memory":
            return MemoryCounters()
        url = request.getfixturevalue("redis_url")
        return RedisCounters(url, timeout=5.0, key_prefix=request.getfixturevalue("key_prefix"))

    def run(scenario: Scenario) -> None:
        backend = make()

        async def main() -> None:
            try:
                await scenario(backend)
            finally:
                await backend.close()

        asyncio.run(main())

    return run
