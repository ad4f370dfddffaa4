"""The integration runtime: routes of enterprise integration patterns over endpoints.

A route reads top to bottom as the message flows: ``from`` an endpoint, through steps,
each one named pattern. Routes are written in YAML (:func:`load_routes`) or with the
fluent builder (:func:`from_`); both give the same :class:`Route` values, which an
:class:`IntegrationContext` compiles and runs.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Names are imported on first use, so that `meshgate` commands other than `integration`
# (gateway workers among them) do not pay for the runtime's imports.
if TYPE_CHECKING:
    from meshgate.integration._builder import RouteBuilder, from_
    from meshgate.integration._component import Component, Consumer, Endpoint, Processor, Producer
    from meshgate.integration._context import IntegrationContext, RouteStartError, RouteStatus
    from meshgate.integration._errors import (
        CircuitOpenError,
        DefinitionError,
        EndpointError,
        ExpressionError,
        HttpOperationFailed,
        IntegrationError,
        NoConsumerError,
        PayloadError,
        SchemaValidationError,
    )
    from meshgate.integration._expressions import Constant, Expression, Template
    from meshgate.integration._message import Exchange, ExchangePattern, Message
    from meshgate.integration._model import ErrorHandler, Route
    from meshgate.integration._uri import EndpointUri, Options, parse_duration, parse_uri
    from meshgate.integration._yaml import RoutesFile, load_routes, parse_routes

_WHERE = {
    "CircuitOpenError": "meshgate.integration._errors",
    "Component": "meshgate.integration._component",
    "Constant": "meshgate.integration._expressions",
    "Consumer": "meshgate.integration._component",
    "DefinitionError": "meshgate.integration._errors",
    "Endpoint": "meshgate.integration._component",
    "EndpointError": "meshgate.integration._errors",
    "EndpointUri": "meshgate.integration._uri",
    "ErrorHandler": "meshgate.integration._model",
    "Exchange": "meshgate.integration._message",
    "ExchangePattern": "meshgate.integration._message",
    "Expression": "meshgate.integration._expressions",
    "ExpressionError": "meshgate.integration._errors",
    "HttpOperationFailed": "meshgate.integration._errors",
    "IntegrationContext": "meshgate.integration._context",
    "IntegrationError": "meshgate.integration._errors",
    "Message": "meshgate.integration._message",
    "NoConsumerError": "meshgate.integration._errors",
    "Options": "meshgate.integration._uri",
    "PayloadError": "meshgate.integration._errors",
    "Processor": "meshgate.integration._component",
    "Producer": "meshgate.integration._component",
    "Route": "meshgate.integration._model",
    "RouteBuilder": "meshgate.integration._builder",
    "RouteStartError": "meshgate.integration._context",
    "RouteStatus": "meshgate.integration._context",
    "RoutesFile": "meshgate.integration._yaml",
    "SchemaValidationError": "meshgate.integration._errors",
    "Template": "meshgate.integration._expressions",
    "from_": "meshgate.integration._builder",
    "load_routes": "meshgate.integration._yaml",
    "parse_duration": "meshgate.integration._uri",
    "parse_routes": "meshgate.integration._yaml",
    "parse_uri": "meshgate.integration._uri",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'meshgate.integration' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "CircuitOpenError",
    "Component",
    "Constant",
    "Consumer",
    "DefinitionError",
    "Endpoint",
    "EndpointError",
    "EndpointUri",
    "ErrorHandler",
    "Exchange",
    "ExchangePattern",
    "Expression",
    "ExpressionError",
    "HttpOperationFailed",
    "IntegrationContext",
    "IntegrationError",
    "Message",
    "NoConsumerError",
    "Options",
    "PayloadError",
    "Processor",
    "Producer",
    "Route",
    "RouteBuilder",
    "RouteStartError",
    "RouteStatus",
    "RoutesFile",
    "SchemaValidationError",
    "Template",
    "from_",
    "load_routes",
    "parse_duration",
    "parse_routes",
    "parse_uri",
]
