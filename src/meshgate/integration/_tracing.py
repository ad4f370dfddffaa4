"""Trace context through routes: a span per route run, one per send to another service.

A route run continues the trace its message carries: the context of the route that handed
it over in this process (``direct``, ``seda``), else the message's ``traceparent`` header
(the HTTP consumer copies the request's fields into headers; the broker consumers copy the
message's headers), else a new trace. A send over HTTP or a broker puts the run's context
in the outgoing headers, below a client or producer span when the trace is sampled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meshgate.integration._component import Producer
from meshgate.telemetry.tracing import (
    CLIENT,
    CONSUMER,
    INTERNAL,
    PRODUCER,
    SERVER,
    TraceContext,
    Tracing,
    inject,
)

if TYPE_CHECKING:
    from meshgate.integration._message import Exchange

__all__ = ["TRACE_PROPERTY", "TracedProducer", "route_kind", "traced"]

#: The exchange property holding the current hop's :class:`TraceContext`.
TRACE_PROPERTY = "trace_context"
#: Schemes whose messages carry headers to another process, and the span kind of a send.
_SEND_KIND = {
    "http": CLIENT,
    "amqp": PRODUCER,
    "nats": PRODUCER,
    "mqtt": PRODUCER,
    "redis": PRODUCER,
    "kafka": PRODUCER,
}
_TRACE_HEADERS = ("traceparent", "tracestate")


def route_kind(scheme: str) -> str:
    """The kind of a route run's span by what it consumes: a request, a message, or local."""
    if scheme == "http":
        return SERVER
    if scheme in _SEND_KIND:
        return CONSUMER
    return INTERNAL


def traced(producer: Producer, tracing: Tracing | None) -> Producer:
    """``producer``, sending the trace context along when tracing is on and its messages
    carry headers to another process; else ``producer`` itself (no cost)."""
    if tracing is None:
        return producer
    uri = producer.endpoint.uri
    kind = _SEND_KIND.get(uri.scheme)
    if kind is None:
        return producer
    return TracedProducer(producer, tracing, kind, f"send {uri.scheme}:{uri.path.split('?')[0]}")


class TracedProducer(Producer):
    """Puts the exchange's trace context in the message's headers for one send, below a
    span of its own when sampled; the message's headers are as they were afterwards."""

    def __init__(self, producer: Producer, tracing: Tracing, kind: str, name: str) -> None:
        super().__init__(producer.endpoint)
        self.producer = producer
        self.tracing = tracing
        self.kind = kind
        self.name = name

    async def start(self) -> None:
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()

    async def process(self, exchange: Exchange) -> None:
        tracing = self.tracing
        parent: TraceContext | None = exchange.properties.get(TRACE_PROPERTY)
        hop = tracing.child(parent, self.name, self.kind)
        span = hop.span
        if span is not None:
            span.set_attribute("messaging.destination.name", self.producer.endpoint.uri.text)
            span.set_attribute("meshgate.exchange_id", exchange.id)
        message = exchange.message
        headers = message.headers
        saved = {k: v for k, v in headers.items() if k.lower() in _TRACE_HEADERS}
        inject(hop, headers)
        failure: BaseException | None = None
        try:
            await self.producer.process(exchange)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            if exchange.message is message:
                _restore(headers, saved)
            tracing.end(hop, failure or exchange.exception)


def _restore(headers: dict[str, Any], saved: dict[str, Any]) -> None:
    for key in [k for k in headers if k.lower() in _TRACE_HEADERS]:
        del headers[key]
    headers.update(saved)
