"""In-process connectors: ``direct`` (synchronous call), ``seda`` (queue), ``timer``, ``log``."""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import TYPE_CHECKING

from meshgate.integration._component import Component, Consumer, Endpoint, Processor, Producer
from meshgate.integration._errors import EndpointError, IntegrationError, NoConsumerError
from meshgate.integration._message import Exchange, ExchangePattern, Message
from meshgate.integration._uri import EndpointUri, Options

if TYPE_CHECKING:
    from meshgate.integration._context import IntegrationContext

__all__ = [
    "DirectComponent",
    "FiringConsumer",
    "LogComponent",
    "PollingConsumer",
    "SedaComponent",
    "TimerComponent",
]

#: Nested direct calls allowed before an exchange is taken to be in a loop.
MAX_DIRECT_DEPTH = 64
_DEPTH = "direct_depth"


def _name(uri: EndpointUri) -> str:
    name = uri.path
    if not name or name.startswith("/"):
        raise EndpointError(f"{uri.text}: give a name, e.g. {uri.scheme}:orders")
    return name


class DirectComponent(Component):
    def create_endpoint(self, uri: EndpointUri, context: IntegrationContext) -> Endpoint:
        endpoint = DirectEndpoint(uri, context)
        Options(uri).finish()
        return endpoint


class DirectEndpoint(Endpoint):
    """The route consuming ``direct:name`` runs in the caller's task, on the same exchange."""

    def __init__(self, uri: EndpointUri, context: IntegrationContext) -> None:
        super().__init__(uri, context)
        self.name = _name(uri)

    def create_consumer(self, processor: Processor) -> Consumer:
        return _DirectConsumer(self, processor)

    def create_producer(self) -> Producer:
        return _DirectProducer(self)


class _DirectConsumer(Consumer):
    endpoint: DirectEndpoint

    async def start(self) -> None:
        self.endpoint.context.register_direct(self.endpoint.name, self.processor)

    async def stop(self) -> None:
        self.endpoint.context.unregister_direct(self.endpoint.name)


class _DirectProducer(Producer):
    endpoint: DirectEndpoint

    async def process(self, exchange: Exchange) -> None:
        endpoint = self.endpoint
        route = endpoint.context.direct_consumer(endpoint.name)
        if route is None:
            raise NoConsumerError(f"no started route consumes {endpoint.uri.text}")
        depth = exchange.properties.get(_DEPTH, 0)
        if depth >= MAX_DIRECT_DEPTH:
            raise IntegrationError(
                f"{endpoint.uri.text}: more than {MAX_DIRECT_DEPTH} nested direct calls"
                " (do direct endpoints call each other in a loop?)"
            )
        exchange.properties[_DEPTH] = depth + 1
        try:
            await route(exchange)
        finally:
            exchange.properties[_DEPTH] = depth
        if exchange.exception is not None:
            # The called route did not handle it: the caller's error handling does.
            exc, exchange.exception = exchange.exception, None
            raise exc


_Queue = asyncio.Queue[tuple[Exchange, "asyncio.Future[None] | None"]]


class SedaComponent(Component):
    """Queues by name: ``seda:q?size=5`` and ``seda:q`` are the same queue."""

    def __init__(self) -> None:
        self._queues: dict[str, _Queue] = {}

    def queue(self, name: str, size: int) -> _Queue:
        # Created on first use, inside the running loop; the first size given wins.
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = asyncio.Queue(size)
        return queue

    def create_endpoint(self, uri: EndpointUri, context: IntegrationContext) -> Endpoint:
        options = Options(uri)
        endpoint = SedaEndpoint(
            uri,
            context,
            self,
            size=options.integer("size", 1000, minimum=1, maximum=10_000_000),
            concurrent_consumers=options.integer("concurrent_consumers", 1, 1, 1000),
            block_when_full=options.boolean("block_when_full", True),
            timeout=options.duration("timeout", 30.0),
        )
        options.finish()
        return endpoint


