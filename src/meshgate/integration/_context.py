"""The integration context: components, endpoints and routes, started and stopped together.

As Camel's CamelContext: routes are added as definitions, compiled into processors at
once (so a bad endpoint or option is an error before anything starts), and started with
the context. Stopping stops every consumer first, lets in-flight exchanges finish within
a grace period, then releases producers, endpoints and components.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine, Iterable, Mapping
from time import perf_counter
from typing import Any, Literal

from meshgate.integration._component import Component, Consumer, Endpoint, Processor, Producer
from meshgate.integration._errors import DefinitionError, EndpointError, IntegrationError
from meshgate.integration._message import Exchange, ExchangePattern, Message
from meshgate.integration._metrics import IntegrationMetrics
from meshgate.integration._model import ErrorHandler, Route
from meshgate.integration._processors import Compiled, compile_route
from meshgate.integration._state import (
    AggregationRepository,
    IdempotentRepository,
    MemoryAggregationRepository,
    MemoryIdempotentRepository,
    RedisAggregationRepository,
    RedisIdempotentRepository,
)
from meshgate.integration._tracing import TRACE_PROPERTY, route_kind, traced
from meshgate.integration._uri import EndpointUri, parse_uri
from meshgate.telemetry.tracing import Tracing

__all__ = ["IntegrationContext", "RouteStartError", "RouteStatus"]

log = logging.getLogger("meshgate.integration")

RouteStatus = Literal["stopped", "started", "suspended", "failed"]
#: Routes consuming what other routes send stop after them, direct ones (which run in
#: their caller's task) last; the others first.
_STOP_WAVE = {"seda": 1, "direct": 2}


class RouteStartError(IntegrationError):
    """Routes that failed to start (the others were started); ``failures`` maps id to cause."""

    def __init__(self, failures: Mapping[str, BaseException]) -> None:
        self.failures = dict(failures)
        listed = "; ".join(f"route {rid!r}: {exc}" for rid, exc in self.failures.items())
        super().__init__(f"{len(self.failures)} route(s) failed to start: {listed}")


class _RouteRunner:
    """A route at run time: its compiled processor, its consumer and its state."""

    def __init__(self, context: IntegrationContext, route: Route, compiled: Compiled) -> None:
        self.context = context
        self.route = route
        self.compiled = compiled
        self.consumer: Consumer | None = None
        self.status: RouteStatus = "stopped"
        self.error: BaseException | None = None
        self.inflight = 0
        self.series = context.metrics.route(route.id)
        self.span_name = f"route {route.id}"
        self.span_kind = route_kind(route.from_uri.partition(":")[0])
        handler = route.error_handler or context.error_handler
        self.dead_letter: Producer | None = None
        if handler is not None and handler.dead_letter is not None:
            self.dead_letter = context.endpoint(handler.dead_letter).create_producer()

    async def process(self, exchange: Exchange) -> None:
        previous, exchange.route_id = exchange.route_id, self.route.id
        # The message as received, for the dead letter channel, if there is one.
        original = exchange.message.copy() if self.dead_letter is not None else None
        tracing = self.context.tracing
        if tracing is not None:
            caller = exchange.properties.get(TRACE_PROPERTY)
            hop = tracing.continue_from(exchange.headers, self.span_name, self.span_kind, caller)
            exchange.properties[TRACE_PROPERTY] = hop
            if hop.span is not None:
                hop.span.set_attribute("meshgate.route", self.route.id)
                hop.span.set_attribute("meshgate.exchange_id", exchange.id)
        self.inflight += 1
        started = perf_counter()
        try:
            await self.compiled.processor(exchange)
            failed = exchange.exception is not None
            if failed and self.dead_letter is not None:
                assert original is not None
                await self._dead_letter(exchange, original)
            # Counted once done, so that completed (exchanges - failures) never dips.
            self.series.observe(perf_counter() - started)
            if failed:
                self.series.failures += 1
        finally:
            self.inflight -= 1
            exchange.route_id = previous
            if tracing is not None:
                tracing.end(hop, exchange.exception)
                if caller is None:
                    exchange.properties.pop(TRACE_PROPERTY, None)
                else:
                    exchange.properties[TRACE_PROPERTY] = caller

    async def _dead_letter(self, exchange: Exchange, original: Message) -> None:
        """Send the message as the route received it, with the failure's cause and place."""
        cause = exchange.exception
        assert cause is not None and self.dead_letter is not None
        dead = Exchange(original.copy(), ExchangePattern.IN_ONLY)
        dead.properties["exception"] = cause
        dead.message.headers["dead_letter_cause"] = f"{type(cause).__name__}: {cause}"
        dead.message.headers["dead_letter_route"] = self.route.id
        dead.message.headers["dead_letter_step"] = exchange.failed_step or "from"
        try:
            await self.dead_letter.process(dead)
        except Exception as exc:
            dead.exception = exc
        if dead.exception is not None:
            log.error(
                "route %s: the dead letter channel failed (%s); the exchange stays failed",
                self.route.id,
                dead.exception,
            )
            return
        exchange.properties["exception_caught"] = cause
        exchange.properties["dead_lettered"] = True
        exchange.exception = None

    async def start(self) -> None:
        started: list[Any] = []
        try:
            if self.dead_letter is not None:
                await self.dead_letter.start()
                started.append(self.dead_letter)
            for service in self.compiled.services:
                await service.start()
                started.append(service)
            await self.start_consumer()
        except BaseException:
            for service in reversed(started):
                await _quietly(service.stop())
            raise

    async def start_consumer(self) -> None:
        """Start taking messages (again, after a suspension): the services are running."""
        consumer = self.context.endpoint(self.route.from_uri).create_consumer(self.process)
        await consumer.start()
        self.consumer = consumer
        self.status, self.error = "started", None

    async def stop_consumer(self) -> None:
        consumer, self.consumer = self.consumer, None
        if consumer is not None:
            await _quietly(consumer.stop())

    async def stop_services(self) -> None:
        for service in reversed(self.compiled.services):
            await _quietly(service.stop())
        if self.dead_letter is not None:
            await _quietly(self.dead_letter.stop())
        self.status = "stopped"


