"""``nats``: NATS subjects through nats-py, consumed from JetStream at least once.

``from: nats:orders.created`` pulls from a durable JetStream consumer on the stream that
covers the subject: a message is acknowledged only once its route completed or its dead
letter channel took it; a failure naks it (JetStream redelivers), and so does a runtime
that dies mid-route (after ``ack_wait``). A route slower than ``ack_wait`` reports progress
so that its message is not redelivered meanwhile. ``to: nats:orders.created`` publishes to
JetStream, acknowledged by the server, when a stream covers the subject, else to core NATS.
``stream=NAME`` creates that stream for the subject when it does not exist. The server is
the ``servers`` option, else the context's ``nats_url`` setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import TYPE_CHECKING, Any

from meshgate.integration._component import Component, Consumer, Endpoint, Processor, Producer
from meshgate.integration._errors import EndpointError, IntegrationError
from meshgate.integration._message import Exchange, ExchangePattern, Message
from meshgate.integration._uri import EndpointUri, Options

if TYPE_CHECKING:
    from meshgate.integration._context import IntegrationContext

__all__ = ["NatsComponent"]

DEFAULT_URL = "nats://127.0.0.1:4222"
log = logging.getLogger("meshgate.integration.nats")
_INTERNAL = ("http_", "amqp_", "nats_")
_SUBJECT = re.compile(r"[^\s.]+(\.[^\s.]+)*")
_NAME = re.compile(r"[A-Za-z0-9_-]+")


class NatsComponent(Component):
    def __init__(self) -> None:
        self._connections: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    def create_endpoint(self, uri: EndpointUri, context: IntegrationContext) -> Endpoint:
        return _NatsEndpoint(uri, context, self)

    async def connection(self, url: str) -> Any:
        import nats

        async with self._lock:
            connection = self._connections.get(url)
            if connection is None or connection.is_closed:
                try:
                    connection = await nats.connect(
                        url, connect_timeout=5, max_reconnect_attempts=-1, allow_reconnect=True
                    )
                except Exception as exc:
                    shown = url.split("@")[-1]
                    raise IntegrationError(f"nats: cannot connect to {shown}: {exc}") from None
                self._connections[url] = connection
            return connection

    async def stop(self) -> None:
        connections, self._connections = self._connections, {}
        for connection in connections.values():
            if not connection.is_closed:
                await connection.flush()
                await connection.close()


class _NatsEndpoint(Endpoint):
    def __init__(self, uri: EndpointUri, context: IntegrationContext, component: NatsComponent):
        super().__init__(uri, context)
        self.component = component
        self.subject = uri.path
        if not _SUBJECT.fullmatch(self.subject):
            raise EndpointError(f"{uri.text}: write nats:SUBJECT, e.g. nats:orders.created")
        options = Options(uri)
        self.servers = options.text("servers")
        self.stream = options.text("stream")
        self.durable = options.text("durable") or "meshgate-" + re.sub(
            r"[^A-Za-z0-9_-]", "_", self.subject.replace("*", "any").replace(">", "all")
        )
        for name, value in (("stream", self.stream), ("durable", self.durable)):
            if value is not None and not _NAME.fullmatch(value):
                raise EndpointError(f"{uri.text}: option {name!r} must be letters, digits, _ or -")
        self.batch = options.integer("batch", 10, minimum=1, maximum=1000)
        self.concurrent_consumers = options.integer("concurrent_consumers", 1, 1, 100)
        self.ack_wait = options.duration("ack_wait", 30.0)
        self.max_deliver = options.integer("max_deliver", -1, minimum=-1)
        self.nak_delay = options.duration("nak_delay", 0.0)
        self.poll_timeout = options.duration("poll_timeout", 1.0)
        options.finish()
        if self.ack_wait < 0.1:
            raise EndpointError(f"{uri.text}: option 'ack_wait' must be at least 100ms")
        if self.poll_timeout < 0.01:
            raise EndpointError(f"{uri.text}: option 'poll_timeout' must be at least 10ms")

    @property
    def url(self) -> str:
        return self.servers or str(self.context.settings.get("nats_url", DEFAULT_URL))

    async def jetstream(self) -> tuple[Any, Any]:
        """The connection and its JetStream context; creates ``stream`` when it is missing."""
        from nats.js.errors import NotFoundError

        connection = await self.component.connection(self.url)
        js = connection.jetstream(timeout=5)
        if self.stream is not None:
            try:
                await js.stream_info(self.stream)
            except NotFoundError:
                await js.add_stream(name=self.stream, subjects=[self.subject])
        return connection, js

    async def covering_stream(self, js: Any) -> str | None:
        from nats.js.errors import NotFoundError

        if self.stream is not None:
            return self.stream
        try:
            return str(await js.find_stream_name_by_subject(self.subject))
        except NotFoundError:
            return None

    def create_consumer(self, processor: Processor) -> Consumer:
        return _NatsConsumer(self, processor)

    def create_producer(self) -> Producer:
        if any(token in ("*", ">") for token in self.subject.split(".")):
            raise EndpointError(f"{self.uri.text}: cannot publish to a wildcard subject")
        return _NatsProducer(self)


class _NatsConsumer(Consumer):
    endpoint: _NatsEndpoint

    def __init__(self, endpoint: Endpoint, processor: Processor) -> None:
        super().__init__(endpoint, processor)
        self._subscriptions: list[Any] = []
        self._workers: list[asyncio.Task[None]] = []
        self._fetching: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def start(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig

        endpoint = self.endpoint
        _, js = await endpoint.jetstream()
        stream = await endpoint.covering_stream(js)
        if stream is None:
            raise IntegrationError(
                f"{endpoint.uri.text}: no JetStream stream covers subject {endpoint.subject!r};"
                " create one or set stream=NAME"
            )
        config = ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=endpoint.ack_wait,
            max_deliver=endpoint.max_deliver,
            max_ack_pending=endpoint.batch * endpoint.concurrent_consumers * 10,
        )
        # One pull subscription a worker: the durable consumer spreads messages over them.
        self._subscriptions = [
            await js.pull_subscribe(
                endpoint.subject, durable=endpoint.durable, stream=stream, config=config
            )
            for _ in range(endpoint.concurrent_consumers)
        ]
        self._stopping = False
        self._workers = [
            asyncio.create_task(self._work(subscription), name=f"nats consumer {endpoint.uri}")
            for subscription in self._subscriptions
        ]

    async def _work(self, subscription: Any) -> None:
        from nats.errors import TimeoutError as NatsTimeout

        task = asyncio.current_task()
        assert task is not None
        while not self._stopping:
            self._fetching.add(task)
            try:
                batch = await subscription.fetch(
                    self.endpoint.batch, timeout=self.endpoint.poll_timeout
                )
            except NatsTimeout:
                continue
            except Exception as exc:
                log.warning("%s: fetch failed (%s); retrying", self.endpoint.uri.text, exc)
                await asyncio.sleep(self.endpoint.poll_timeout)
                continue
            finally:
                self._fetching.discard(task)
            for index, incoming in enumerate(batch):
                if self._stopping:
                    # Not started: back to JetStream at once rather than after ack_wait.
                    for unstarted in batch[index:]:
                        await unstarted.nak()
                    break
                await self._deliver(incoming)

    async def _deliver(self, incoming: Any) -> None:
        exchange = _exchange_of(incoming)
        progress = asyncio.create_task(self._report_progress(incoming))
        try:
            try:
                await self.processor(exchange)
            except Exception as exc:
                exchange.exception = exc
            except asyncio.CancelledError:
                # Cut short by the drain deadline: back to JetStream now, not after ack_wait.
                with contextlib.suppress(Exception):
                    await incoming.nak()
                raise
        finally:
            progress.cancel()
        if exchange.exception is None:
            await incoming.ack()
            return
        log.warning(
            "%s: message %s failed (%s); returned to JetStream",
            self.endpoint.uri.text,
            incoming.metadata.sequence.stream,
            exchange.exception,
        )
        await incoming.nak(delay=self.endpoint.nak_delay or None)

    async def _report_progress(self, incoming: Any) -> None:
        """Keeps a slow route's message from being redelivered while it still runs."""
        while True:
            await asyncio.sleep(self.endpoint.ack_wait / 2)
            await incoming.in_progress()

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._fetching):
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        subscriptions, self._subscriptions = self._subscriptions, []
        if subscriptions:
            connection = await self.endpoint.component.connection(self.endpoint.url)
            await connection.flush()
            for subscription in subscriptions:
                await subscription.unsubscribe()


