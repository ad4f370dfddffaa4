"""The nats connector against a real NATS with JetStream: publish, consume, ack at least once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import service_url, unavailable
from integration_kit import (
    dead_lettered_once,
    killed_mid_route_then_restarted,
    redelivered_after_one_failure,
    run_routes,
)

from meshgate.integration import IntegrationContext, from_
from meshgate.integration._errors import EndpointError, IntegrationError
from meshgate.integration.testing import mock_endpoint


@pytest.fixture(scope="session")
def nats_url() -> str:
    """NATS with JetStream (MESHGATE_NATS_URL); skipped with the reason when it does not answer."""
    import nats

    url = service_url("NATS", "nats://127.0.0.1:4222")

    async def probe() -> None:
        connection = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
        try:
            await connection.jetstream().account_info()
        finally:
            await connection.close()

    try:
        asyncio.run(probe())
    except Exception as error:
        unavailable(f"NATS with JetStream not reachable at {url}: {error!r}")
    return url


@pytest.fixture
def name(nats_url: str) -> Iterator[str]:
    """A subject prefix and stream name of this test alone; its streams are deleted afterwards."""
    import nats

    token = f"mgt-{uuid.uuid4().hex[:10]}"
    yield token

    async def delete() -> None:
        connection = await nats.connect(nats_url)
        try:
            js = connection.jetstream()
            for stream in await js.streams_info():
                if stream.config.name.startswith(token):
                    await js.delete_stream(stream.config.name)
        finally:
            await connection.close()

    asyncio.run(delete())


async def _unacknowledged(nats_url: str, stream: str, durable: str) -> tuple[int, int]:
    """(messages not yet delivered, messages delivered but not acknowledged)."""
    import nats

    connection = await nats.connect(nats_url)
    try:
        info = await connection.jetstream().consumer_info(stream, durable)
        return int(info.num_pending or 0), int(info.num_ack_pending or 0)
    finally:
        await connection.close()


def test_a_route_consumes_transforms_and_publishes(nats_url: str, name: str) -> None:
    routes = [
        from_("direct:in", id="publish").to(f"nats:{name}.in?stream={name}").build(),
        from_(f"nats:{name}.in?stream={name}&durable=transform", id="transform")
        .unmarshal("json")
        .transform(template='{"total": {{ body.total * 2 }}}')
        .to(f"nats:{name}.out?stream={name}-out")
        .build(),
        from_(f"nats:{name}.out?stream={name}-out", id="out").to("mock:out").build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        await context.send("direct:in", {"total": 21}, {"tenant": "acme"})
        received = (await mock_endpoint(context, "mock:out").wait_for(1))[0]
        assert received.body == b'{"total": 42}'
        assert received.headers["tenant"] == "acme"
        assert received.headers["content-type"] == "application/json"
        assert received.headers["nats_subject"] == f"{name}.out"
        await asyncio.sleep(0.05)
        assert await _unacknowledged(nats_url, name, "transform") == (0, 0)

    run_routes(routes, scenario, settings={"nats_url": nats_url})


def test_a_failed_route_is_redelivered_by_jetstream(nats_url: str, name: str) -> None:
    async def settled() -> None:
        assert await _unacknowledged(nats_url, name, "main") == (0, 0)

    received = redelivered_after_one_failure(
        f"nats:{name}.in?stream={name}",
        f"nats:{name}.in?stream={name}&durable=main",
        {"nats_url": nats_url},
        settled,
    )
    assert received.properties["redelivered"] is True
    assert received.properties["delivery_count"] == 2


def test_the_dead_letter_channel_ends_redelivery(nats_url: str, name: str) -> None:
    async def settled() -> None:
        assert await _unacknowledged(nats_url, name, "main") == (0, 0)

    dead = f"nats:{name}.dead?stream={name}-dead"
    dead_lettered_once(
        f"nats:{name}.in?stream={name}",
        f"nats:{name}.in?stream={name}&durable=main",
        dead,
        dead,
        {"nats_url": nats_url},
        settled,
    )


def test_concurrent_consumers_share_the_durable_consumer(nats_url: str, name: str) -> None:
    routes = [
        from_(f"nats:{name}.in?stream={name}&durable=shared&concurrent_consumers=3", id="c")
        .delay("50ms")
        .to("mock:out")
        .build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        for number in range(12):
            await context.send(f"nats:{name}.in", str(number))
        received = await mock_endpoint(context, "mock:out").wait_for(12)
        assert sorted(int(message.body) for message in received) == list(range(12))
        await asyncio.sleep(0.1)
        assert len(mock_endpoint(context, "mock:out").received) == 12
        assert await _unacknowledged(nats_url, name, "shared") == (0, 0)

    run_routes(routes, scenario, settings={"nats_url": nats_url})


def test_stopping_drains_the_exchange_in_flight(nats_url: str, name: str) -> None:
    routes = [
        from_(f"nats:{name}.in?stream={name}&durable=slow", id="slow")
        .delay("300ms")
        .to("mock:out")
        .build(),
    ]

    async def main() -> None:
        context = IntegrationContext(settings={"nats_url": nats_url})
        context.add_routes(routes)
        await context.start()
        await context.send(f"nats:{name}.in", b"m")
        await asyncio.sleep(0.15)
        await context.stop(grace=5.0)
        assert mock_endpoint(context, "mock:out").bodies == [b"m"]

    asyncio.run(asyncio.wait_for(main(), 30))
    assert asyncio.run(_unacknowledged(nats_url, name, "slow")) == (0, 0)


def test_bad_uris_and_a_subject_without_stream_are_clear_errors(nats_url: str, name: str) -> None:
    context = IntegrationContext(settings={"nats_url": nats_url})
    with pytest.raises(EndpointError, match="unknown option 'prefetch'"):
        context.endpoint("nats:orders?prefetch=3")
    with pytest.raises(EndpointError, match="option 'batch' must be between 1 and 1000"):
        context.endpoint("nats:orders?batch=0")
    with pytest.raises(EndpointError, match="write nats:SUBJECT"):
        context.endpoint("nats:orders..created")
    with pytest.raises(EndpointError, match="wildcard"):
        context.endpoint("nats:orders.*").create_producer()

    async def start() -> None:
        context.add_routes([from_(f"nats:{name}.nowhere", id="r").to("mock:x").build()])
        try:
            await context.start()
        finally:
            await context.stop()

    with pytest.raises(IntegrationError, match="no JetStream stream covers subject"):
        asyncio.run(start())


def test_a_runtime_killed_mid_route_loses_nothing(nats_url: str, name: str, tmp_path: Path) -> None:
    log_path = tmp_path / "runtime.log"
    routes = tmp_path / "routes.yaml"
    source = f"nats:{name}.in?stream={name}&durable=slow&ack_wait=1s&servers={nats_url}"
    routes.write_text(
        f"""
routes:
  - id: slow
    from: "{source}"
    steps:
      - delay: 300ms
      - log: "done {{{{ body }}}}"
"""
    )

    killed_mid_route_then_restarted(routes, log_path, f"nats:{name}.in", {"nats_url": nats_url})
    assert asyncio.run(_unacknowledged(nats_url, name, "slow")) == (0, 0)
