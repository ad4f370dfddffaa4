"""``kafka``: Kafka topics through aiokafka, consumed by a consumer group at least once.

``from: kafka:orders?group_id=billing`` joins the group with automatic commits off. An
offset is committed only once every exchange of its partition up to it completed or was
taken by its dead letter channel (:class:`OffsetTracker`), so neither a failure nor a
runtime that dies mid-route skips a message. With ``concurrent_consumers`` above one,
exchanges of a partition run side by side but their offsets are still committed in order.
A failed exchange (no dead letter channel took it) pauses its partition, lets the others
of that partition finish, then seeks back to it after ``redelivery_delay``: it comes again,
with the ones after it. A revoked partition (rebalance) first finishes its in-flight
exchanges and commits them; stopping stops fetching, drains, commits, then leaves the group.

``to: kafka:orders`` sends with ``acks=all`` by default; the key is the ``kafka_key``
header, else the ``key`` option. Headers become Kafka headers (text as UTF-8), except
the connectors' own (``kafka_*``, ``http_*``, ...). The brokers are the ``brokers`` option,
else the context's ``kafka_url`` setting: ``host:port[,host:port]``, optionally written
``kafka://host:port,...``; 127.0.0.1:9092 by default.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshgate.integration._component import Component, Consumer, Endpoint, Processor, Producer
from meshgate.integration._errors import EndpointError, IntegrationError
from meshgate.integration._message import Exchange, ExchangePattern, Message
from meshgate.integration._uri import EndpointUri, Options

if TYPE_CHECKING:
    from meshgate.integration._context import IntegrationContext

__all__ = ["KafkaComponent", "OffsetTracker", "parse_bootstrap_servers"]

DEFAULT_SERVERS = "127.0.0.1:9092"
log = logging.getLogger("meshgate.integration.kafka")
_INTERNAL = ("http_", "amqp_", "nats_", "redis_", "mqtt_", "kafka_")
_TOPIC = re.compile(r"[A-Za-z0-9._\-]{1,249}")
_GROUP = re.compile(r"[A-Za-z0-9._\-]{1,255}")
_HOST = re.compile(r"[A-Za-z0-9.\-_]+|\[[0-9A-Fa-f:.]+\]")
_COMPRESSION = ("none", "gzip", "snappy", "lz4", "zstd")
_ACKS = {"all": "all", "-1": "all", "1": 1, "0": 0}
_MAX_SERVERS = 32


def parse_bootstrap_servers(text: str) -> list[str]:
    """``host:port`` strings from ``host:port[,host:port]`` or ``kafka://host:port,...``;
    a missing port is 9092. Raises ValueError saying what is wrong."""
    rest = text.strip()
    if rest.lower().startswith("kafka://"):
        rest = rest[len("kafka://") :].rstrip("/")
    elif "://" in rest:
        raise ValueError(f"{text!r} is not host:port[,host:port] nor kafka://host:port,...")
    servers: list[str] = []
    for part in rest.split(","):
        part = part.strip()
        if part.startswith("[") and "]" in part:
            host, _, port = part.rpartition(":") if "]:" in part else (part, "", "9092")
        else:
            host, colon, port = part.rpartition(":")
            if not colon:
                host, port = part, "9092"
        if not host or not _HOST.fullmatch(host):
            raise ValueError(f"{text!r}: {part!r} is not host:port")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{text!r}: the port of {part!r} must be between 1 and 65535")
        servers.append(f"{host}:{int(port)}")
    if len(servers) > _MAX_SERVERS:
        raise ValueError(f"{text!r}: more than {_MAX_SERVERS} bootstrap servers")
    return servers


@dataclass
class _PartitionProgress:
    running: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    next: int | None = None  # one past the highest offset started
    seen: int = -1  # one past the highest offset ever started: lower ones are redeliveries
    committed: int | None = None


class OffsetTracker:
    """Which offset of each partition may be committed, whatever order exchanges end in.

    Offsets of a partition are started in increasing order (gaps allowed, as Kafka has
    them). The commit point is the lowest offset still running or failed, or one past the
    highest started when none is: everything below it has completed. Pure bookkeeping,
    no I/O; a partition is any hashable key.
    """

    def __init__(self) -> None:
        self._partitions: dict[Hashable, _PartitionProgress] = {}

    def _progress(self, partition: Hashable) -> _PartitionProgress:
        progress = self._partitions.get(partition)
        if progress is None:
            progress = self._partitions[partition] = _PartitionProgress()
        return progress

    def start(self, partition: Hashable, offset: int) -> bool:
        """Record that ``offset`` is in a route; True when it was started before (a
        redelivery after a rewind)."""
        progress = self._progress(partition)
        if progress.next is not None and offset < progress.next:
            raise ValueError(f"offset {offset} started after {progress.next - 1}")
        progress.running.add(offset)
        progress.next = offset + 1
        redelivered = offset < progress.seen
        progress.seen = max(progress.seen, offset + 1)
        return redelivered

    def complete(self, partition: Hashable, offset: int) -> None:
        """The route completed (or its dead letter channel took the exchange)."""
        self._progress(partition).running.discard(offset)

    def fail(self, partition: Hashable, offset: int) -> None:
        """The exchange failed: nothing at or after it is committed until it is rewound."""
        progress = self._progress(partition)
        progress.running.discard(offset)
        progress.failed.add(offset)

    def running(self, partition: Hashable) -> int:
        progress = self._partitions.get(partition)
        return 0 if progress is None else len(progress.running)

    def commit_point(self, partition: Hashable) -> int | None:
        """The offset to commit (the next one to consume), or None before any start."""
        progress = self._partitions.get(partition)
        if progress is None:
            return None
        blocking = progress.running | progress.failed
        return min(blocking) if blocking else progress.next

    def rewind(self, partition: Hashable) -> int | None:
        """Forget the failures of an idle partition; the offset to consume again from."""
        progress = self._progress(partition)
        if progress.running:
            raise ValueError("rewind with exchanges still running")
        point = self.commit_point(partition)
        progress.failed.clear()
        progress.next = None
        return point

    def to_commit(self) -> dict[Any, int]:
        """The commit points that moved past what was last committed."""
        offsets: dict[Any, int] = {}
        for partition, progress in self._partitions.items():
            point = self.commit_point(partition)
            if point is not None and (progress.committed is None or point > progress.committed):
                offsets[partition] = point
        return offsets

    def committed(self, offsets: dict[Any, int]) -> None:
        for partition, offset in offsets.items():
            if partition in self._partitions:
                progress = self._partitions[partition]
                progress.committed = max(progress.committed or 0, offset)

    def forget(self, partitions: Iterable[Hashable]) -> None:
        """Partitions revoked: another consumer goes on from their committed offsets."""
        for partition in partitions:
            self._partitions.pop(partition, None)


class KafkaComponent(Component):
    def create_endpoint(self, uri: EndpointUri, context: IntegrationContext) -> Endpoint:
        return _KafkaEndpoint(uri, context)


class _KafkaEndpoint(Endpoint):
    def __init__(self, uri: EndpointUri, context: IntegrationContext) -> None:
        super().__init__(uri, context)
        self.topic = uri.path
        if not _TOPIC.fullmatch(self.topic) or self.topic in (".", ".."):
            raise EndpointError(
                f"{uri.text}: write kafka:TOPIC, e.g. kafka:orders"
                " (a topic is 1 to 249 letters, digits, '.', '_' or '-')"
            )
        options = Options(uri)
        brokers = options.text("brokers")
        self.servers: list[str] | None = None
        if brokers is not None:
            try:
                self.servers = parse_bootstrap_servers(brokers)
            except ValueError as exc:
                raise EndpointError(f"{uri.text}: option 'brokers': {exc}") from None
        self.group_id = options.text("group_id")
        if self.group_id is not None and not _GROUP.fullmatch(self.group_id):
            raise EndpointError(
                f"{uri.text}: option 'group_id' must be 1 to 255 letters, digits, '.', '_' or '-'"
            )
        self.client_id = options.text("client_id", "meshgate") or "meshgate"
        self.auto_offset_reset = options.choice(
            "auto_offset_reset", ("latest", "earliest"), "latest"
        )
        self.max_poll_records = options.integer("max_poll_records", 100, minimum=1, maximum=10000)
        self.concurrent_consumers = options.integer("concurrent_consumers", 1, 1, 100)
        self.session_timeout = options.duration("session_timeout", 10.0)
        self.redelivery_delay = options.duration("redelivery_delay", 1.0)
        self.poll_timeout = options.duration("poll_timeout", 0.5)
        self.connect_timeout = options.duration("connect_timeout", 10.0)
        self.key = options.text("key")
        self.partition = options.integer("partition", -1, minimum=-1, maximum=1_000_000)
        acks = options.choice("acks", _ACKS, "all")
        self.acks: Any = _ACKS[acks]
        self.linger = options.duration("linger", 0.0)
        self.compression = options.choice("compression", _COMPRESSION, "none")
        self.max_request_size = options.integer(
            "max_request_size", 1048576, minimum=1024, maximum=100 * 1048576
        )
        options.finish()
        for name, value, low, high in (
            ("session_timeout", self.session_timeout, 0.1, 3600.0),
            ("poll_timeout", self.poll_timeout, 0.01, 60.0),
            ("connect_timeout", self.connect_timeout, 0.1, 300.0),
            ("linger", self.linger, 0.0, 60.0),
            ("redelivery_delay", self.redelivery_delay, 0.0, 3600.0),
        ):
            if not low <= value <= high:
                raise EndpointError(
                    f"{uri.text}: option {name!r} must be between {low:g}s and {high:g}s"
                )
        if self.compression in ("snappy", "lz4", "zstd"):
            from aiokafka import codec

            available = {"snappy": codec.has_snappy, "lz4": codec.has_lz4, "zstd": codec.has_zstd}
            if not available[self.compression]():
                raise EndpointError(
                    f"{uri.text}: option 'compression': {self.compression} needs the"
                    " cramjam package, which is not installed (gzip needs nothing)"
                )

    @property
    def bootstrap_servers(self) -> list[str]:
        if self.servers is not None:
            return self.servers
        setting = str(self.context.settings.get("kafka_url") or DEFAULT_SERVERS)
        try:
            return parse_bootstrap_servers(setting)
        except ValueError as exc:
            raise IntegrationError(f"{self.uri.text}: the kafka_url setting: {exc}") from None

    def create_consumer(self, processor: Processor) -> Consumer:
        if not self.group_id:
            raise EndpointError(f"{self.uri.text}: consume with a group: kafka:TOPIC?group_id=NAME")
        return _KafkaConsumer(self, processor)

    def create_producer(self) -> Producer:
        return _KafkaProducer(self)


async def _started(client: Any, endpoint: _KafkaEndpoint) -> None:
    """``client.start()`` within ``connect_timeout``, else a clear IntegrationError."""
    servers = ",".join(endpoint.bootstrap_servers)
    try:
        await asyncio.wait_for(client.start(), endpoint.connect_timeout)
    except Exception as exc:
        try:
            await client.stop()
        except Exception:
            log.debug("closing the unstarted kafka client failed", exc_info=True)
        reason = (
            f"no answer within {endpoint.connect_timeout:g}s"
            if isinstance(exc, TimeoutError)
            else str(exc) or type(exc).__name__
        )
        raise IntegrationError(
            f"{endpoint.uri.text}: cannot connect to Kafka at {servers}: {reason}"
        ) from None


class _KafkaConsumer(Consumer):
    endpoint: _KafkaEndpoint

    def __init__(self, endpoint: Endpoint, processor: Processor) -> None:
        super().__init__(endpoint, processor)
        self._client: Any = None
        self._tracker = OffsetTracker()
        self._slots = asyncio.Semaphore(self.endpoint.concurrent_consumers)
        self._fetcher: asyncio.Task[None] | None = None
        self._committer: asyncio.Task[None] | None = None
        self._routes: set[asyncio.Task[None]] = set()
        self._rewinds: dict[Any, asyncio.Task[None]] = {}
        self._assigned: set[Any] = set()
        self._generation: dict[Any, int] = {}
        self._first_assignment = asyncio.Event()
        self._commit_wanted = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._ended = asyncio.Condition()
        self._stopping = False

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer

        endpoint = self.endpoint
        session_ms = max(100, int(endpoint.session_timeout * 1000))
        self._client = AIOKafkaConsumer(
            bootstrap_servers=endpoint.bootstrap_servers,
            client_id=endpoint.client_id,
            group_id=endpoint.group_id,
            enable_auto_commit=False,
            auto_offset_reset=endpoint.auto_offset_reset,
            max_poll_records=endpoint.max_poll_records,
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=max(30, session_ms // 3),
            request_timeout_ms=max(int(endpoint.connect_timeout * 1000), session_ms + 5000),
        )
        await _started(self._client, endpoint)
        self._client.subscribe([endpoint.topic], listener=_rebalance_listener(self))
        self._stopping = False
        name = endpoint.uri.text
        self._fetcher = asyncio.create_task(self._fetch(), name=f"kafka consumer {name}")
        self._committer = asyncio.create_task(self._commit_loop(), name=f"kafka commits {name}")
        # Started means assigned: a message sent from now on is not skipped by 'latest'.
        try:
            await asyncio.wait_for(self._first_assignment.wait(), endpoint.connect_timeout)
        except TimeoutError:
            log.warning(
                "%s: group %s has not assigned partitions yet; consuming once it does",
                name,
                endpoint.group_id,
            )

    async def _fetch(self) -> None:
        endpoint = self.endpoint
        timeout_ms = max(10, int(endpoint.poll_timeout * 1000))
        while not self._stopping:
            try:
                batch = await self._client.getmany(
                    timeout_ms=timeout_ms, max_records=endpoint.max_poll_records
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s: fetching failed (%s); retrying", endpoint.uri.text, exc)
                await asyncio.sleep(endpoint.poll_timeout)
                continue
            generations = dict(self._generation)
            for tp, records in batch.items():
                for record in records:
                    await self._slots.acquire()
                    if not self._current(tp, generations.get(tp, 0)):
                        self._slots.release()
                        break
                    self._dispatch(tp, record)

    def _current(self, tp: Any, generation: int) -> bool:
        """Records fetched before a rewind or a rebalance of their partition are stale."""
        return (
            not self._stopping
            and tp in self._assigned
            and tp not in self._rewinds
            and self._generation.get(tp, 0) == generation
        )

    def _dispatch(self, tp: Any, record: Any) -> None:
        redelivered = self._tracker.start(tp, record.offset)
        exchange = _exchange_of(record, redelivered)
        task = asyncio.create_task(self._route(tp, record.offset, exchange))
        self._routes.add(task)
        task.add_done_callback(self._routes.discard)

    async def _route(self, tp: Any, offset: int, exchange: Exchange) -> None:
        completed = False
        try:
            try:
                await self.processor(exchange)
            except Exception as exc:
                exchange.exception = exc
            completed = exchange.exception is None
        finally:
            # A cancelled route counts as failed: its offset is never committed past.
            self._slots.release()
            if completed:
                self._tracker.complete(tp, offset)
            else:
                self._tracker.fail(tp, offset)
            self._commit_wanted.set()
            async with self._ended:
                self._ended.notify_all()
        if completed:
            return
        log.warning(
            "%s: partition %s offset %s failed (%s); consumed again after %gs",
            self.endpoint.uri.text,
            tp.partition,
            offset,
            exchange.exception,
            self.endpoint.redelivery_delay,
        )
        if tp not in self._rewinds and tp in self._assigned and not self._stopping:
            self._client.pause(tp)
            self._rewinds[tp] = asyncio.create_task(self._rewind(tp))

    async def _rewind(self, tp: Any) -> None:
        """Once the partition's running exchanges ended, seek back to its first failure."""
        try:
            async with self._ended:
                await self._ended.wait_for(lambda: not self._tracker.running(tp))
            await asyncio.sleep(self.endpoint.redelivery_delay)
            if tp in self._assigned and not self._stopping:
                try:
                    await self._commit()
                except Exception as exc:
                    log.warning("%s: committing failed (%s)", self.endpoint.uri.text, exc)
                offset = self._tracker.rewind(tp)
                if offset is not None:
                    self._client.seek(tp, offset)
                self._generation[tp] = self._generation.get(tp, 0) + 1
                self._client.resume(tp)
        finally:
            if self._rewinds.get(tp) is asyncio.current_task():
                del self._rewinds[tp]

    async def _commit_loop(self) -> None:
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted.clear()
            try:
                await self._commit()
            except Exception as exc:
                log.warning("%s: committing failed (%s)", self.endpoint.uri.text, exc)

    async def _commit(self, client: Any = None, partitions: Iterable[Any] | None = None) -> None:
        client = client or self._client
        if client is None:
            return  # stopped
        async with self._commit_lock:
            offsets = self._tracker.to_commit()
            if partitions is not None:
                wanted = set(partitions)
                offsets = {tp: offset for tp, offset in offsets.items() if tp in wanted}
            offsets = {tp: offset for tp, offset in offsets.items() if tp in self._assigned}
            if offsets:
                await client.commit(offsets)
                self._tracker.committed(offsets)

    async def revoked(self, partitions: set[Any]) -> None:
        """Rebalance: finish and commit the in-flight exchanges of partitions taken away."""
        for tp in partitions:
            self._generation[tp] = self._generation.get(tp, 0) + 1
            rewind = self._rewinds.pop(tp, None)
            if rewind is not None:
                rewind.cancel()
        async with self._ended:
            await self._ended.wait_for(
                lambda: not any(self._tracker.running(tp) for tp in partitions)
            )
        try:
            await self._commit(partitions=partitions)
        except Exception as exc:
            log.warning(
                "%s: committing revoked partitions failed (%s)", self.endpoint.uri.text, exc
            )
        self._assigned -= partitions
        self._tracker.forget(partitions)

    async def assigned(self, partitions: set[Any]) -> None:
        """Pin where a partition without a committed offset starts, so that a crash before
        its first commit does not move it to 'latest' past unfinished messages."""
        for tp in partitions:
            self._generation[tp] = self._generation.get(tp, 0) + 1
        self._assigned |= partitions
        for tp in partitions:
            try:
                if await self._client.committed(tp) is None:
                    position = await self._client.position(tp)
                    await self._client.commit({tp: position})
            except Exception as exc:
                log.warning(
                    "%s: cannot pin the start of partition %s (%s)",
                    self.endpoint.uri.text,
                    tp.partition,
                    exc,
                )
        self._first_assignment.set()

    async def stop(self) -> None:
        self._stopping = True
        try:
            for task in (self._fetcher, *self._rewinds.values()):
                if task is not None:
                    task.cancel()
            await asyncio.gather(
                *(t for t in (self._fetcher, *self._rewinds.values()) if t),
                return_exceptions=True,
            )
            if self._routes:
                await asyncio.gather(*self._routes, return_exceptions=True)
        finally:
            # Also when the stop is cancelled at the drain deadline (which cancels the
            # exchanges in flight): what completed is committed, the client leaves the group.
            await asyncio.shield(self._release())

    async def _release(self) -> None:
        """Ends the exchanges still running (uncommitted), commits the completed ones, closes
        the client; each step bounded by ``connect_timeout``."""
        endpoint = self.endpoint
        for task in (*self._routes, *self._rewinds.values()):
            task.cancel()
        if self._routes or self._rewinds:
            await asyncio.gather(*self._routes, *self._rewinds.values(), return_exceptions=True)
        if self._committer is not None:
            self._committer.cancel()
            await asyncio.gather(self._committer, return_exceptions=True)
        self._fetcher = self._committer = None
        client, self._client = self._client, None
        if client is None:
            return
        try:
            await asyncio.wait_for(self._commit(client), endpoint.connect_timeout)
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            log.warning("%s: the last commit failed (%s)", endpoint.uri.text, reason)
        try:
            await asyncio.wait_for(client.stop(), endpoint.connect_timeout)
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            log.warning("%s: closing the client failed (%s)", endpoint.uri.text, reason)