class SedaEndpoint(Endpoint):
    """An in-memory queue: producers return at once (in-only) or when the consumer is done."""

    def __init__(
        self,
        uri: EndpointUri,
        context: IntegrationContext,
        component: SedaComponent,
        *,
        size: int,
        concurrent_consumers: int,
        block_when_full: bool,
        timeout: float,
    ) -> None:
        super().__init__(uri, context)
        self.name = _name(uri)
        self.size = size
        self.concurrent_consumers = concurrent_consumers
        self.block_when_full = block_when_full
        self.timeout = timeout
        self.component = component

    @property
    def queue(self) -> _Queue:
        return self.component.queue(self.name, self.size)

    def create_consumer(self, processor: Processor) -> Consumer:
        return _SedaConsumer(self, processor)

    def create_producer(self) -> Producer:
        return _SedaProducer(self)


class _SedaConsumer(Consumer):
    endpoint: SedaEndpoint

    def __init__(self, endpoint: Endpoint, processor: Processor) -> None:
        super().__init__(endpoint, processor)
        self._workers: list[asyncio.Task[None]] = []
        self._waiting: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def start(self) -> None:
        self._stopping = False
        self._workers = [
            asyncio.ensure_future(self._work()) for _ in range(self.endpoint.concurrent_consumers)
        ]

    async def _work(self) -> None:
        queue = self.endpoint.queue
        task = asyncio.current_task()
        assert task is not None
        while not self._stopping:
            self._waiting.add(task)
            try:
                exchange, done = await queue.get()
            finally:
                self._waiting.discard(task)
            try:
                await self.processor(exchange)
            except Exception as exc:
                exchange.exception = exc
            except asyncio.CancelledError:
                # Cut off at the drain deadline: an in-out caller must not take the
                # exchange as completed (and acknowledge its own message).
                exchange.exception = IntegrationError(
                    f"{self.endpoint.uri.text}: the route stopped before the exchange completed"
                )
                raise
            finally:
                queue.task_done()
                if done is not None and not done.done():
                    done.set_result(None)

    async def stop(self) -> None:
        # Waiting workers stop now, so that none takes another message (a cancelled get
        # leaves its message queued); busy ones finish the exchange they hold first.
        self._stopping = True
        for worker in self._waiting:
            worker.cancel()
        try:
            await asyncio.gather(*self._workers, return_exceptions=True)
        finally:
            self._workers = []
        left = self.endpoint.queue.qsize()
        if left:
            logging.getLogger("meshgate.integration").warning(
                "%s: %d message(s) left queued for the next consumer", self.endpoint.uri.text, left
            )


class _SedaProducer(Producer):
    endpoint: SedaEndpoint

    async def process(self, exchange: Exchange) -> None:
        endpoint = self.endpoint
        if exchange.pattern is ExchangePattern.IN_OUT:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            await self._put(exchange, done)
            await asyncio.wait_for(done, endpoint.timeout)
            return
        await self._put(exchange.copy(new_id=False), None)

    async def _put(self, exchange: Exchange, done: asyncio.Future[None] | None) -> None:
        queue = self.endpoint.queue
        if self.endpoint.block_when_full:
            await queue.put((exchange, done))
        else:
            try:
                queue.put_nowait((exchange, done))
            except asyncio.QueueFull:
                raise IntegrationError(f"{self.endpoint.uri.text}: the queue is full") from None


class TimerComponent(Component):
    def create_endpoint(self, uri: EndpointUri, context: IntegrationContext) -> Endpoint:
        options = Options(uri)
        endpoint = TimerEndpoint(
            uri,
            context,
            period=options.duration("period", 1.0),
            delay=options.duration("delay", 1.0),
            repeat_count=options.integer("repeat_count", 0, minimum=0),
        )
        options.finish()
        if endpoint.period <= 0 and endpoint.repeat_count != 1:
            raise EndpointError(f"{uri.text}: option 'period' must be more than 0")
        return endpoint


class TimerEndpoint(Endpoint):
    """Fires an empty in-only exchange every ``period`` (``repeat_count`` 0: forever)."""

    def __init__(
        self,
        uri: EndpointUri,
        context: IntegrationContext,
        *,
        period: float,
        delay: float,
        repeat_count: int,
    ) -> None:
        super().__init__(uri, context)
        self.name = _name(uri)
        self.period = period
        self.delay = delay
        self.repeat_count = repeat_count

    def create_consumer(self, processor: Processor) -> Consumer:
        return _TimerConsumer(self, processor)


