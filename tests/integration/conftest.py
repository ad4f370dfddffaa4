"""Fixtures of the integration runtime tests: real Redis and RabbitMQ."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

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


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL of each kind the sql connector and repositories support: a SQLite
    file, and PostgreSQL (MESHGATE_DATABASE_URL) in a schema of this test alone."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'integration.db'}"
        return
    import psycopg

    base = service_url("DATABASE", "postgresql://postgres@127.0.0.1:5432/test")
    try:
        admin = psycopg.connect(base, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL not reachable at {base}: {str(exc).strip()[:200]}")
    schema = f"mg_it_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        sep = "&" if "?" in base else "?"
        try:
            yield f"{base}{sep}options={quote(f'-csearch_path={schema}')}"
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
