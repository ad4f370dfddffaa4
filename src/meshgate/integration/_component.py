"""What a connector implements: a component makes endpoints; endpoints make consumers
(the ``from`` of a route) and producers (a ``to``).

Creating an endpoint only checks its URI and options; I/O starts with ``start``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from meshgate.integration._errors import EndpointError
from meshgate.integration._message import Exchange
from meshgate.integration._uri import EndpointUri

if TYPE_CHECKING:
    from meshgate.integration._context import IntegrationContext

__all__ = ["Component", "Consumer", "Endpoint", "Processor", "Producer"]

#: A route (or any step) as the consumer sees it: processes one exchange in place.
Processor = Callable[[Exchange], Awaitable[None]]


class Consumer:
    """Feeds exchanges from an endpoint into a route until stopped."""

    #: When stopping: the event loop time by which the exchanges in flight must be done
    #: (the context's drain deadline), after which the stop is cancelled; None: unbounded.
    deadline: float | None = None

    def __init__(self, endpoint: Endpoint, processor: Processor) -> None:
        self.endpoint = endpoint
        self.processor = processor

    async def start(self) -> None:
        """Begin consuming; raises when the source cannot be reached."""

    async def stop(self) -> None:
        """Stop taking new exchanges; those in flight finish in their route."""


class Producer:
    """Sends an exchange to an endpoint; an in-out exchange gets the reply as its message."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    async def start(self) -> None:
        """Open what the producer needs (connections)."""

    async def stop(self) -> None:
        """Release it."""

    async def process(self, exchange: Exchange) -> None:
        raise NotImplementedError


class Endpoint:
    """One URI of a component. Subclasses override the side(s) they support."""

    def __init__(self, uri: EndpointUri, context: IntegrationContext) -> None:
        self.uri = uri
        self.context = context

    def create_consumer(self, processor: Processor) -> Consumer:
        raise EndpointError(f"{self.uri.text}: the {self.uri.scheme} endpoint cannot be a 'from'")

    def create_producer(self) -> Producer:
        raise EndpointError(f"{self.uri.text}: the {self.uri.scheme} endpoint cannot be a 'to'")

    async def stop(self) -> None:
        """Release what the endpoint shares between its consumer and producers."""


class Component:
    """A scheme's factory of endpoints. ``create_endpoint`` does no I/O."""

    def create_endpoint(self, uri: EndpointUri, context: IntegrationContext) -> Endpoint:
        raise NotImplementedError

    async def stop(self) -> None:
        """Release what the component shares between its endpoints (servers, clients)."""
