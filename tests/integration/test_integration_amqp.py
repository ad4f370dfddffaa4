"""The amqp connector against a real RabbitMQ: publish, consume, acknowledge at least once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration_kit import (
    dead_lettered_once,
    killed_mid_route_then_restarted,
    redelivered_after_one_failure,
    run_routes,
)

from meshgate.integration import IntegrationContext, from_
from meshgate.integration.testing import mock_endpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def queue(amqp_url: str) -> Iterator[str]:
    """A queue name of this test alone, deleted afterwards."""
    import aio_pika

    name = f"meshgate-test-{uuid.uuid4().hex[:10]}"
    yield name

    async def delete() -> None:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            for suffix in ("", "-dead"):
                await channel.queue_delete(name + suffix)

    asyncio.run(delete())


async def _count(amqp_url: str, name: str) -> int:
    import aio_pika

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(name, durable=True, passive=True)
        return int(declared.declaration_result.message_count)


def test_publish_and_consume_with_headers(amqp_url: str, queue: str) -> None:
    routes = [
        from_("direct:in", id="publish").to(f"amqp:queue:{queue}").build(),
        from_(f"amqp:queue:{queue}", id="consume").unmarshal("json").to("mock:out").build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        await context.send("direct:in", {"id": 1}, {"tenant": "acme"})
        received = await mock_endpoint(context, "mock:out").wait_for(1)
        assert received[0].body == {"id": 1}
        assert received[0].headers["tenant"] == "acme"
        assert received[0].headers["content-type"] == "application/json"
        await asyncio.sleep(0.05)
        assert await _count(amqp_url, queue) == 0

    run_routes(routes, scenario, settings={"amqp_url": amqp_url})


def test_a_failed_route_returns_the_message_for_redelivery(amqp_url: str, queue: str) -> None:
    async def settled() -> None:
        assert await _count(amqp_url, queue) == 0

    received = redelivered_after_one_failure(
        f"amqp:queue:{queue}", f"amqp:queue:{queue}", {"amqp_url": amqp_url}, settled
    )
    assert received.properties["redelivered"] is True


def test_the_dead_letter_channel_ends_redelivery(amqp_url: str, queue: str) -> None:
    async def settled() -> None:
        assert await _count(amqp_url, queue) == 0

    dead = f"amqp:queue:{queue}-dead"
    uri = f"amqp:queue:{queue}"
    dead_lettered_once(uri, uri, dead, dead, {"amqp_url": amqp_url}, settled)


def test_a_runtime_killed_mid_route_loses_nothing(
    amqp_url: str, queue: str, tmp_path: Path
) -> None:
    done = tmp_path / "done.txt"
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        f"""
amqp_url: "{amqp_url}"
routes:
  - id: slow
    from: amqp:queue:{queue}
    steps:
      - delay: 300ms
      - to: direct:record
  - id: record
    from: direct:record
    steps:
      - log: "done {{{{ body }}}}"
"""
    )

    killed_mid_route_then_restarted(routes, done, f"amqp:queue:{queue}", {"amqp_url": amqp_url})
    assert asyncio.run(_count(amqp_url, queue)) == 0
