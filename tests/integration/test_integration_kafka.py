"""The kafka connector: its options and commit bookkeeping without a broker, then produce,
consume, commit, redeliver and survive a crash against a real Kafka-protocol broker."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from integration_kit import killed_mid_route_then_restarted, run_routes
from kafka_support import kafka_url_fixture  # noqa: F401  (the kafka_url fixture)
from typer.testing import CliRunner

from meshgate.integration import Exchange, IntegrationContext, RouteStartError, from_
from meshgate.integration._errors import EndpointError, IntegrationError
from meshgate.integration._model import ErrorHandler
from meshgate.integration.cli import app
from meshgate.integration.components.kafka import OffsetTracker, parse_bootstrap_servers
from meshgate.integration.testing import mock_endpoint

# A short session makes a group settle fast on a test broker; redeliveries come at once.
FAST = "session_timeout=1s&redelivery_delay=0"


# Without a broker: commit bookkeeping, options, settings, unreachable brokers.


def test_out_of_order_completion_commits_only_the_completed_prefix() -> None:
    tracker = OffsetTracker()
    for offset in (10, 11, 12, 14):  # offset 13 is a gap (compaction, a transaction marker)
        assert tracker.start("p0", offset) is False
    assert tracker.to_commit() == {"p0": 10}
    tracker.complete("p0", 12)
    tracker.complete("p0", 14)
    assert tracker.to_commit() == {"p0": 10}  # 10 and 11 still run
    tracker.complete("p0", 10)
    assert tracker.to_commit() == {"p0": 11}
    tracker.committed({"p0": 11})
    assert tracker.to_commit() == {}  # nothing new to commit
    tracker.complete("p0", 11)
    assert tracker.commit_point("p0") == 15  # one past the highest, across the gap
    assert tracker.to_commit() == {"p0": 15}
    assert tracker.running("p0") == 0


def test_partitions_are_tracked_apart_and_a_failure_holds_the_commit_back() -> None:
    tracker = OffsetTracker()
    tracker.start("p0", 0)
    tracker.start("p0", 1)
    tracker.start("p0", 2)
    tracker.start("p1", 7)
    tracker.complete("p1", 7)
    tracker.fail("p0", 1)
    tracker.complete("p0", 0)
    tracker.complete("p0", 2)
    assert tracker.to_commit() == {"p0": 1, "p1": 8}
    assert tracker.running("p0") == 0
    # Rewound, the partition is consumed again from the failure; those are redeliveries.
    assert tracker.rewind("p0") == 1
    assert tracker.start("p0", 1) is True
    assert tracker.start("p0", 2) is True
    assert tracker.start("p0", 3) is False
    for offset in (1, 2, 3):
        tracker.complete("p0", offset)
    assert tracker.to_commit()["p0"] == 4
    tracker.forget(["p0"])
    assert tracker.commit_point("p0") is None
    assert tracker.to_commit() == {"p1": 8}


def test_the_tracker_refuses_what_would_commit_past_unfinished_messages() -> None:
    tracker = OffsetTracker()
    tracker.start("p0", 5)
    with pytest.raises(ValueError, match="started after 5"):
        tracker.start("p0", 4)
    with pytest.raises(ValueError, match="still running"):
        tracker.rewind("p0")
    assert tracker.commit_point("never") is None


def test_bootstrap_servers_are_host_port_lists() -> None:
    assert parse_bootstrap_servers("127.0.0.1:9092") == ["127.0.0.1:9092"]
    assert parse_bootstrap_servers("kafka://a:1, b:2/") == ["a:1", "b:2"]
    assert parse_bootstrap_servers("broker") == ["broker:9092"]
    assert parse_bootstrap_servers("[::1]:9093,[::1]") == ["[::1]:9093", "[::1]:9092"]
    for bad, why in [
        ("http://a:1", "not host:port"),
        ("a:0", "between 1 and 65535"),
        ("a:99999", "between 1 and 65535"),
        ("a:x", "between 1 and 65535"),
        ("a:1,,b:2", "is not host:port"),
        ("a b:1", "is not host:port"),
        (",".join(["a:1"] * 33), "more than 32"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_bootstrap_servers(bad)


def test_validate_reports_every_bad_kafka_option(tmp_path: Path) -> None:
    from aiokafka import codec

    bad = {
        "kafka:orders?acks=2": "option 'acks' must be one of all, -1, 1, 0",
        "kafka:orders?auto_offset_reset=first": "option 'auto_offset_reset' must be one of",
        "kafka:orders?group_id=a%20b": "option 'group_id' must be 1 to 255 letters",
        "kafka:orders?max_poll_records=0": "option 'max_poll_records' must be between 1",
        "kafka:orders?concurrent_consumers=101": "'concurrent_consumers' must be between 1 and",
        "kafka:orders?linger=2h": "option 'linger' must be between 0s and 60s",
        "kafka:orders?session_timeout=soon": "option 'session_timeout' must be a duration",
        "kafka:orders?brokers=http://x:1": "option 'brokers': 'http://x:1' is not host:port",
        "kafka:orders?compression=brotli": "option 'compression' must be one of none, gzip",
        "kafka:orders?prefetch=3": "unknown option 'prefetch'",
        "kafka:or/ders": "write kafka:TOPIC",
        "kafka:" + "t" * 250: "write kafka:TOPIC",
    }
    if not codec.has_zstd():
        bad["kafka:orders?compression=zstd"] = "zstd needs the cramjam package"
    steps = "\n".join(f'      - to: "{uri}"' for uri in bad)
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        f"""
kafka_url: "kafka://127.0.0.1:9092"
routes:
  - id: r
    from: "kafka:orders?group_id=billing&auto_offset_reset=earliest&max_poll_records=50"
    steps:
{steps}
      - to: "kafka:events?key=k&acks=1&linger=5ms&compression=gzip&brokers=a:1,b:2"
