"""``mock:name``: an endpoint that records what it receives and checks expectations."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshgate.integration._component import Component, Endpoint, Producer
from meshgate.integration._errors import EndpointError
from meshgate.integration._message import Exchange
from meshgate.integration._uri import EndpointUri, Options

if TYPE_CHECKING:
    from meshgate.integration._context import IntegrationContext

__all__ = ["MockComponent", "MockEndpoint"]


class MockComponent(Component):
    def create_endpoint(self, uri: EndpointUri, context: IntegrationContext) -> Endpoint:
        Options(uri).finish()
        if not uri.path:
            raise EndpointError(f"{uri.text}: give a name, e.g. mock:result")
        return MockEndpoint(uri, context)


class MockEndpoint(Endpoint):
    """Records a copy of every exchange sent to it; ``behaviour`` may answer or fail."""

    def __init__(self, uri: EndpointUri, context: IntegrationContext) -> None:
        super().__init__(uri, context)
        self.received: list[Exchange] = []
        #: Runs on each exchange after it is recorded: set a reply, raise a failure.
        self.behaviour: Callable[[Exchange], Any] | None = None
        self._expected_count: int | None = None
        self._expected_bodies: list[Any] | None = None
        # Waiters of wait_for, each woken once the count it waits for has arrived.
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def bodies(self) -> list[Any]:
        return [exchange.message.body for exchange in self.received]

    def expect_count(self, count: int) -> MockEndpoint:
        self._expected_count = count
        return self

    def expect_bodies(self, *bodies: Any) -> MockEndpoint:
        self._expected_bodies = list(bodies)
        self._expected_count = len(bodies)
        return self

    def reset(self) -> None:
        self.received.clear()
        self._expected_count = None
        self._expected_bodies = None

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Exchange]:
        """Wait until ``count`` exchanges arrived; fails with what did arrive."""
        if len(self.received) < count:
            waiter = asyncio.get_running_loop().create_future()
            entry = (count, waiter)
            self._waiters.append(entry)
            try:
                await asyncio.wait_for(waiter, timeout)
            except TimeoutError:
                raise AssertionError(
                    f"{self.uri.text}: expected {count} exchanges within {timeout}s,"
                    f" received {len(self.received)}: {self.bodies!r:.500}"
                ) from None
            finally:
                if entry in self._waiters:
                    self._waiters.remove(entry)
        return self.received[:count]

    async def assert_satisfied(self, timeout: float = 5.0) -> None:
        """Check the expectations, waiting up to ``timeout`` for the expected count."""
        if self._expected_count is not None:
            await self.wait_for(self._expected_count, timeout)
            if len(self.received) != self._expected_count:
                raise AssertionError(
                    f"{self.uri.text}: expected {self._expected_count} exchanges,"
                    f" received {len(self.received)}: {self.bodies!r:.500}"
                )
        if self._expected_bodies is not None and self.bodies != self._expected_bodies:
            raise AssertionError(
                f"{self.uri.text}: expected bodies {self._expected_bodies!r:.500},"
                f" received {self.bodies!r:.500}"
            )

    def record(self, exchange: Exchange) -> None:
        copy = exchange.copy(new_id=False)
        copy.route_id = exchange.route_id
        self.received.append(copy)
        if self._waiters:
            arrived = len(self.received)
            for count, waiter in self._waiters:
                if arrived >= count and not waiter.done():
                    waiter.set_result(None)

    def create_producer(self) -> Producer:
        return _MockProducer(self)


class _MockProducer(Producer):
    endpoint: MockEndpoint

    async def process(self, exchange: Exchange) -> None:
        self.endpoint.record(exchange)
        behaviour = self.endpoint.behaviour
        if behaviour is not None:
            result = behaviour(exchange)
            if asyncio.iscoroutine(result):
                await result
