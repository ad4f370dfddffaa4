"""Route definitions compiled into processors: one small async callable per step.

A processor works on the exchange in place. A failing step's exception is caught by the
step's channel, which redelivers it as the route's error handler says, then records the
failure on the exchange (``exception``, ``failed_step``); the pipeline stops there.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import random
import time
from bisect import bisect_left
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from time import perf_counter
from typing import TYPE_CHECKING, Any

from meshgate.integration import _model as m
from meshgate.integration._component import Processor, Producer
from meshgate.integration._dataformats import marshal, unmarshal
from meshgate.integration._errors import (
    CircuitOpenError,
    EndpointError,
    ExpressionError,
    IntegrationError,
    PayloadError,
    SchemaValidationError,
)
from meshgate.integration._message import Exchange, ExchangePattern, Message
from meshgate.integration._metrics import BOUNDS, Series
from meshgate.integration._schemas import SchemaValidator
from meshgate.integration._state import (
    AggregationRepository,
    IdempotentRepository,
    message_from_item,
    message_to_item,
)
from meshgate.integration._tracing import traced

if TYPE_CHECKING:
    from meshgate.integration._context import IntegrationContext

__all__ = ["Compiled", "Service", "compile_route", "combine", "step_name"]

#: A step that never waits: run in place by a pipeline.
SyncStep = Callable[[Exchange], None]

log = logging.getLogger("meshgate.integration")


# The steps whose processor is synchronous (they compute; they never wait).
_SYNC_STEPS = (
    m.Log,
    m.SetHeader,
    m.RemoveHeader,
    m.SetProperty,
    m.Transform,
    m.Marshal,
    m.Unmarshal,
    m.Validate,
    m.Stop,
)


class Service:
    """Something a route starts and stops with itself (a producer, an aggregator's timers)."""

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


class _ProducerService(Service):
    def __init__(self, producer: Producer) -> None:
        self.producer = producer

    async def start(self) -> None:
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()


class _Closing(Service):
    """Closes a repository's connections when its route stops."""

    def __init__(self, repository: IdempotentRepository) -> None:
        self.repository = repository

    async def stop(self) -> None:
        await self.repository.close()


class Compiled:
    """A route's processor and the services it needs running."""

    def __init__(self, processor: Processor, services: list[Service]) -> None:
        self.processor = processor
        self.services = services


def step_name(step: m.Step) -> str:
    """The DSL name of a step: ``To`` is ``to``, ``SetHeader`` is ``set_header``."""
    name = type(step).__name__
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


def compile_route(context: IntegrationContext, route: m.Route) -> Compiled:
    compiler = _Compiler(context, route)
    processor = compiler.steps(route.steps, "steps")
    return Compiled(processor, compiler.services)


def _retryable(exc: BaseException) -> bool:
    return not isinstance(exc, IntegrationError) or exc.retryable


class _Compiler:
    def __init__(self, context: IntegrationContext, route: m.Route) -> None:
        self.context = context
        self.route = route
        self.handler = route.error_handler or context.error_handler
        self.services: list[Service] = []

    def steps(self, steps: Iterable[m.Step], path: str) -> Processor:
        channels = [self.step(step, f"{path}[{i}]") for i, step in enumerate(steps)]
        if len(channels) == 1:
            return channels[0]
        return _Pipeline(channels)

    def step(self, step: m.Step, path: str) -> _Channel:
        where = f"{path}.{step_name(step)}"
        build = getattr(self, "_" + step_name(step))
        processor = build(step, where)
        leaf = not isinstance(
            step,
            m.Choice
            | m.Filter
            | m.Split
            | m.Multicast
            | m.CircuitBreaker
            | m.LoadBalance
            | m.IdempotentConsumer
            | m.Aggregate,
        )
        redeliveries = self.handler.maximum_redeliveries if self.handler and leaf else 0
        series = self.context.metrics.step(self.route.id, where)
        if isinstance(step, _SYNC_STEPS):
            return _Channel(
                _awaitable(processor), where, redeliveries, self.handler, series, processor
            )
        return _Channel(processor, where, redeliveries, self.handler, series)

    def producer(self, uri: str) -> Producer:
        producer = self.context.endpoint(uri).create_producer()
        self.services.append(_ProducerService(producer))
        return traced(producer, self.context.tracing)

    def _to(self, step: m.To, where: str) -> Processor:
        return self.producer(step.uri).process

    def _log(self, step: m.Log, where: str) -> SyncStep:
        logger = logging.getLogger(step.logger or f"meshgate.integration.route.{self.route.id}")
        level = logging.getLevelName(step.level.upper())
        template = step.message

        def process(exchange: Exchange) -> None:
            if logger.isEnabledFor(level):
                logger.log(level, "%s", template.render(exchange))

        return process

    def _set_header(self, step: m.SetHeader, where: str) -> SyncStep:
        name, value = step.name, step.value.evaluate

        def process(exchange: Exchange) -> None:
            exchange.message.headers[name] = value(exchange)

        return process

    def _remove_header(self, step: m.RemoveHeader, where: str) -> SyncStep:
        name = step.name

        def process(exchange: Exchange) -> None:
            exchange.message.headers.pop(name, None)

        return process

    def _set_property(self, step: m.SetProperty, where: str) -> SyncStep:
        name, value = step.name, step.value.evaluate

        def process(exchange: Exchange) -> None:
            exchange.properties[name] = value(exchange)

        return process

    def _transform(self, step: m.Transform, where: str) -> SyncStep:
        value = step.value.evaluate

        def process(exchange: Exchange) -> None:
            exchange.message.body = value(exchange)

        return process

    def _marshal(self, step: m.Marshal, where: str) -> SyncStep:
        fmt, options = step.format, dict(step.options)

        def process(exchange: Exchange) -> None:
            exchange.message.body = marshal(exchange.message, fmt, options)

        return process

    def _unmarshal(self, step: m.Unmarshal, where: str) -> SyncStep:
        fmt, options = step.format, dict(step.options)

        def process(exchange: Exchange) -> None:
            exchange.message.body = unmarshal(exchange.message, fmt, options)

        return process

    def _validate(self, step: m.Validate, where: str) -> SyncStep:
        validator = None if step.schema is None else SchemaValidator(step.schema)
        expr = step.expr

        def process(exchange: Exchange) -> None:
            body = exchange.message.body
            if validator is not None:
                if isinstance(body, bytes | str):
                    raise SchemaValidationError(
                        "validate: the body is text, not data; unmarshal it first"
                    )
                problems = validator.errors(body)
                if problems:
                    raise SchemaValidationError(
                        "the body does not match its schema: " + "; ".join(problems)
                    )
            if expr is not None and not expr.matches(exchange):
                raise SchemaValidationError(f"validate: {expr.source!r} is not true")

        return process

    def _stop(self, step: m.Stop, where: str) -> SyncStep:
        def process(exchange: Exchange) -> None:
            exchange.stopped = True

        return process

    def _process(self, step: m.Process, where: str) -> Processor:
        function = step.function

        async def process(exchange: Exchange) -> None:
            result = function(exchange)
            if inspect.isawaitable(result):
                await result

        return process

    def _choice(self, step: m.Choice, where: str) -> Processor:
        branches = [
            (when.expr, self.steps(when.steps, f"{where}.when[{i}].steps"))
            for i, when in enumerate(step.when)
        ]
        otherwise = (
            None if step.otherwise is None else self.steps(step.otherwise, f"{where}.otherwise")
        )

        async def process(exchange: Exchange) -> None:
            for expr, branch in branches:
                if expr.matches(exchange):
                    await branch(exchange)
                    return
            if otherwise is not None:
                await otherwise(exchange)

        return process

    def _filter(self, step: m.Filter, where: str) -> Processor:
        expr = step.expr
        inner = self.steps(step.steps, f"{where}.steps")

        async def process(exchange: Exchange) -> None:
            matched = expr.matches(exchange)
            exchange.properties["filter_matched"] = matched
            if matched:
                await inner(exchange)

        return process

    def _split(self, step: m.Split, where: str) -> Processor:
        inner = self.steps(step.steps, f"{where}.steps")
        return _Splitter(step, inner)

    def _aggregate(self, step: m.Aggregate, where: str) -> Processor:
        inner = self.steps(step.steps, f"{where}.steps")
        repository = self.context.aggregation_repository(
            step.repository, f"{self.route.id}:{where}"
        )
        aggregator = _Aggregator(self.context, step, inner, repository)
        self.services.append(aggregator)
        return aggregator.process

    def _branches(self, branches: Iterable[m.Step], where: str) -> list[Processor]:
        return [self.step(branch, f"{where}.steps[{i}]") for i, branch in enumerate(branches)]

    def _multicast(self, step: m.Multicast, where: str) -> Processor:
        branches = self._branches(step.branches, where)
        strategy = step.strategy or "last"

        async def process(exchange: Exchange) -> None:
            copies = [exchange.copy() for _ in branches]
            runs = [branch(copy) for branch, copy in zip(branches, copies, strict=True)]
            await _run_all(runs, step.parallel, step.timeout, copies, step.stop_on_exception)
            _gather_into(exchange, copies, strategy)

        return process

    def _recipient_list(self, step: m.RecipientList, where: str) -> Processor:
        context, strategy = self.context, step.strategy or "last"

        async def process(exchange: Exchange) -> None:
            producers = []
            for uri in _uris(step.expr.evaluate(exchange), step.delimiter):
                try:
                    producers.append(await context.dynamic_producer(uri))
                except EndpointError:
                    if not step.ignore_invalid_endpoints:
                        raise
            copies = [exchange.copy() for _ in producers]
            runs = [_send(p, c) for p, c in zip(producers, copies, strict=True)]
            await _run_all(runs, step.parallel, None, copies, True)
            _gather_into(exchange, copies, strategy)

        return process

    def _routing_slip(self, step: m.RoutingSlip, where: str) -> Processor:
        context = self.context

        async def process(exchange: Exchange) -> None:
            for uri in _uris(step.expr.evaluate(exchange), step.delimiter):
                producer = await context.dynamic_producer(uri)
                await producer.process(exchange)
                if exchange.exception is not None:
                    _rethrow(exchange)
                if exchange.stopped:
                    return

        return process

    def _wire_tap(self, step: m.WireTap, where: str) -> Processor:
        producer = self.producer(step.uri)
        context = self.context

        async def process(exchange: Exchange) -> None:
            tapped = exchange.copy()
            tapped.pattern = ExchangePattern.IN_ONLY
            context.background(_tap(producer, tapped, step.uri))

        return process

    def _enrich(self, step: m.Enrich, where: str) -> Processor:
        producer = self.producer(step.uri)

        async def process(exchange: Exchange) -> None:
            resource = exchange.copy()
            resource.pattern = ExchangePattern.IN_OUT
            await producer.process(resource)
            if resource.exception is not None:
                _rethrow(resource)
            reply = resource.message.body
            if step.target is not None:
                body = exchange.message.body
                if not isinstance(body, dict):
                    raise PayloadError(
                        f"enrich: cannot set {step.target!r} on a body that is not a mapping"
                    )
                exchange.message.body = {**body, step.target: reply}
            else:
                _gather_into(exchange, [exchange.copy(), resource], step.strategy or "last")

        return process

    def _throttle(self, step: m.Throttle, where: str) -> Processor:
        granted: deque[float] = deque()
        lock = asyncio.Lock()
        maximum, period = step.maximum, step.period

        async def process(exchange: Exchange) -> None:
            async with lock:
                now = time.monotonic()
                while granted and granted[0] <= now - period:
                    granted.popleft()
                if len(granted) >= maximum:
                    wait = granted[0] + period - now
                    await asyncio.sleep(wait)
                    granted.popleft()
                granted.append(time.monotonic())

        return process

    def _delay(self, step: m.Delay, where: str) -> Processor:
        seconds = step.seconds

        async def process(exchange: Exchange) -> None:
            await asyncio.sleep(seconds)

        return process

    def _circuit_breaker(self, step: m.CircuitBreaker, where: str) -> Processor:
        inner = self.steps(step.steps, f"{where}.steps")
        fallback = None if step.fallback is None else self.steps(step.fallback, f"{where}.fallback")
        return _CircuitBreaker(step, inner, fallback, where)

    def _load_balance(self, step: m.LoadBalance, where: str) -> Processor:
        branches = self._branches(step.branches, where)
        if step.strategy == "failover":

            async def failover(exchange: Exchange) -> None:
                original = exchange.message.copy()
                for branch in branches:
                    exchange.exception = None
                    exchange.message = original.copy()
                    await branch(exchange)
                    if exchange.exception is None:
                        return

            return failover
        order: Iterator[int]
        if step.strategy == "round_robin":
            order = itertools.cycle(range(len(branches)))
        elif step.strategy == "weighted":
            weights = step.weights or tuple(1 for _ in branches)
            order = itertools.cycle([i for i, w in enumerate(weights) for _ in range(w)])
        else:
            order = (random.randrange(len(branches)) for _ in itertools.count())

        async def balance(exchange: Exchange) -> None:
            await branches[next(order)](exchange)

        return balance

    def _idempotent_consumer(self, step: m.IdempotentConsumer, where: str) -> Processor:
        inner = self.steps(step.steps, f"{where}.steps")
        repository = self.context.idempotent_repository(
            step.repository, f"{self.route.id}:{where}", step.ttl
        )
        self.services.append(_Closing(repository))
        expr = step.expr

        async def process(exchange: Exchange) -> None:
            key = expr.evaluate(exchange)
            if key is None or key == "":
                raise ExpressionError(f"idempotent_consumer: {expr.source!r} gave no message id")
            key = str(key)
            if not await repository.add(key):
                exchange.properties["duplicate"] = True
                exchange.stopped = True
                return
            await inner(exchange)
            if exchange.exception is not None:
                # Not done: a redelivery of this message must not count as a duplicate.
                await repository.remove(key)

        return process


class _Pipeline:
    __slots__ = ("channels",)

    def __init__(self, channels: list[_Channel]) -> None:
        self.channels = channels

    async def __call__(self, exchange: Exchange) -> None:
        for channel in self.channels:
            # A synchronous step runs in place: no coroutine to create and await.
            if channel.call is not None:
                channel.run(exchange)
            else:
                await channel(exchange)
            if exchange.exception is not None or exchange.stopped:
                return


def _awaitable(step: SyncStep) -> Processor:
    async def process(exchange: Exchange) -> None:
        step(exchange)

    return process


class _Channel:
    """Runs one step: redelivers a failure, then records it on the exchange and its series.

    ``call`` is set for a synchronous step that is not redelivered: a pipeline then
    runs it with :meth:`run`, without a coroutine.
    """

    __slots__ = ("processor", "call", "where", "redeliveries", "handler", "series")

    def __init__(
        self,
        processor: Processor,
        where: str,
        redeliveries: int,
        handler: m.ErrorHandler | None,
        series: Series,
        call: SyncStep | None = None,
    ) -> None:
        self.processor = processor
        self.call = call if redeliveries == 0 else None
        self.where = where
        self.redeliveries = redeliveries
        self.handler = handler
        self.series = series

    def run(self, exchange: Exchange) -> None:
        started = perf_counter()
        try:
            self.call(exchange)  # type: ignore[misc]
        except Exception as exc:
            self._failed(exchange, exc, started)
            return
        # Series.observe, inline: this runs for every synchronous step of every exchange.
        elapsed = perf_counter() - started
        series = self.series
        series.counts[bisect_left(BOUNDS, elapsed)] += 1
        series.sum += elapsed

    async def __call__(self, exchange: Exchange) -> None:
        if self.call is not None:
            self.run(exchange)
            return
        started = perf_counter()
        attempt = 0
        while True:
            try:
                await self.processor(exchange)
            except Exception as exc:
                if attempt >= self.redeliveries or not _retryable(exc):
                    self._failed(exchange, exc, started)
                    return
                attempt += 1
                exchange.properties["redelivery_counter"] = attempt
                handler = self.handler
                assert handler is not None
                delay = min(handler.delay * handler.backoff ** (attempt - 1), handler.max_delay)
                log.info(
                    "redelivery %d of %d at %s after %s: %s",
                    attempt,
                    self.redeliveries,
                    self.where,
                    type(exc).__name__,
                    exc,
                )
                await asyncio.sleep(delay)
                continue
            self._completed(exchange, started)
            return

    def _failed(self, exchange: Exchange, exc: Exception, started: float) -> None:
        exchange.exception = exc
        exchange.failed_step = self.where
        self.series.observe(perf_counter() - started)
        self.series.failures += 1

    def _completed(self, exchange: Exchange, started: float) -> None:
        self.series.observe(perf_counter() - started)
        if exchange.exception is not None:
            self.series.failures += 1
            if exchange.failed_step is None:
                exchange.failed_step = self.where


def _rethrow(exchange: Exchange) -> None:
    exc, exchange.exception = exchange.exception, None
    assert exc is not None
    raise exc


async def _send(producer: Producer, exchange: Exchange) -> None:
    try:
        await producer.process(exchange)
    except Exception as exc:
        exchange.exception = exc


async def _tap(producer: Producer, exchange: Exchange, uri: str) -> None:
    try:
        await producer.process(exchange)
    except Exception as exc:
        exchange.exception = exc
    if exchange.exception is not None:
        log.warning("wire tap to %s failed: %s", uri, exchange.exception)


def _uris(value: Any, delimiter: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [uri.strip() for uri in value.split(delimiter) if uri.strip()]
    if isinstance(value, list) and all(isinstance(uri, str) for uri in value):
        return value
    raise ExpressionError(f"expected endpoint URIs (text or a list of text), got {value!r:.80}")


async def _run_all(
    runs: list[Any],
    parallel: bool,
    timeout: float | None,
    copies: list[Exchange],
    stop_on_exception: bool,
) -> None:
    if not parallel:
        for run, copy in zip(runs, copies, strict=True):
            if timeout is None:
                await run
            else:
                await asyncio.wait_for(run, timeout)
            if copy.exception is not None and stop_on_exception:
                for rest in runs:
                    if inspect.iscoroutine(rest):
                        rest.close()
                return
        return
    tasks = [asyncio.ensure_future(run) for run in runs]
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    for task, copy in zip(tasks, copies, strict=True):
        if task in pending:
            copy.properties["timed_out"] = True


def _gather_into(exchange: Exchange, results: list[Exchange], strategy: str) -> None:
    """Fold the results of several copies into ``exchange`` (failures first)."""
    for result in results:
        if result.exception is not None:
            exchange.exception = result.exception
            exchange.failed_step = result.failed_step
            return
    finished = [r for r in results if not r.properties.get("timed_out")]
    if not finished:
        return
    message = combine([r.message for r in finished], strategy, exchange.message)
    exchange.message = message


def combine(messages: list[Message], strategy: str, original: Message) -> Message:
    """The message an aggregation strategy makes of several."""
    if strategy == "last":
        return messages[-1].copy()
    if strategy == "first":
        return messages[0].copy()
    headers = dict(original.headers)
    if strategy == "collect":
        return Message([msg.body for msg in messages], headers)
    if strategy == "merge":
        merged: dict[str, Any] = {}
        for msg in messages:
            if not isinstance(msg.body, dict):
                raise PayloadError(
                    f"merge: every body must be a mapping, one is {type(msg.body).__name__}"
                )
            merged.update(msg.body)
        return Message(merged, headers)
    bodies = [msg.body for msg in messages]
    if all(isinstance(body, bytes) for body in bodies):
        return Message(b"".join(bodies), headers)
    return Message("".join(msg.body_text() for msg in messages), headers)


class _Splitter:
    def __init__(self, step: m.Split, inner: Processor) -> None:
        self.step = step
        self.inner = inner

    async def __call__(self, exchange: Exchange) -> None:
        step = self.step
        results: list[Exchange] = []
        index = 0
        if not step.parallel:
            async for part, last in _lookahead(self._parts(exchange)):
                sub = self._sub(exchange, part, index, last)
                index += 1
                await self.inner(sub)
                if sub.exception is not None and step.stop_on_exception:
                    exchange.exception, exchange.failed_step = sub.exception, sub.failed_step
                    return
                if step.aggregate is not None and not sub.stopped:
                    results.append(sub)
        else:
            slots = asyncio.Semaphore(step.max_parallel)
            tasks: list[tuple[Exchange, asyncio.Task[None]]] = []

            async def run(sub: Exchange) -> None:
                try:
                    await self.inner(sub)
                finally:
                    slots.release()

            try:
                async for part, last in _lookahead(self._parts(exchange)):
                    # Streaming: no more parts in memory than there are slots.
                    await slots.acquire()
                    sub = self._sub(exchange, part, index, last)
                    index += 1
                    tasks.append((sub, asyncio.ensure_future(run(sub))))
                await asyncio.gather(*(task for _, task in tasks))
            finally:
                for _, task in tasks:
                    task.cancel()
            for sub, _ in tasks:
                if sub.exception is not None:
                    exchange.exception, exchange.failed_step = sub.exception, sub.failed_step
                    return
                if step.aggregate is not None and not sub.stopped:
                    results.append(sub)
        exchange.properties["split_size"] = index
        if step.aggregate is not None and results:
            exchange.message = combine(
                [r.message for r in results], step.aggregate, exchange.message
            )

    @staticmethod
    def _sub(exchange: Exchange, part: Any, index: int, last: bool) -> Exchange:
        sub = exchange.copy()
        sub.message.body = part
        sub.properties["split_index"] = index
        sub.properties["split_complete"] = last
        if last:
            sub.properties["split_size"] = index + 1
        return sub

    async def _parts(self, exchange: Exchange) -> AsyncIterator[Any]:
        step = self.step
        value = exchange.message.body if step.expr is None else step.expr.evaluate(exchange)
        if step.tokenize is not None or isinstance(value, str | bytes):
            if not isinstance(value, str | bytes):
                raise PayloadError(f"split: cannot tokenize {type(value).__name__}, only text")
            for token in _tokens(value, step.tokenize or "\n"):
                yield token
            return
        if isinstance(value, list | tuple):
            for item in value:
                yield item
            return
        if value is None:
            return
        if hasattr(value, "__aiter__"):
            async for item in value:
                yield item
            return
        raise PayloadError(f"split: cannot split {type(value).__name__}; give an expr to a list")


def _tokens(text: str | bytes, token: str) -> Iterator[Any]:
    """Cut lazily: a large text is never copied into a list of all its pieces."""
    sep: Any = token.encode() if isinstance(text, bytes) else token
    start = 0
    while start < len(text):
        end = text.find(sep, start)
        if end < 0:
            yield text[start:]
            return
        yield text[start:end]
        start = end + len(sep)


async def _lookahead(parts: AsyncIterator[Any]) -> AsyncIterator[tuple[Any, bool]]:
    """Each part with whether it is the last, at the cost of holding one part back."""
    iterator = parts.__aiter__()
    try:
        current = await iterator.__anext__()
    except StopAsyncIteration:
        return
    async for following in iterator:
        yield current, False
        current = following
    yield current, True


class _Aggregator(Service):
    """Groups exchanges by correlation key and releases a group when it is complete."""

    def __init__(
        self,
        context: IntegrationContext,
        step: m.Aggregate,
        inner: Processor,
        repository: AggregationRepository,
    ) -> None:
        self.context = context
        self.step = step
        self.inner = inner
        self.repository = repository
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._interval: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        step = self.step
        if step.completion_timeout is not None:
            # Groups that survived a restart still complete on time.
            now = time.time()
            for key, updated in (await self.repository.groups()).items():
                remaining = max(0.0, updated + step.completion_timeout - now)
                self._arm(key, remaining)
        if step.completion_interval is not None:
            self._interval = asyncio.ensure_future(self._every(step.completion_interval))

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._interval is not None:
            self._interval.cancel()
            self._interval = None
        await self.repository.close()

    async def process(self, exchange: Exchange) -> None:
        step = self.step
        key = step.correlation.evaluate(exchange)
        if key is None or key == "":
            raise ExpressionError(
                f"aggregate: the correlation {step.correlation.source!r} gave no key"
            )
        key = str(key)
        # The exchange ends here; the group continues once complete.
        exchange.stopped = True
        async with self._lock:
            items = await self.repository.add(key, message_to_item(exchange.message))
            reason = None
            if step.completion_size is not None and len(items) >= step.completion_size:
                reason = "size"
            elif step.completion_predicate is not None:
                probe = self._aggregated(key, items)
                if step.completion_predicate.matches(probe):
                    reason = "predicate"
            if reason is None:
                if step.completion_timeout is not None:
                    self._arm(key, step.completion_timeout)
                return
            items = await self.repository.take(key)
            self._disarm(key)
        if items:
            await self._release(key, items, reason)

    def _aggregated(self, key: str, items: list[dict[str, Any]]) -> Exchange:
        messages = [message_from_item(item) for item in items]
        result = Exchange(combine(messages, self.step.strategy, messages[-1]))
        result.properties["aggregated_size"] = len(messages)
        result.properties["aggregated_correlation_key"] = key
        return result

    async def _release(self, key: str, items: list[dict[str, Any]], reason: str) -> None:
        result = self._aggregated(key, items)
        result.properties["aggregated_completed_by"] = reason
        await self.context.run_exchange(self.inner, result)

    def _arm(self, key: str, delay: float) -> None:
        self._disarm(key)
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(
            delay, lambda: self.context.background(self._timed_out(key))
        )

    def _disarm(self, key: str) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    async def _timed_out(self, key: str) -> None:
        async with self._lock:
            self._timers.pop(key, None)
            items = await self.repository.take(key)
        if items:
            await self._release(key, items, "timeout")

    async def _every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            async with self._lock:
                taken = []
                for key in await self.repository.groups():
                    self._disarm(key)
                    taken.append((key, await self.repository.take(key)))
            for key, items in taken:
                if items:
                    await self._release(key, items, "interval")


class _CircuitBreaker:
    """Closed: calls pass, failures counted. Open: calls refused (or the fallback runs)
    until ``open_seconds`` passed. Half open: trial calls decide which of the two follows."""

    def __init__(
        self, step: m.CircuitBreaker, inner: Processor, fallback: Processor | None, where: str
    ) -> None:
        self.step = step
        self.inner = inner
        self.fallback = fallback
        self.where = where
        self.state = "closed"
        self.failures = 0
        self.opened_at = 0.0
        self.trials = 0

    async def __call__(self, exchange: Exchange) -> None:
        step = self.step
        if self.state == "open":
            if time.monotonic() - self.opened_at < step.open_seconds:
                await self._refuse(exchange)
                return
            self.state, self.trials = "half_open", 0
        if self.state == "half_open":
            if self.trials >= step.half_open_calls:
                await self._refuse(exchange)
                return
            self.trials += 1
        await self.inner(exchange)
        if exchange.exception is None:
            self.state, self.failures = "closed", 0
            exchange.properties["circuit_breaker_state"] = self.state
            return
        self.failures += 1
        if self.state == "half_open" or self.failures >= step.failure_threshold:
            self.state, self.opened_at = "open", time.monotonic()
        exchange.properties["circuit_breaker_state"] = self.state
        if self.fallback is not None:
            exchange.properties["circuit_breaker_exception"] = exchange.exception
            exchange.exception = exchange.failed_step = None
            await self.fallback(exchange)

    async def _refuse(self, exchange: Exchange) -> None:
        exchange.properties["circuit_breaker_state"] = self.state
        if self.fallback is not None:
            await self.fallback(exchange)
            return
        raise CircuitOpenError(f"{self.where}: the circuit is open after repeated failures")
