"""The exceptions of the integration runtime, each with a message a user can act on."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "CircuitOpenError",
    "DefinitionError",
    "EndpointError",
    "ExpressionError",
    "HttpOperationFailed",
    "IntegrationError",
    "NoConsumerError",
    "PayloadError",
    "SchemaValidationError",
]


class IntegrationError(Exception):
    """Base of every integration runtime error."""

    #: Whether redelivering the same message may succeed; a malformed payload never will.
    retryable = True


class DefinitionError(IntegrationError):
    """Unusable route definitions; ``errors`` holds every problem, one ``PATH: message`` each."""

    retryable = False

    def __init__(self, errors: Iterable[str], source: str = "<routes>") -> None:
        self.errors = list(errors)
        self.source = source
        super().__init__(self.errors, source)

    def __str__(self) -> str:
        if len(self.errors) == 1:
            return f"{self.source}: {self.errors[0]}"
        listed = "".join(f"\n  {error}" for error in self.errors)
        return f"{self.source}: {len(self.errors)} errors{listed}"


class EndpointError(IntegrationError):
    """An endpoint URI that cannot be used: bad syntax, unknown scheme, bad option."""

    retryable = False


class ExpressionError(IntegrationError):
    """An expression or template that does not compile or cannot be evaluated."""

    retryable = False


class PayloadError(IntegrationError):
    """A message body that cannot be read in the expected format (malformed JSON, XML, CSV)."""

    retryable = False


class SchemaValidationError(IntegrationError):
    """A message body that does not satisfy its JSON Schema or validation predicate."""

    retryable = False


class NoConsumerError(IntegrationError):
    """A synchronous endpoint (``direct``) that no started route consumes."""


class CircuitOpenError(IntegrationError):
    """A circuit breaker refused the call: too many recent failures."""


class HttpOperationFailed(IntegrationError):
    """An HTTP call answered with a status that is not a success."""

    def __init__(self, uri: str, status: int, body: bytes) -> None:
        self.uri = uri
        self.status = status
        self.body = body
        super().__init__(f"{uri} answered {status}")