def _idle(runners: list[_RouteRunner]) -> bool:
    return all(runner.inflight == 0 for runner in runners)


async def _quietly(stopping: Coroutine[Any, Any, None]) -> None:
    try:
        await stopping
    except Exception:
        log.exception("stopping failed")


class IntegrationContext:
    """Owns the components, endpoints and routes of one integration runtime."""

    def __init__(
        self,
        components: Mapping[str, Component] | None = None,
        *,
        error_handler: ErrorHandler | None = None,
        settings: Mapping[str, Any] | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        from meshgate.integration.components import default_components

        self.components: dict[str, Component] = dict(default_components())
        #: Per-route and per-step series, rendered by :meth:`IntegrationMetrics.render`.
        self.metrics = IntegrationMetrics()
        if components:
            self.components.update(components)
        #: The error handler of routes that have none.
        self.error_handler = error_handler
        #: Context-wide settings read by components (``http_listen``, ``redis_url``).
        self.settings: dict[str, Any] = dict(settings or {})
        #: The runtime's tracer (None: off); set before routes are added, which use it.
        self.tracing = tracing
        self._endpoints: dict[str, Endpoint] = {}
        self._routes: dict[str, _RouteRunner] = {}
        self._dynamic: dict[str, Producer] = {}
        # Run-time producers being started (one start per URI, shared by its callers), a
        # counter of renewals (a producer started across one is made anew), and the stops
        # of renewed producers, which a context stop hurries.
        self._starting: dict[str, asyncio.Future[Producer]] = {}
        self._renewals = 0
        self._retiring: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._direct: dict[str, Processor] = {}
        self.started = False
        #: Set once stop() begins: nothing starts or reloads any more.
        self.stopping = False

    # components and endpoints

    def add_component(self, scheme: str, component: Component) -> None:
        self.components[scheme] = component

    def endpoint(self, uri: str) -> Endpoint:
        """The endpoint of ``uri``, created (and its options checked) on first use."""
        endpoint = self._endpoints.get(uri)
        if endpoint is None:
            parsed = parse_uri(uri, self.components)
            endpoint = self.components[parsed.scheme].create_endpoint(parsed, self)
            self._endpoints[uri] = endpoint
        return endpoint

    def parse_uri(self, uri: str) -> EndpointUri:
        return parse_uri(uri, self.components)

    async def dynamic_producer(self, uri: str) -> Producer:
        """A started producer for a URI computed at run time (recipient list, routing slip)."""
        producer = self._dynamic.get(uri)
        if producer is not None:
            return traced(producer, self.tracing)
        starting = self._starting.get(uri)
        if starting is None:
            starting = self._starting[uri] = asyncio.ensure_future(self._start_dynamic(uri))
            starting.add_done_callback(lambda _: self._starting.pop(uri, None))
        # Shielded: a caller cancelled does not cancel the start the others wait for.
        return traced(await asyncio.shield(starting), self.tracing)

    async def _start_dynamic(self, uri: str) -> Producer:
        while True:
            renewals = self._renewals
            producer = self.endpoint(uri).create_producer()
            await producer.start()
            if renewals == self._renewals:
                self._dynamic[uri] = producer
                return producer
            # Settings changed while it started: it read the old ones.
            await _quietly(producer.stop())

    def renew_dynamic_producers(self, stale: Callable[[str], bool], grace: float) -> list[str]:
        """Forget the run-time producers whose URI ``stale`` names (they read a setting that
        changed): the next exchange gets a new one. The old ones are stopped after
        ``grace`` (the exchanges that took one before may still be using it), or at once
        when the context stops. Their URIs."""
        self._renewals += 1
        uris = [uri for uri in self._dynamic if stale(uri)]
        old = [self._dynamic.pop(uri) for uri in uris]

        async def stop_later() -> None:
            try:
                await asyncio.sleep(grace)
            finally:
                for producer in old:
                    await _quietly(producer.stop())

        if old:
            task = asyncio.ensure_future(stop_later())
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return uris

    # state repositories

    def aggregation_repository(self, name: str, prefix: str) -> AggregationRepository:
        if name == "memory":
            return MemoryAggregationRepository()
        if sql_url := self._sql_url(name):
            from meshgate.integration._sql_state import SqlAggregationRepository

            return SqlAggregationRepository(sql_url, prefix)
        return RedisAggregationRepository(self._redis_url(name), f"meshgate:aggregate:{prefix}")

    def idempotent_repository(
        self, name: str, prefix: str, ttl: float | None = None
    ) -> IdempotentRepository:
        if name == "memory":
            return MemoryIdempotentRepository(ttl=ttl)
        if sql_url := self._sql_url(name):
            from meshgate.integration._sql_state import SqlIdempotentRepository

            return SqlIdempotentRepository(sql_url, prefix, ttl)
        return RedisIdempotentRepository(
            self._redis_url(name), f"meshgate:idempotent:{prefix}", ttl
        )

    def _sql_url(self, name: str) -> str | None:
        """The database of a ``sql`` repository (the ``database_url`` setting) or of a
        database URL; None for other repositories."""
        from meshgate.integration._sql_state import is_database_url

        if name == "sql":
            url = self.settings.get("database_url")
            if not url:
                raise EndpointError(
                    "repository 'sql' needs the database_url setting"
                    " (e.g. postgresql://user@host/db or sqlite:///state.db)"
                )
            return str(url)
        return name if is_database_url(name) else None

    def _redis_url(self, name: str) -> str:
        if name == "redis":
            return str(self.settings.get("redis_url", "redis://127.0.0.1:6379/0"))
        if name.startswith(("redis://", "rediss://", "unix://")):
            return name
        raise EndpointError(
            f"unknown repository {name!r}"
            " (known: memory, redis, a redis:// URL, sql, a postgresql:// or sqlite:/// URL)"
        )

    # direct endpoints

    def register_direct(self, name: str, processor: Processor) -> None:
        if name in self._direct:
            raise EndpointError(f"direct:{name} is already consumed by another route")
        self._direct[name] = processor

    def unregister_direct(self, name: str) -> None:
        self._direct.pop(name, None)

    def direct_consumer(self, name: str) -> Processor | None:
        return self._direct.get(name)

    # routes

    def add_routes(self, routes: Iterable[Route]) -> None:
        """Compile routes; every problem of every route is reported together."""
        errors: list[str] = []
        compiled: list[tuple[Route, Compiled]] = []
        ids = set(self._routes)
        for route in routes:
            if route.id in ids:
                errors.append(f"route {route.id!r}: a route with this id exists already")
                continue
            ids.add(route.id)
            try:
                self.endpoint(route.from_uri)
                compiled.append((route, compile_route(self, route)))
            except EndpointError as exc:
                errors.append(f"route {route.id!r}: {exc}")
        if errors:
            raise DefinitionError(errors)
        for route, result in compiled:
            self._routes[route.id] = _RouteRunner(self, route, result)

    def add_route(self, route: Route) -> None:
        self.add_routes([route])

    @property
    def routes(self) -> list[Route]:
        return [runner.route for runner in self._routes.values()]

    def route_status(self, route_id: str) -> RouteStatus:
        return self._runner(route_id).status

    def route_stats(self, route_id: str) -> dict[str, int]:
        runner = self._runner(route_id)
        series = runner.series
        return {
            "inflight": runner.inflight,
            "completed": series.exchanges - series.failures,
            "failed": series.failures,
        }

    def route_error(self, route_id: str) -> str | None:
        """Why the route failed to start, while its status is ``failed``."""
        runner = self._runner(route_id)
        return None if runner.error is None else f"{type(runner.error).__name__}: {runner.error}"

    def _runner(self, route_id: str) -> _RouteRunner:
        try:
            return self._routes[route_id]
        except KeyError:
            raise IntegrationError(f"no route {route_id!r}") from None

    async def start(self) -> None:
        """Start every auto-start route; a route that fails does not stop the others."""
        self.started, self.stopping = True, False
        failures: dict[str, BaseException] = {}
        for runner in self._routes.values():
            if runner.route.auto_start and runner.status != "started":
                try:
                    await runner.start()
                except Exception as exc:
                    runner.status, runner.error = "failed", exc
                    failures[runner.route.id] = exc
                    log.error("route %s failed to start: %s", runner.route.id, exc)
        if failures:
            raise RouteStartError(failures)

    async def start_route(self, route_id: str) -> None:
        """Start a route, or resume a suspended one."""
        runner = self._runner(route_id)
        if self.stopping:
            raise IntegrationError(f"route {route_id!r} not started: the runtime is stopping")
        if runner.status != "started":
            try:
                if runner.status == "suspended":
                    await runner.start_consumer()
                else:
                    await runner.start()
            except Exception as exc:
                runner.status, runner.error = "failed", exc
                raise

    async def suspend_route(self, route_id: str, grace: float = 10.0) -> None:
        """Stop taking new messages and let in-flight ones finish; resume with start_route."""
        runner = self._runner(route_id)
        if runner.status != "started":
            return
        deadline = asyncio.get_running_loop().time() + grace
        await self._stop_consumers([runner], deadline)
        runner.status = "suspended"
        await self._drain(lambda: runner.inflight == 0, deadline)

    async def stop_route(self, route_id: str, grace: float = 10.0) -> None:
        runner = self._runner(route_id)
        deadline = asyncio.get_running_loop().time() + grace
        await self._stop_consumers([runner], deadline)
        await self._drain(lambda: runner.inflight == 0, deadline)
        await runner.stop_services()

    async def remove_route(self, route_id: str, grace: float = 10.0) -> None:
        """Stop a route (draining its in-flight exchanges) and forget it and its series."""
        await self.stop_route(route_id, grace)
        del self._routes[route_id]
        self.metrics.forget(route_id)

    async def stop(self, grace: float = 10.0) -> bool:
        """Stop consuming, drain in-flight exchanges (up to ``grace`` seconds), release all.

        Returns whether everything in flight finished within ``grace``.
        """
        self.stopping = True
        deadline = asyncio.get_running_loop().time() + grace
        runners = list(self._routes.values())
        # Routes fed by other routes stop after them: exchanges in flight may still call them.
        waves: dict[int, list[_RouteRunner]] = {}
        for runner in runners:
            scheme = self.endpoint(runner.route.from_uri).uri.scheme
            waves.setdefault(_STOP_WAVE.get(scheme, 0), []).append(runner)
        drained = True
        for _, wave in sorted(waves.items()):
            drained &= await self._stop_consumers(wave, deadline)
            await self._drain(functools.partial(_idle, wave), deadline)
        drained &= await self._drain(
            lambda: all(r.inflight == 0 for r in runners) and not self._tasks, deadline
        )
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for runner in reversed(runners):
            await runner.stop_services()
        for task in list(self._retiring):
            task.cancel()  # its finally stops the renewed producers now
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        for producer in self._dynamic.values():
            await _quietly(producer.stop())
        self._dynamic.clear()
        for endpoint in self._endpoints.values():
            await _quietly(endpoint.stop())
        for component in self.components.values():
            await _quietly(component.stop())
        self.started = False
        return drained

    async def _stop_consumers(self, runners: list[_RouteRunner], deadline: float) -> bool:
        """Stop taking messages, all at once; a consumer's stop returns once what it took is
        done and acknowledged. Past ``deadline`` those still running are cancelled,
        unacknowledged, for their broker to redeliver; then this returns False."""
        if not runners:
            return True
        timeout = max(0.0, deadline - asyncio.get_running_loop().time())
        for runner in runners:
            if runner.consumer is not None:
                runner.consumer.deadline = deadline
        stopping = {asyncio.ensure_future(runner.stop_consumer()) for runner in runners}
        # Each stop runs at least its first step (no new messages) even past the deadline.
        _, late = await asyncio.wait(stopping, timeout=timeout)
        if late:
            log.warning("%d route(s): exchanges in flight cancelled at the deadline", len(late))
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        return not late

    async def _drain(self, idle: Callable[[], bool], deadline: float) -> bool:
        loop = asyncio.get_running_loop()
        while not idle() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return idle()

    async def __aenter__(self) -> IntegrationContext:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # running exchanges outside a consumer

    def background(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``work`` as a task the context waits for (drain) or cancels on stop."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background work failed", exc_info=task.exception())

    async def run_exchange(self, processor: Processor, exchange: Exchange) -> None:
        """Process an exchange that no consumer created (an aggregate's result)."""
        await processor(exchange)
        if exchange.exception is not None:
            log.error(
                "exchange %s failed at %s: %s",
                exchange.id,
                exchange.failed_step,
                exchange.exception,
            )

    async def send(
        self, uri: str, body: Any = None, headers: dict[str, Any] | None = None
    ) -> Exchange:
        """Send an in-only exchange to ``uri``; the exchange is returned, failed or not."""
        exchange = Exchange(Message(body, dict(headers or {})), ExchangePattern.IN_ONLY)
        producer = await self.dynamic_producer(uri)
        try:
            await producer.process(exchange)
        except Exception as exc:
            exchange.exception = exc
        return exchange

    async def request(
        self, uri: str, body: Any = None, headers: dict[str, Any] | None = None
    ) -> Message:
        """Send an in-out exchange to ``uri`` and return the reply; a failure is raised."""
        exchange = Exchange(Message(body, dict(headers or {})), ExchangePattern.IN_OUT)
        producer = await self.dynamic_producer(uri)
        await producer.process(exchange)
        if exchange.exception is not None:
            raise exchange.exception
        return exchange.message
