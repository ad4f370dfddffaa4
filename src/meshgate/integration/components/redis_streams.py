"""``redis``: Redis streams through redis-py, consumed by a consumer group at least once.

``from: redis:orders?group=billing`` reads the stream with XREADGROUP: an entry is
acknowledged (XACK) only once its route completed or its dead letter channel took it.
A failed entry stays pending and is claimed again (XAUTOCLAIM) once it has been idle for
``claim_idle``; so is an entry of a runtime that died mid-route, and a restarted consumer
of the same name first takes back its own pending entries. A route slower than
``claim_idle`` keeps its entry claimed, so no other consumer takes it meanwhile.
``to: redis:orders`` appends with XADD. An entry's ``body`` field is the message body,
its other fields are headers; an entry without ``body`` becomes a mapping body. The
server is the context's ``redis_url`` setting.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Any

from meshgate.integration._component import Component, Consumer, Endpoint, Processor, Producer
from meshgate.integration._errors import EndpointError, IntegrationError
from meshgate.integration._message import Exchange, ExchangePattern, Message
from meshgate.integration._uri import EndpointUri, Options

if TYPE_CHECKING:
    from meshgate.integration._context import IntegrationContext

__all__ = ["RedisStreamsComponent"]

DEFAULT_URL = "redis://127.0.0.1:6379/0"
log = logging.getLogger("meshgate.integration.redis")
_INTERNAL = ("http_", "amqp_", "nats_", "redis_")


class RedisStreamsComponent(Component):
    def __init__(self) -> None:
        self._clients: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    def create_endpoint(self, uri: EndpointUri, context: IntegrationContext) -> Endpoint:
        return _RedisStreamEndpoint(uri, context, self)

    async def client(self, url: str) -> Any:
        import redis.asyncio

        async with self._lock:
            client = self._clients.get(url)
            if client is None:
                client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=5)
                try:
                    await client.ping()
                except Exception as exc:
                    await client.aclose()
                    shown = url.split("@")[-1]
                    raise IntegrationError(f"redis: cannot connect to {shown}: {exc}") from None
                self._clients[url] = client
            return client

    async def stop(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.aclose()


class _RedisStreamEndpoint(Endpoint):
    def __init__(
        self, uri: EndpointUri, context: IntegrationContext, component: RedisStreamsComponent
    ):
        super().__init__(uri, context)
        self.component = component
        self.stream = uri.path
        if not self.stream or self.stream.startswith("/"):
            raise EndpointError(f"{uri.text}: write redis:STREAM, e.g. redis:orders")
        options = Options(uri)
        self.group = options.text("group")
        self.consumer_name = options.text("consumer") or socket.gethostname()
        self.group_start = options.choice("group_start", ("latest", "earliest"), "latest")
        self.batch = options.integer("batch", 10, minimum=1, maximum=1000)
        self.concurrent_consumers = options.integer("concurrent_consumers", 1, 1, 100)
        self.block = options.duration("block", 1.0)
        self.claim_idle = options.duration("claim_idle", 30.0)
        self.max_length = options.integer("max_length", 0)
        options.finish()
        if self.claim_idle < 0.05:
            raise EndpointError(f"{uri.text}: option 'claim_idle' must be at least 50ms")
        if not 0.001 <= self.block <= 60:
            raise EndpointError(f"{uri.text}: option 'block' must be between 1ms and 1m")

    @property
    def url(self) -> str:
        return str(self.context.settings.get("redis_url", DEFAULT_URL))

    def create_consumer(self, processor: Processor) -> Consumer:
        if not self.group:
            raise EndpointError(f"{self.uri.text}: consume with a group: redis:STREAM?group=NAME")
        return _RedisStreamConsumer(self, processor)

    def create_producer(self) -> Producer:
        return _RedisStreamProducer(self)


class _RedisStreamConsumer(Consumer):
    endpoint: _RedisStreamEndpoint

    def __init__(self, endpoint: Endpoint, processor: Processor) -> None:
        super().__init__(endpoint, processor)
        self._client: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._idle: set[asyncio.Task[None]] = set()
        self._in_flight: set[bytes] = set()
        self._stopping = False

    async def start(self) -> None:
        import redis

        endpoint = self.endpoint
        self._client = await endpoint.component.client(endpoint.url)
        try:
            await self._client.xgroup_create(
                endpoint.stream,
                endpoint.group,
                id="$" if endpoint.group_start == "latest" else "0",
                mkstream=True,
            )
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise IntegrationError(f"{endpoint.uri.text}: {exc}") from None
        self._stopping = False
        name = endpoint.uri.text
        self._tasks = [asyncio.create_task(self._claim(), name=f"redis claimer {name}")]

    def _start_readers(self) -> None:
        name = self.endpoint.uri.text
        self._tasks += [
            asyncio.create_task(self._read(), name=f"redis consumer {name}")
            for _ in range(self.endpoint.concurrent_consumers)
        ]

    async def _read(self) -> None:
        endpoint = self.endpoint
        while not self._stopping:
            response = await self._idly(
                self._client.xreadgroup(
                    endpoint.group,
                    endpoint.consumer_name,
                    {endpoint.stream: ">"},
                    count=endpoint.batch,
                    block=max(1, int(endpoint.block * 1000)),
                )
            )
            for _, entries in response or ():
                await self._deliver_all(entries, redelivered=False)

    async def _claim(self) -> None:
        """Takes back this consumer's pending entries, starts the readers, then takes entries
        idle for ``claim_idle``."""
        endpoint = self.endpoint
        after: Any = "0"
        while not self._stopping:
            response = await self._idly(
                self._client.xreadgroup(
                    endpoint.group, endpoint.consumer_name, {endpoint.stream: after}, count=100
                )
            )
            entries = response[0][1] if response else []
            if not entries:
                break
            await self._deliver_all(entries, redelivered=True)
            after = entries[-1][0]
        # New entries only once our own pending ones are back: a reader started earlier
        # could take an entry whose first delivery this history read then returns as well.
        if not self._stopping:
            self._start_readers()
        while not self._stopping:
            await self._idly(asyncio.sleep(endpoint.claim_idle / 2))
            cursor: Any = "0-0"
            while not self._stopping:
                response = await self._idly(
                    self._client.xautoclaim(
                        endpoint.stream,
                        endpoint.group,
                        endpoint.consumer_name,
                        int(endpoint.claim_idle * 1000),
                        start_id=cursor,
                        count=endpoint.batch,
                    )
                )
                if response is None:
                    break
                cursor, entries = response[0], response[1]
                await self._deliver_all(entries, redelivered=True)
                if cursor in (b"0-0", "0-0"):
                    break

    async def _idly(self, awaitable: Any) -> Any:
        """Awaits while stop may cancel: nothing is in a route meanwhile."""
        task = asyncio.current_task()
        assert task is not None
        self._idle.add(task)
        try:
            return await awaitable
        except Exception as exc:
            if self._stopping:
                raise asyncio.CancelledError from None
            log.warning("%s: reading failed (%s); retrying", self.endpoint.uri.text, exc)
            await asyncio.sleep(self.endpoint.block)
            return None
        finally:
            self._idle.discard(task)

    async def _deliver_all(self, entries: list[Any], redelivered: bool) -> None:
        counts = await self._delivery_counts(entries) if redelivered and entries else {}
        for entry_id, fields in entries:
            if self._stopping:
                return
            if entry_id in self._in_flight:
                continue
            if fields is None:
                # A trimmed entry still pending: nothing to deliver, only to forget.
                await self._client.xack(self.endpoint.stream, self.endpoint.group, entry_id)
                continue
            await self._deliver(entry_id, fields, counts.get(entry_id, 2 if redelivered else 1))

    async def _delivery_counts(self, entries: list[Any]) -> dict[bytes, int]:
        """How many times each pending entry was delivered, this time included (XPENDING)."""
        endpoint = self.endpoint
        try:
            pending = await self._client.xpending_range(
                endpoint.stream,
                endpoint.group,
                min=entries[0][0],
                max=entries[-1][0],
                # Other entries of this consumer may lie between (in flight, failed).
                count=len(entries) + 100,
                consumername=endpoint.consumer_name,
            )
        except Exception as exc:
            log.warning("%s: delivery counts unknown (%s)", endpoint.uri.text, exc)
            return {}
        return {item["message_id"]: int(item["times_delivered"]) for item in pending}

    async def _deliver(self, entry_id: bytes, fields: dict[bytes, bytes], deliveries: int) -> None:
        endpoint = self.endpoint
        exchange = _exchange_of(endpoint.stream, entry_id, fields, deliveries)
        self._in_flight.add(entry_id)
        progress = asyncio.create_task(self._keep_claimed(entry_id))
        try:
            try:
                await self.processor(exchange)
            except Exception as exc:
                exchange.exception = exc
        finally:
            progress.cancel()
            self._in_flight.discard(entry_id)
        if exchange.exception is None:
            await self._client.xack(endpoint.stream, endpoint.group, entry_id)
            return
        log.warning(
            "%s: entry %s failed (%s); claimed again after %ss",
            endpoint.uri.text,
            entry_id.decode(),
            exchange.exception,
            endpoint.claim_idle,
        )

    async def _keep_claimed(self, entry_id: bytes) -> None:
        """Resets the entry's idle time so that no consumer claims it while its route runs."""
        endpoint = self.endpoint
        while True:
            await asyncio.sleep(endpoint.claim_idle / 2)
            await self._client.xclaim(
                endpoint.stream, endpoint.group, endpoint.consumer_name, 0, [entry_id], justid=True
            )

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._idle):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []


def _exchange_of(
    stream: str, entry_id: bytes, fields: dict[bytes, bytes], deliveries: int
) -> Exchange:
    decoded = {
        key.decode("utf-8", "replace"): value.decode("utf-8", "replace")
        for key, value in fields.items()
        if key != b"body"
    }
    if b"body" in fields:
        body: Any = fields[b"body"]
        headers: dict[str, Any] = decoded
    else:
        body, headers = decoded, {}
    headers["redis_stream"] = stream
    headers["redis_id"] = entry_id.decode()
    exchange = Exchange(Message(body, headers), ExchangePattern.IN_ONLY)
    # As amqp and nats: delivered before (by this consumer or one that died or failed).
    exchange.properties["redelivered"] = deliveries > 1
    exchange.properties["delivery_count"] = deliveries
    return exchange


class _RedisStreamProducer(Producer):
    endpoint: _RedisStreamEndpoint

    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__(endpoint)
        self._client: Any = None

    async def start(self) -> None:
        self._client = await self.endpoint.component.client(self.endpoint.url)

    async def process(self, exchange: Exchange) -> None:
        if self._client is None:
            raise IntegrationError(f"{self.endpoint.uri.text}: the producer is not started")
        message = exchange.message
        fields: dict[str, Any] = {}
        for name, value in message.headers.items():
            if name.lower().startswith(_INTERNAL) or name == "body" or value is None:
                continue
            if isinstance(value, str | int | float | bool):
                fields[name] = str(value)
        if "content-type" not in fields and not isinstance(message.body, bytes | str | None):
            fields["content-type"] = "application/json"
        fields["body"] = message.body_bytes()
        max_length = self.endpoint.max_length or None
        await self._client.xadd(
            self.endpoint.stream, fields, maxlen=max_length, approximate=max_length is not None
        )

    async def stop(self) -> None:
        self._client = None