def _exchange_of(incoming: Any) -> Exchange:
    headers: dict[str, Any] = dict(incoming.headers or {})
    metadata = incoming.metadata
    headers["nats_subject"] = incoming.subject
    headers["nats_stream"] = metadata.stream
    headers["nats_sequence"] = metadata.sequence.stream
    exchange = Exchange(Message(incoming.data, headers), ExchangePattern.IN_ONLY)
    exchange.properties["redelivered"] = metadata.num_delivered > 1
    exchange.properties["delivery_count"] = metadata.num_delivered
    return exchange


class _NatsProducer(Producer):
    endpoint: _NatsEndpoint

    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__(endpoint)
        self._connection: Any = None
        self._js: Any = None
        self._stream: str | None = None

    async def start(self) -> None:
        self._connection, self._js = await self.endpoint.jetstream()
        self._stream = await self.endpoint.covering_stream(self._js)

    async def process(self, exchange: Exchange) -> None:
        if self._connection is None:
            raise IntegrationError(f"{self.endpoint.uri.text}: the producer is not started")
        message = exchange.message
        headers: dict[str, str] = {}
        for name, value in message.headers.items():
            if name.lower().startswith(_INTERNAL) or value is None:
                continue
            if isinstance(value, str | int | float | bool):
                headers[name] = str(value)
        if "content-type" not in headers and not isinstance(message.body, bytes | str | None):
            headers["content-type"] = "application/json"
        subject = self.endpoint.subject
        if self._stream is not None:
            # Acknowledged by JetStream before this returns: a sent message is stored.
            await self._js.publish(subject, message.body_bytes(), headers=headers or None)
        else:
            await self._connection.publish(subject, message.body_bytes(), headers=headers or None)
            await self._connection.flush()

    async def stop(self) -> None:
        self._connection = self._js = None