def _rebalance_listener(consumer: _KafkaConsumer) -> Any:
    """aiokafka's rebalance listener, handing over to the consumer."""
    from aiokafka import ConsumerRebalanceListener

    class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
        async def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
            await consumer.revoked(set(revoked))

        async def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
            await consumer.assigned(set(assigned))

    return Listener()


def _text_or_bytes(value: bytes | None) -> str | bytes | None:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value


def _exchange_of(record: Any, redelivered: bool) -> Exchange:
    headers: dict[str, Any] = {}
    for name, value in record.headers or ():
        headers[name] = _text_or_bytes(value)
    headers["kafka_topic"] = record.topic
    headers["kafka_partition"] = record.partition
    headers["kafka_offset"] = record.offset
    headers["kafka_timestamp"] = record.timestamp
    headers["kafka_key"] = _text_or_bytes(record.key)
    exchange = Exchange(Message(record.value, headers), ExchangePattern.IN_ONLY)
    exchange.properties["redelivered"] = redelivered
    return exchange


class _KafkaProducer(Producer):
    endpoint: _KafkaEndpoint

    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__(endpoint)
        self._client: Any = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaProducer

        endpoint = self.endpoint
        client = AIOKafkaProducer(
            bootstrap_servers=endpoint.bootstrap_servers,
            client_id=endpoint.client_id,
            acks=endpoint.acks,
            linger_ms=int(endpoint.linger * 1000),
            compression_type=None if endpoint.compression == "none" else endpoint.compression,
            max_request_size=endpoint.max_request_size,
            request_timeout_ms=max(1000, int(endpoint.connect_timeout * 1000)),
        )
        await _started(client, endpoint)
        self._client = client

    async def process(self, exchange: Exchange) -> None:
        if self._client is None:
            raise IntegrationError(f"{self.endpoint.uri.text}: the producer is not started")
        message = exchange.message
        headers: list[tuple[str, bytes]] = []
        for name, value in message.headers.items():
            if name.lower().startswith(_INTERNAL) or value is None:
                continue
            if isinstance(value, bytes):
                headers.append((name, value))
            elif isinstance(value, str | int | float | bool):
                headers.append((name, str(value).encode()))
        names = {name.lower() for name, _ in headers}
        if "content-type" not in names and not isinstance(message.body, bytes | str | None):
            headers.append(("content-type", b"application/json"))
        key = message.headers.get("kafka_key")
        if key is None:
            key = self.endpoint.key
        if isinstance(key, str | int):
            key = str(key).encode()
        elif not isinstance(key, bytes):
            key = None
        partition = self.endpoint.partition if self.endpoint.partition >= 0 else None
        # With acks=all this returns once the in-sync replicas have the record.
        metadata = await self._client.send_and_wait(
            self.endpoint.topic,
            None if message.body is None else message.body_bytes(),
            key=key,
            partition=partition,
            headers=headers,
        )
        exchange.properties["kafka_metadata"] = {
            "topic": metadata.topic,
            "partition": metadata.partition,
            "offset": metadata.offset,
        }

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.stop()
