"""Stopping drains: on SIGTERM a runtime takes no new message, finishes and acknowledges
those in flight, and exits 0; past ``--grace`` (or on a second signal) it leaves them
unacknowledged for the broker. Real brokers, real ``meshgate integration run`` processes."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from harness import free_port, service_url, unavailable
from integration_kit import (
    _runtime,
    run,
    run_routes,
    stopped_mid_route_then_restarted,
    wait_for_log,
)

from meshgate.integration import Exchange, IntegrationContext, from_
from meshgate.integration.testing import mock_endpoint

STEPS = """
    steps:
      - log: "start {{ body }}"
      - delay: 300ms
      - log: "done {{ body }}"
"""


@dataclass
class Source:
    """A broker queue of one test: its ``from`` URI, its settings, the URI to send to."""

    broker: str
    from_uri: str
    settings: dict[str, str]
    send_to: str

    def routes(self, steps: str = STEPS) -> str:
        top = "".join(f'{key}: "{value}"\n' for key, value in self.settings.items())
        return f'{top}routes:\n  - id: slow\n    from: "{self.from_uri}"{steps}'


def _amqp(request: pytest.FixtureRequest) -> Iterator[Source]:
    import aio_pika

    url = request.getfixturevalue("amqp_url")
    queue = f"meshgate-drain-{uuid.uuid4().hex[:10]}"
    yield Source("amqp", f"amqp:queue:{queue}?prefetch=1", {"amqp_url": url}, f"amqp:queue:{queue}")

    async def delete() -> None:
        connection = await aio_pika.connect(url)
        async with connection:
            await (await connection.channel()).queue_delete(queue)

    asyncio.run(delete())


def _nats(request: pytest.FixtureRequest) -> Iterator[Source]:
    import nats

    url = service_url("NATS", "nats://127.0.0.1:4222")
    name = f"mgd-{uuid.uuid4().hex[:10]}"

    async def probe() -> None:
        connection = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
        try:
            await connection.jetstream().account_info()
        finally:
            await connection.close()

    async def delete() -> None:
        connection = await nats.connect(url)
        try:
            await connection.jetstream().delete_stream(name)
        finally:
            await connection.close()

    try:
        asyncio.run(probe())
    except Exception as error:
        unavailable(f"NATS with JetStream not reachable at {url}: {error!r}")
    source = f"nats:{name}.in?stream={name}&durable=slow&ack_wait=5s&servers={url}"
    yield Source("nats", source, {"nats_url": url}, f"nats:{name}.in")
    asyncio.run(delete())


def _redis(request: pytest.FixtureRequest) -> Iterator[Source]:
    import redis

    url = request.getfixturevalue("redis_url")
    stream = f"meshgate-drain-{uuid.uuid4().hex[:10]}"
    yield Source(
        "redis",
        f"redis:{stream}?group=g&consumer=drain&claim_idle=5s",
        {"redis_url": url},
        f"redis:{stream}",
    )
    client = redis.Redis.from_url(url)
    client.delete(stream)
    client.close()


def _mqtt(request: pytest.FixtureRequest) -> Iterator[Source]:
    import aiomqtt

    url = service_url("MQTT", "mqtt://127.0.0.1:1883")
    parts = urlsplit(url)

    async def probe() -> None:
        async with aiomqtt.Client(parts.hostname or "", parts.port or 1883, timeout=3):
            pass

    try:
        asyncio.run(probe())
    except Exception as error:
        unavailable(f"Mosquitto not reachable at {url}: {error!r}")
    topic = f"meshgate-drain/{uuid.uuid4().hex[:10]}"
    source = f"mqtt:{topic}?session_expiry=10s&reconnect_delay=100ms"
    yield Source("mqtt", source, {"mqtt_url": url}, f"mqtt:{topic}")


BROKERS = {"amqp": _amqp, "nats": _nats, "redis": _redis, "mqtt": _mqtt}


@pytest.fixture(params=list(BROKERS))
def source(request: pytest.FixtureRequest) -> Iterator[Source]:
    yield from BROKERS[request.param](request)


def test_sigterm_finishes_what_is_in_flight_and_leaves_the_rest_in_the_broker(
    source: Source, tmp_path: Path
) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(source.routes())
    stopped_mid_route_then_restarted(
        routes, tmp_path / "runtime.log", source.send_to, source.settings
    )


def test_a_failed_message_comes_back_marked_redelivered(source: Source) -> None:
    """Every broker marks a message delivered before; nats and redis count the deliveries."""
    uri = source.from_uri.replace("claim_idle=5s", "claim_idle=100ms")

    def fail_first(exchange: Exchange) -> None:
        if not exchange.properties["redelivered"]:
            raise RuntimeError("the first delivery fails")

    route = from_(uri, id="retry").to("mock:seen").process(fail_first).build()

    async def scenario(context: IntegrationContext) -> None:
        await context.send(source.send_to, b"again")
        seen = await mock_endpoint(context, "mock:seen").wait_for(2)
        assert [e.properties["redelivered"] for e in seen] == [False, True]
        counts = [e.properties.get("delivery_count") for e in seen]
        assert counts == ([1, 2] if source.broker in ("nats", "redis") else [None, None])

    run_routes([route], scenario, settings=source.settings)


def test_exchanges_cut_short_by_the_grace_are_redelivered_to_the_next_consumer(
    source: Source,
) -> None:
    async def main() -> None:
        slow = from_(source.from_uri, id="slow").to("mock:began").delay("30s").build()
        first = IntegrationContext(settings=source.settings)
        first.add_routes([slow])
        await first.start()
        began = mock_endpoint(first, "mock:began")
        await _send(source, b"cut")
        await began.wait_for(1)
        assert await first.stop(grace=0.3) is False
        assert began.received[0].properties["redelivered"] is False
        again = from_(source.from_uri, id="again").to("mock:again").build()
        second = IntegrationContext(settings=source.settings)
        second.add_routes([again])
        await second.start()
        try:
            (redelivered,) = await mock_endpoint(second, "mock:again").wait_for(1, timeout=3)
            assert redelivered.message.body == b"cut"
            assert redelivered.properties["redelivered"] is True
        finally:
            assert await second.stop(grace=2) is True

    run(main)


async def _queued(amqp_url: str, queue: str) -> int:
    import aio_pika

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, durable=True, passive=True)
        return int(declared.declaration_result.message_count)


async def _send(source: Source, body: bytes) -> None:
    context = IntegrationContext(settings=source.settings)
    try:
        assert (await context.send(source.send_to, body)).exception is None
    finally:
        await context.stop()


@pytest.mark.parametrize("cut_by", ["grace", "second signal"])
def test_a_drain_cut_short_leaves_the_message_unacknowledged(
    amqp_url: str, tmp_path: Path, cut_by: str
) -> None:
    queue = f"meshgate-drain-{uuid.uuid4().hex[:10]}"
    source = Source("amqp", f"amqp:queue:{queue}", {"amqp_url": amqp_url}, f"amqp:queue:{queue}")
    routes, log = tmp_path / "routes.yaml", tmp_path / "runtime.log"
    routes.write_text(source.routes(STEPS.replace("300ms", "30s")))
    proc = _runtime(routes, log, "--grace", "0.5" if cut_by == "grace" else "60")
    try:
        wait_for_log(log, "integration routes started", proc)
        run(lambda: _send(source, b"slow"))
        wait_for_log(log, "start slow", proc)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        if cut_by == "second signal":
            wait_for_log(log, "stopping: draining", proc)
            proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 1
        assert time.monotonic() - signalled < 3
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "done slow" not in text
    expected = "forced to stop" if cut_by == "second signal" else "did not finish within 0.5s"
    assert expected in text
    # Not acknowledged: back in the queue for the next runtime.
    assert asyncio.run(_queued(amqp_url, queue)) == 1

    async def delete() -> None:
        import aio_pika

        connection = await aio_pika.connect(amqp_url)
        async with connection:
            await (await connection.channel()).queue_delete(queue)

    asyncio.run(delete())


def test_sigterm_lets_http_requests_in_flight_finish_and_refuses_new_connections(
    tmp_path: Path,
) -> None:
    port = free_port()
    routes, log = tmp_path / "routes.yaml", tmp_path / "runtime.log"
    routes.write_text(
        f"http: {{listen: '127.0.0.1:{port}'}}\n"
        "routes:\n  - id: slow\n    from: 'http:/slow'\n"
        + STEPS.replace(
            '"done {{ body }}"', '"done {{ body }}"\n      - transform: {value: finished}'
        )
    )
    proc = _runtime(routes, log)
    answers: list[httpx.Response] = []
    try:
        wait_for_log(log, "integration routes started", proc)
        client = threading.Thread(
            target=lambda: answers.append(
                httpx.post(f"http://127.0.0.1:{port}/slow", content=b"req", timeout=10)
            )
        )
        client.start()
        wait_for_log(log, "start req", proc)
        proc.send_signal(signal.SIGTERM)
        wait_for_log(log, "stopping: draining", proc)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except ConnectionRefusedError:
                break
            time.sleep(0.01)
        else:
            raise AssertionError("new connections are still accepted while draining")
        client.join(10)
        assert proc.wait(10) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [(a.status_code, a.text) for a in answers] == [(200, "finished")]
    assert "stopped: every in-flight exchange finished" in log.read_text()


def test_stopping_a_seda_route_leaves_new_messages_queued_for_the_next_consumer() -> None:
    route = (
        from_("seda:work?concurrent_consumers=3", id="work").delay("300ms").to("mock:done").build()
    )

    async def main() -> None:
        context = IntegrationContext()
        context.add_routes([route])
        await context.start()
        done = mock_endpoint(context, "mock:done")
        try:
            await context.send("seda:work", "in flight")
            while context.route_stats("work")["inflight"] == 0:
                await asyncio.sleep(0.005)
            stopping = asyncio.ensure_future(context.stop_route("work", grace=5))
            await asyncio.sleep(0.01)
            # Two workers are idle while the third finishes: neither may take these.
            await context.send("seda:work", "queued 1")
            await context.send("seda:work", "queued 2")
            await stopping
            assert done.bodies == ["in flight"]
            assert context.endpoint("seda:work").queue.qsize() == 2  # type: ignore[attr-defined]
            await context.start_route("work")
            await done.wait_for(3)
            assert done.bodies == ["in flight", "queued 1", "queued 2"]
        finally:
            await context.stop(grace=2)

    run(main)


def test_a_context_stop_drains_a_route_before_the_direct_route_it_calls() -> None:
    routes = [
        from_("seda:first", id="first").delay("200ms").to("direct:last").build(),
        from_("direct:last", id="last").to("mock:last").build(),
    ]

    async def main() -> None:
        context = IntegrationContext()
        context.add_routes(routes)
        await context.start()
        await context.send("seda:first", "m")
        while context.route_stats("first")["inflight"] == 0:
            await asyncio.sleep(0.005)
        last = mock_endpoint(context, "mock:last")
        assert await context.stop(grace=5) is True
        assert last.bodies == ["m"]
        assert context.route_stats("first") == {"inflight": 0, "completed": 1, "failed": 0}

    run(main)


def test_a_seda_exchange_cut_off_at_the_deadline_fails_for_its_in_out_caller() -> None:
    routes = [
        from_("seda:slow", id="slow").delay("2s").to("mock:never").build(),
        from_("direct:call", id="caller").to("seda:slow").to("mock:after").build(),
    ]

    async def main() -> None:
        context = IntegrationContext()
        context.add_routes(routes)
        await context.start()
        try:
            calling = asyncio.ensure_future(context.request("direct:call", "m"))
            while context.route_stats("slow")["inflight"] == 0:
                await asyncio.sleep(0.005)
            await context.stop_route("slow", grace=0.1)
            with pytest.raises(Exception, match="the route stopped before the exchange completed"):
                await calling
            assert mock_endpoint(context, "mock:after").bodies == []
        finally:
            await context.stop(grace=1)

    run(main)


def test_a_timer_whose_stop_is_cut_off_fires_no_more() -> None:
    route = from_("timer:t?period=50ms&delay=0", id="t").to("mock:fired").delay("200ms").build()

    async def main() -> None:
        context = IntegrationContext()
        context.add_routes([route])
        await context.start()
        fired = mock_endpoint(context, "mock:fired")
        try:
            await fired.wait_for(1)
            await context.remove_route("t", grace=0.05)  # the firing in progress is cut off
            count = len(fired.bodies)
            await asyncio.sleep(0.5)  # a timer still running would fire twice meanwhile
            assert len(fired.bodies) == count
        finally:
            await context.stop(grace=1)

    run(main)


def _slow_http_route(port: int, delay: str) -> list[object]:
    return [from_("http:/slow?method=POST", id="slow").delay(delay).transform("finished").build()]


def test_an_http_request_in_flight_gets_the_whole_grace_not_a_fixed_five_seconds() -> None:
    port = free_port()

    async def main() -> None:
        context = IntegrationContext(settings={"http_listen": f"127.0.0.1:{port}"})
        context.add_routes(_slow_http_route(port, "5500ms"))  # type: ignore[arg-type]
        await context.start()
        async with httpx.AsyncClient(timeout=15) as client:
            request = asyncio.ensure_future(client.post(f"http://127.0.0.1:{port}/slow"))
            while context.route_stats("slow")["inflight"] == 0:
                await asyncio.sleep(0.01)
            assert await context.stop(grace=8)
            reply = await request
        assert (reply.status_code, reply.text) == (200, "finished")

    run(main)


def test_an_http_request_past_the_grace_is_cut_off_at_the_deadline() -> None:
    port = free_port()

    async def main() -> None:
        context = IntegrationContext(settings={"http_listen": f"127.0.0.1:{port}"})
        context.add_routes(_slow_http_route(port, "3s"))  # type: ignore[arg-type]
        await context.start()
        async with httpx.AsyncClient(timeout=10) as client:
            request = asyncio.ensure_future(client.post(f"http://127.0.0.1:{port}/slow"))
            while context.route_stats("slow")["inflight"] == 0:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            assert not await context.stop(grace=0.3)
            with pytest.raises(httpx.HTTPError):
                await request  # the connection is closed at the deadline, not left hanging
            assert time.monotonic() - started < 1.5

    run(main)