class FiringConsumer(Consumer):
    """A consumer that fires exchanges on a schedule (timer, cron) from one task.

    Stopping lets a firing in progress finish its route and cancels the wait for the next.
    """

    def __init__(self, endpoint: Endpoint, processor: Processor) -> None:
        super().__init__(endpoint, processor)
        self._task: asyncio.Task[None] | None = None
        self._firing = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"fire {self.endpoint.uri.text}")

    async def _run(self) -> None:
        raise NotImplementedError

    async def fire(self, exchange: Exchange) -> None:
        self._firing = True
        try:
            await self.processor(exchange)
        except Exception:
            logging.getLogger("meshgate.integration").exception(
                "%s: the route failed", self.endpoint.uri.text
            )
        finally:
            self._firing = False

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        try:
            while self._firing and not task.done():
                await asyncio.sleep(0.005)
        finally:
            # Also when this stop is cancelled at the drain deadline: nothing fires again.
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class PollingConsumer(Consumer):
    """A consumer that polls its source from one task (file, sql).

    The subclass sets ``_task`` when it starts and ``_idle`` while it waits between
    polls. Stopping cancels an idle poll, else lets the exchange in flight finish, then
    :meth:`release` runs, also when the stop itself is cancelled at the drain deadline
    (what was in flight is then left for the next poll, unacknowledged).
    """

    def __init__(self, endpoint: Endpoint, processor: Processor) -> None:
        super().__init__(endpoint, processor)
        self._task: asyncio.Task[None] | None = None
        self._idle = True
        self._stopping = False

    async def stop(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        try:
            if task is not None:
                if self._idle:
                    task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        finally:
            await asyncio.shield(self._finish(task))

    async def _finish(self, task: asyncio.Task[None] | None) -> None:
        if task is not None:
            task.cancel()  # a no-op once it ended
            await asyncio.gather(task, return_exceptions=True)
        await self.release()

    async def release(self) -> None:
        """Release what the consumer holds (connections, pools)."""


class _TimerConsumer(FiringConsumer):
    endpoint: TimerEndpoint

    async def _run(self) -> None:
        endpoint = self.endpoint
        loop = asyncio.get_running_loop()
        next_at = loop.time() + endpoint.delay
        counter = itertools.count(1)
        for fired in counter:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            exchange = Exchange(Message(None, {}), ExchangePattern.IN_ONLY)
            exchange.properties["timer_name"] = endpoint.name
            exchange.properties["timer_counter"] = fired
            await self.fire(exchange)
            if endpoint.repeat_count and fired >= endpoint.repeat_count:
                return
            # Fixed rate, as Camel's timer: a slow route does not shift later firings.
            next_at = max(next_at + endpoint.period, loop.time())


class LogComponent(Component):
    def create_endpoint(self, uri: EndpointUri, context: IntegrationContext) -> Endpoint:
        options = Options(uri)
        level = options.choice("level", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO")
        show_headers = options.boolean("show_headers", False)
        options.finish()
        return LogEndpoint(uri, context, level=level, show_headers=show_headers)


class LogEndpoint(Endpoint):
    """Logs each exchange's body (and headers) to the logger named by the path."""

    def __init__(
        self, uri: EndpointUri, context: IntegrationContext, *, level: str, show_headers: bool
    ) -> None:
        super().__init__(uri, context)
        self.logger = logging.getLogger(_name(uri))
        self.level = logging.getLevelName(level)
        self.show_headers = show_headers

    def create_producer(self) -> Producer:
        return _LogProducer(self)


class _LogProducer(Producer):
    endpoint: LogEndpoint

    async def process(self, exchange: Exchange) -> None:
        endpoint = self.endpoint
        if not endpoint.logger.isEnabledFor(endpoint.level):
            return
        body = exchange.message.body
        shown = body if isinstance(body, str) else repr(body)
        if len(shown) > 1000:
            shown = shown[:1000] + "..."
        if endpoint.show_headers:
            endpoint.logger.log(
                endpoint.level, "Exchange[headers: %r, body: %s]", exchange.headers, shown
            )
        else:
            endpoint.logger.log(endpoint.level, "Exchange[body: %s]", shown)