"""
    )
    result = CliRunner().invoke(app, ["validate", str(routes)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == len(bad), result.output
    for (uri, why), line in zip(bad.items(), lines, strict=True):
        assert why in line, (uri, line)
        assert "routes[0].steps" in line

    routes.write_text(routes.read_text().replace(steps + "\n", ""))
    good = CliRunner().invoke(app, ["validate", str(routes)])
    assert good.exit_code == 0, good.output


def test_consuming_needs_a_group_and_a_bad_kafka_url_is_named() -> None:
    async def main() -> None:
        context = IntegrationContext(settings={"kafka_url": "kafka://host:notaport"})
        with pytest.raises(EndpointError, match=r"kafka:TOPIC\?group_id=NAME"):
            context.endpoint("kafka:orders").create_consumer(lambda exchange: asyncio.sleep(0))
        producer = context.endpoint("kafka:orders").create_producer()
        with pytest.raises(IntegrationError, match="the kafka_url setting: .*host:notaport"):
            await producer.start()

    asyncio.run(main())


@pytest.fixture
def closed_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]  # bound, not listening: connections are refused


def test_an_unreachable_broker_fails_the_start_quickly_and_clearly(closed_port: int) -> None:
    routes = [
        from_("kafka:orders?group_id=g", id="consume").to("mock:out").build(),
        from_("direct:in", id="produce").to("kafka:orders").build(),
    ]

    async def main() -> None:
        context = IntegrationContext(settings={"kafka_url": f"127.0.0.1:{closed_port}"})
        context.add_routes(routes)
        started = time.monotonic()
        with pytest.raises(RouteStartError) as caught:
            await context.start()
        assert time.monotonic() - started < 5
        for route_id in ("consume", "produce"):
            error = context.route_error(route_id) or ""
            assert "IntegrationError" in error
            assert f"cannot connect to Kafka at 127.0.0.1:{closed_port}" in error
        assert set(caught.value.failures) == {"consume", "produce"}
        await context.stop()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_broker_that_never_answers_is_bounded_by_connect_timeout() -> None:
    """A listener that accepts and stays silent: the start gives up after connect_timeout."""

    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        context = IntegrationContext(settings={"kafka_url": f"kafka://127.0.0.1:{port}"})
        producer = context.endpoint("kafka:orders?connect_timeout=300ms").create_producer()
        started = time.monotonic()
        with pytest.raises(IntegrationError, match="no answer within 0.3s"):
            await producer.start()
        assert time.monotonic() - started < 3
        server.close()

    asyncio.run(asyncio.wait_for(main(), 20))


# Against a broker.


@pytest.fixture
def topic(kafka_url: str) -> str:
    """A topic of this test alone, with one partition (so order is the topic's order)."""
    name = f"meshgate-test-{uuid.uuid4().hex[:10]}"
    asyncio.run(_create_topic(kafka_url, name, 1))
    return name


async def _create_topic(kafka_url: str, name: str, partitions: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_url)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def _committed(kafka_url: str, topic: str, group: str, partition: int = 0) -> int | None:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_url,
        group_id=group,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        offset: int | None = await consumer.committed(TopicPartition(topic, partition))
        return offset
    finally:
        await consumer.stop()


async def _until(check: Callable[[], Awaitable[bool] | bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def _committed_is(
    kafka_url: str,
    topic: str,
    group: str,
    expected: int,
    partition: int = 0,
) -> bool:
    return await _committed(kafka_url, topic, group, partition) == expected


def test_produce_consume_and_commit_with_headers_and_keys(kafka_url: str, topic: str) -> None:
    routes = [
        from_("direct:in", id="publish").to(f"kafka:{topic}?key=by-option").build(),
        from_(f"kafka:{topic}?group_id=g1&auto_offset_reset=earliest&{FAST}", id="consume")
        .to("mock:out")
        .build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        sent = await context.send("direct:in", {"id": 1}, {"tenant": "acme", "http_path": "/x"})
        assert sent.exception is None
        await context.send("direct:in", "second", {"kafka_key": "by-header", "n": 7})
        await context.send("direct:in", b"\xff\xfe", {"kafka_key": b"\x00\xff", "raw": b"\xc3"})
        received = await mock_endpoint(context, "mock:out").wait_for(3)
        first, second, third = (exchange.message for exchange in received)
        assert first.body == b'{"id":1}'
        assert first.headers["content-type"] == "application/json"
        assert first.headers["tenant"] == "acme"
        assert "http_path" not in first.headers  # internal headers are not sent
        assert first.headers["kafka_key"] == "by-option"
        assert first.headers["kafka_topic"] == topic
        assert first.headers["kafka_partition"] == 0
        assert [m.headers["kafka_offset"] for m in (first, second, third)] == [0, 1, 2]
        assert abs(first.headers["kafka_timestamp"] / 1000 - time.time()) < 60
        assert second.body == b"second"
        assert second.headers["kafka_key"] == "by-header"
        assert second.headers["n"] == "7"
        assert "content-type" not in second.headers
        # Bytes that are not UTF-8 stay bytes.
        assert third.body == b"\xff\xfe"
        assert third.headers["kafka_key"] == b"\x00\xff"
        assert third.headers["raw"] == b"\xc3"
        assert received[0].properties["redelivered"] is False
        await _until(lambda: _committed_is(kafka_url, topic, "g1", 3))

    run_routes(routes, scenario, settings={"kafka_url": f"kafka://{kafka_url}"})


def test_a_failed_exchange_is_consumed_again_in_order(kafka_url: str, topic: str) -> None:
    attempts: list[bytes] = []

    def flaky(exchange: Exchange) -> None:
        attempts.append(exchange.body)
        if exchange.body == b"m2" and attempts.count(b"m2") == 1:
            raise ConnectionError("database down")

    routes = [
        from_("direct:in", id="publish").to(f"kafka:{topic}").build(),
        from_(f"kafka:{topic}?group_id=g&auto_offset_reset=earliest&{FAST}", id="consume")
        .process(flaky)
        .to("mock:out")
        .build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        for body in (b"m1", b"m2", b"m3"):
            await context.send("direct:in", body)
        received = await mock_endpoint(context, "mock:out").wait_for(3)
        assert [exchange.body for exchange in received] == [b"m1", b"m2", b"m3"]
        assert [exchange.properties["redelivered"] for exchange in received] == [
            False,
            True,
            False,
        ]
        assert attempts == [b"m1", b"m2", b"m2", b"m3"]
        await _until(lambda: _committed_is(kafka_url, topic, "g", 3))

    run_routes(routes, scenario, settings={"kafka_url": kafka_url})


def test_the_dead_letter_channel_ends_redelivery_and_commits(kafka_url: str, topic: str) -> None:
    handler = ErrorHandler(dead_letter="mock:dead", maximum_redeliveries=1)

    def broken(exchange: Exchange) -> None:
        if exchange.body == b"poison":
            raise ValueError("cannot process")

    routes = [
        from_("direct:in", id="publish").to(f"kafka:{topic}").build(),
        from_(
            f"kafka:{topic}?group_id=g&auto_offset_reset=earliest&{FAST}",
            id="consume",
            error_handler=handler,
        )
        .process(broken)
        .to("mock:out")
        .build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        await context.send("direct:in", b"poison")
        await context.send("direct:in", b"fine")
        dead = (await mock_endpoint(context, "mock:dead").wait_for(1))[0]
        assert dead.body == b"poison"
        assert dead.headers["dead_letter_cause"] == "ValueError: cannot process"
        assert dead.headers["kafka_offset"] == 0
        assert (await mock_endpoint(context, "mock:out").wait_for(1))[0].body == b"fine"
        await _until(lambda: _committed_is(kafka_url, topic, "g", 2))
        assert len(mock_endpoint(context, "mock:dead").received) == 1

    run_routes(routes, scenario, settings={"kafka_url": kafka_url})


def test_concurrent_exchanges_finishing_out_of_order_commit_in_order(
    kafka_url: str,
    topic: str,
) -> None:
    release = {i: asyncio.Event() for i in range(4)}
    finished: list[int] = []

    async def held(exchange: Exchange) -> None:
        n = int(exchange.body)
        await release[n].wait()
        finished.append(n)

    routes = [
        from_("direct:in", id="publish").to(f"kafka:{topic}").build(),
        from_(
            f"kafka:{topic}?group_id=g&auto_offset_reset=earliest&concurrent_consumers=4&{FAST}",
            id="consume",
        )
        .process(held)
        .build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        for i in range(4):
            await context.send("direct:in", str(i))
        await _until(lambda: context.route_stats("consume")["inflight"] == 4)
        for n in (3, 1, 2):
            release[n].set()
        await _until(lambda: len(finished) == 3)
        await asyncio.sleep(0.2)  # a commit past offset 0 would have happened by now
        assert await _committed(kafka_url, topic, "g") == 0
        release[0].set()
        await _until(lambda: _committed_is(kafka_url, topic, "g", 4))
        assert finished == [3, 1, 2, 0]

    run_routes(routes, scenario, settings={"kafka_url": kafka_url})


def test_stopping_drains_the_exchange_in_flight_and_commits(kafka_url: str, topic: str) -> None:
    routes = [
        from_(f"kafka:{topic}?group_id=g&auto_offset_reset=earliest&{FAST}", id="slow")
        .delay("300ms")
        .to("mock:out")
        .build()
    ]

    async def main() -> None:
        context = IntegrationContext(settings={"kafka_url": kafka_url})
        context.add_routes(routes)
        await context.start()
        await context.send(f"kafka:{topic}", b"m")
        await _until(lambda: context.route_stats("slow")["inflight"] == 1)
        await context.stop(grace=5.0)
        assert mock_endpoint(context, "mock:out").bodies == [b"m"]

    asyncio.run(asyncio.wait_for(main(), 30))
    assert asyncio.run(_committed(kafka_url, topic, "g")) == 1


def test_a_runtime_killed_mid_route_loses_nothing(
    kafka_url: str,
    topic: str,
    tmp_path: Path,
) -> None:
    done = tmp_path / "done.txt"
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        f"""
kafka_url: "{kafka_url}"
routes:
  - id: slow
    from: "kafka:{topic}?group_id=g&session_timeout=1s"
    steps:
      - delay: 300ms
      - log: "done {{{{ body }}}}"
"""
    )
    # The default auto_offset_reset (latest) is used: the first runtime pins the start.
    killed_mid_route_then_restarted(routes, done, f"kafka:{topic}", {"kafka_url": kafka_url})
    assert asyncio.run(_committed(kafka_url, topic, "g")) == 1


def test_a_rebalance_lets_in_flight_exchanges_finish_and_commit_first(kafka_url: str) -> None:
    """A second member joins while the first has both partitions' messages in its route:
    the first finishes and commits them before handing a partition over, so none runs twice."""
    name = f"meshgate-test-{uuid.uuid4().hex[:10]}"
    asyncio.run(_create_topic(kafka_url, name, 2))
    uri = f"kafka:{name}?group_id=g&auto_offset_reset=earliest&concurrent_consumers=2&{FAST}"

    def member() -> IntegrationContext:
        context = IntegrationContext(settings={"kafka_url": kafka_url})
        context.add_routes([from_(uri, id="slow").delay("400ms").to("mock:out").build()])
        return context

    async def main() -> None:
        first, second = member(), member()
        await first.start()
        try:
            for partition in (0, 1):
                await first.send(f"kafka:{name}?partition={partition}", f"p{partition}")
            await _until(lambda: first.route_stats("slow")["inflight"] == 2)
            await second.start()
            try:
                await _until(lambda: _committed_is(kafka_url, name, "g", 1, 0))
                await _until(lambda: _committed_is(kafka_url, name, "g", 1, 1))
                await asyncio.sleep(0.5)  # a message consumed twice would have arrived now
                bodies = [
                    *mock_endpoint(first, "mock:out").bodies,
                    *mock_endpoint(second, "mock:out").bodies,
                ]
                assert sorted(bodies) == [b"p0", b"p1"]
                # The group did split: a message to each partition reaches each member.
                for partition in (0, 1):
                    await first.send(f"kafka:{name}?partition={partition}", "again")
                await mock_endpoint(first, "mock:out").wait_for(2)
                await mock_endpoint(second, "mock:out").wait_for(1)
            finally:
                await second.stop(grace=2.0)
        finally:
            await first.stop(grace=2.0)

    asyncio.run(asyncio.wait_for(main(), 30))


def _connections_to(port: int) -> int:
    """This process's established TCP connections to ``port`` (from Linux's /proc)."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("counting connections needs Linux's /proc")
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == port and fields[3] == "01" and fields[9] in inodes:
                    count += 1
    return count


def test_a_stop_cancelled_at_the_deadline_still_commits_and_closes_the_client(
    kafka_url: str, topic: str
) -> None:
    """The drain deadline cancels the stop while m1 is in its route: m0 (completed) is
    committed, m1 is not, the client is closed (no connection left to the broker), and the
    next member of the group gets m1."""
    port = int(kafka_url.split(",")[0].rsplit(":", 1)[1])
    group = f"g-{uuid.uuid4().hex[:8]}"
    uri = f"kafka:{topic}?group_id={group}&auto_offset_reset=earliest&{FAST}"

    async def slow_for_m1(exchange: Exchange) -> None:
        if exchange.message.body == b"m1":
            await asyncio.sleep(30)

    async def main() -> None:
        first = IntegrationContext(settings={"kafka_url": kafka_url})
        first.add_routes([from_(uri, id="slow").process(slow_for_m1).to("mock:out").build()])
        await first.start()
        await first.send(f"kafka:{topic}", b"m0")
        await mock_endpoint(first, "mock:out").wait_for(1)
        await first.send(f"kafka:{topic}", b"m1")
        await _until(lambda: first.route_stats("slow")["inflight"] == 1)
        assert _connections_to(port) > 0
        # Kept referenced, as a running process may: the garbage collector does not close it.
        client = first._routes["slow"].consumer._client
        assert await first.stop(grace=0.3) is False
        await _until(lambda: _connections_to(port) == 0, timeout=2)
        del client
        assert await _committed(kafka_url, topic, group) == 1
        second = IntegrationContext(settings={"kafka_url": kafka_url})
        second.add_routes([from_(uri, id="next").to("mock:out").build()])
        await second.start()
        try:
            received = await mock_endpoint(second, "mock:out").wait_for(1, timeout=5)
            assert [e.message.body for e in received] == [b"m1"]
        finally:
            await second.stop(grace=2.0)

    asyncio.run(asyncio.wait_for(main(), 30))
