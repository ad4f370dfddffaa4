"""``amqp``: RabbitMQ queues and exchanges through aio-pika, at least once.

``from: amqp:queue:orders`` consumes a durable queue with manual acknowledgement: a
message is acknowledged only once its route completed or its dead letter channel took
it; a failure returns it to the queue (the broker redelivers), and so does a runtime
that dies mid-route. ``to: amqp:queue:orders`` publishes persistent messages with
publisher confirms; ``to: amqp:exchange:events?routing_key=order.created`` publishes to
an exchange. The broker is the context's ``amqp_url`` setting.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from meshgate.integration._component import Component, Consumer, Endpoint, Processor, Producer
from meshgate.integration._errors import EndpointError, IntegrationError
from meshgate.integration._message import Exchange, ExchangePattern, Message
from meshgate.integration._uri import EndpointUri, Options

if TYPE_CHECKING:
    from meshgate.integration._context import IntegrationContext

__all__ = ["AmqpComponent"]

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
log = logging.getLogger("meshgate.integration.amqp")
_INTERNAL = ("http_", "amqp_")


class AmqpComponent(Component):
    def __init__(self) -> None:
        self._connections: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    def create_endpoint(self, uri: EndpointUri, context: IntegrationContext) -> Endpoint:
        return _AmqpEndpoint(uri, context, self)

    async def connection(self, url: str) -> Any:
        import aio_pika

        async with self._lock:
            connection = self._connections.get(url)
            if connection is None or connection.is_closed:
                try:
                    connection = await aio_pika.connect_robust(url, timeout=10)
                except Exception as exc:
                    shown = url.split("@")[-1]
                    raise IntegrationError(f"amqp: cannot connect to {shown}: {exc}") from None
                self._connections[url] = connection
            return connection

    async def stop(self) -> None:
        connections, self._connections = self._connections, {}
        for connection in connections.values():
            await connection.close()


class _AmqpEndpoint(Endpoint):
    def __init__(self, uri: EndpointUri, context: IntegrationContext, component: AmqpComponent):
        super().__init__(uri, context)
        self.component = component
        kind, _, name = uri.path.partition(":")
        if kind not in ("queue", "exchange") or not name:
            raise EndpointError(f"{uri.text}: write amqp:queue:NAME or amqp:exchange:NAME")
        self.kind, self.name = kind, name
        options = Options(uri)
        self.durable = options.boolean("durable", True)
        self.prefetch = options.integer("prefetch", 10, minimum=1, maximum=65535)
        self.concurrent_consumers = options.integer("concurrent_consumers", 1, 1, 100)
        self.routing_key = options.text("routing_key", "" if kind == "exchange" else name)
        self.exchange_type = options.choice(
            "exchange_type", ("direct", "fanout", "topic", "headers"), "topic"
        )
        options.finish()

    @property
    def url(self) -> str:
        return str(self.context.settings.get("amqp_url", DEFAULT_URL))

    def create_consumer(self, processor: Processor) -> Consumer:
        if self.kind != "queue":
            raise EndpointError(f"{self.uri.text}: consume from amqp:queue:NAME")
        return _AmqpConsumer(self, processor)

    def create_producer(self) -> Producer:
        return _AmqpProducer(self)


class _AmqpConsumer(Consumer):
    endpoint: _AmqpEndpoint

    def __init__(self, endpoint: Endpoint, processor: Processor) -> None:
        super().__init__(endpoint, processor)
        self._channel: Any = None
        self._queue: Any = None
        self._tags: list[str] = []
        self._running: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        endpoint = self.endpoint
        connection = await endpoint.component.connection(endpoint.url)
        self._channel = await connection.channel()
        await self._channel.set_qos(prefetch_count=endpoint.prefetch)
        self._queue = await self._channel.declare_queue(endpoint.name, durable=endpoint.durable)
        for _ in range(endpoint.concurrent_consumers):
            self._tags.append(await self._queue.consume(self._on_message, no_ack=False))

    async def _on_message(self, incoming: Any) -> None:
        # aio-pika runs each delivery (up to ``prefetch``) in a task of its own.
        task = asyncio.current_task()
        assert task is not None
        self._running.add(task)
        try:
            exchange = _exchange_of(incoming)
            try:
                await self.processor(exchange)
            except Exception as exc:
                exchange.exception = exc
            try:
                if exchange.exception is None:
                    await incoming.ack()
                    return
                log.warning(
                    "%s: message %s failed (%s); returned to the queue",
                    self.endpoint.uri.text,
                    incoming.message_id,
                    exchange.exception,
                )
                await incoming.nack(requeue=True)
            except Exception as exc:
                # The channel is gone: the broker requeued the message with it.
                log.warning(
                    "%s: message %s not settled (%s); the broker redelivers it",
                    self.endpoint.uri.text,
                    incoming.message_id,
                    exc,
                )
        finally:
            self._running.discard(task)

    async def stop(self) -> None:
        """Cancel the subscriptions, wait for the deliveries taken to be settled, close the
        channel. Cancelled (the drain deadline), the deliveries are cancelled unsettled and
        the closed channel returns them to the queue."""
        try:
            if self._queue is not None:
                for tag in self._tags:
                    await self._queue.cancel(tag)
            self._tags = []
            while self._running:
                await asyncio.wait(set(self._running))
        finally:
            for task in self._running:
                task.cancel()
            channel, self._channel, self._queue = self._channel, None, None
            if channel is not None and not channel.is_closed:
                await channel.close()


def _exchange_of(incoming: Any) -> Exchange:
    headers: dict[str, Any] = {}
    for name, value in (incoming.headers or {}).items():
        headers[name] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    if incoming.content_type:
        headers.setdefault("content-type", incoming.content_type)
    headers["amqp_message_id"] = incoming.message_id
    headers["amqp_routing_key"] = incoming.routing_key
    exchange = Exchange(Message(incoming.body, headers), ExchangePattern.IN_ONLY)
    exchange.properties["redelivered"] = bool(incoming.redelivered)
    return exchange


class _AmqpProducer(Producer):
    endpoint: _AmqpEndpoint

    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__(endpoint)
        self._channel: Any = None
        self._target: Any = None

    async def start(self) -> None:
        import aio_pika

        endpoint = self.endpoint
        connection = await endpoint.component.connection(endpoint.url)
        self._channel = await connection.channel(publisher_confirms=True)
        if endpoint.kind == "queue":
            await self._channel.declare_queue(endpoint.name, durable=endpoint.durable)
            self._target = self._channel.default_exchange
        else:
            self._target = await self._channel.declare_exchange(
                endpoint.name,
                aio_pika.ExchangeType(endpoint.exchange_type),
                durable=endpoint.durable,
            )

    async def process(self, exchange: Exchange) -> None:
        import aio_pika

        if self._target is None:
            raise IntegrationError(f"{self.endpoint.uri.text}: the producer is not started")
        message = exchange.message
        headers: dict[str, Any] = {}
        for name, value in message.headers.items():
            if name.lower().startswith(_INTERNAL) or name.lower() == "content-type":
                continue
            if isinstance(value, str | int | float | bool):
                headers[name] = value
        content_type = message.headers.get("content-type")
        if content_type is None and not isinstance(message.body, bytes | str | None):
            content_type = "application/json"
        outgoing = aio_pika.Message(
            message.body_bytes(),
            headers=headers,
            content_type=content_type,
            message_id=exchange.id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        routing_key = str(message.headers.get("amqp_routing_key_out") or self.endpoint.routing_key)
        # Confirmed by the broker before this returns: a sent message is not lost.
        await self._target.publish(outgoing, routing_key=routing_key)

    async def stop(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
        self._channel = self._target = None
