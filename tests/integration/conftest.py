"""Fixtures of the integration runtime tests: real Redis and RabbitMQ."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from harness import service_url, shared_redis_url, unavailable


@pytest.fixture(scope="session")
def redis_url() -> str:
    return shared_redis_url()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A Redis URL; keys under meshgate:*:<route id> of this test are deleted after it."""
    import redis

    token = uuid.uuid4().hex[:12]
    yield token
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"meshgate:*{token}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """RabbitMQ (MESHGATE_AMQP_URL); skipped with the reason when it does not answer."""
    import aio_pika

    url = service_url("AMQP", "amqp://guest:guest@127.0.0.1:5672/")

    async def probe() -> None:
        connection = await aio_pika.connect(url, timeout=3)
        await connection.close()

    try:
        asyncio.run(probe())
    except Exception as error:
        unavailable(f"RabbitMQ not reachable at {url.split('@')[-1]}: {error}")
    return url
