"""Route definitions: what both DSLs (YAML and the Python builder) produce.

Definitions are immutable values that compare equal when they say the same thing; the
context compiles them into processors when a route starts. Expressions and templates in
them are compiled already, so a definition that exists is one whose expressions parse.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from meshgate.integration._expressions import Expression, Template, Value
from meshgate.integration._message import Exchange

__all__ = [
    "STRATEGIES",
    "Aggregate",
    "Choice",
    "CircuitBreaker",
    "Delay",
    "Enrich",
    "ErrorHandler",
    "Filter",
    "IdempotentConsumer",
    "LoadBalance",
    "Log",
    "Marshal",
    "Multicast",
    "Process",
    "RecipientList",
    "RemoveHeader",
    "Route",
    "RoutingSlip",
    "SetHeader",
    "SetProperty",
    "Split",
    "Step",
    "Stop",
    "Throttle",
    "To",
    "Transform",
    "Unmarshal",
    "Validate",
    "When",
    "WireTap",
]

#: How the bodies of several exchanges become one (aggregate, multicast, split, enrich).
STRATEGIES = ("collect", "last", "first", "merge", "concat")
Strategy = Literal["collect", "last", "first", "merge", "concat"]
DataFormat = Literal["json", "xml", "csv"]


@dataclass(frozen=True)
class To:
    uri: str


@dataclass(frozen=True)
class Log:
    message: Template
    level: str = "INFO"
    logger: str | None = None


@dataclass(frozen=True)
class SetHeader:
    name: str
    value: Value


@dataclass(frozen=True)
class RemoveHeader:
    name: str


@dataclass(frozen=True)
class SetProperty:
    name: str
    value: Value


@dataclass(frozen=True)
class Transform:
    value: Value


@dataclass(frozen=True)
class Marshal:
    format: DataFormat
    options: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Unmarshal:
    format: DataFormat
    options: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Validate:
    """A JSON Schema (``schema``, loaded from ``schema_path``) and/or a predicate."""

    schema: Any = None
    schema_path: str | None = None
    expr: Expression | None = None


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class When:
    expr: Expression
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class Choice:
    when: tuple[When, ...]
    otherwise: tuple[Step, ...] | None = None


@dataclass(frozen=True)
class Filter:
    expr: Expression
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class Split:
    """Each part of the body (or of ``expr``'s result, or of text cut at ``tokenize``)."""

    steps: tuple[Step, ...]
    expr: Expression | None = None
    tokenize: str | None = None
    parallel: bool = False
    max_parallel: int = 10
    aggregate: Strategy | None = None
    stop_on_exception: bool = True


@dataclass(frozen=True)
class Aggregate:
    correlation: Expression
    steps: tuple[Step, ...]
    strategy: Strategy = "collect"
    completion_size: int | None = None
    completion_timeout: float | None = None
    completion_interval: float | None = None
    completion_predicate: Expression | None = None
    repository: str = "memory"


@dataclass(frozen=True)
class Multicast:
    """Every branch gets a copy; with ``strategy`` their results become the body."""

    branches: tuple[Step, ...]
    parallel: bool = False
    timeout: float | None = None
    strategy: Strategy | None = None
    stop_on_exception: bool = True


@dataclass(frozen=True)
class RecipientList:
    expr: Expression
    delimiter: str = ","
    parallel: bool = False
    strategy: Strategy | None = None
    ignore_invalid_endpoints: bool = False


@dataclass(frozen=True)
class RoutingSlip:
    expr: Expression
    delimiter: str = ","


@dataclass(frozen=True)
class WireTap:
    uri: str


@dataclass(frozen=True)
class Enrich:
    """Call ``uri`` with a copy; ``strategy`` merges its answer into the body."""

    uri: str
    strategy: Strategy | None = "last"
    target: str | None = None


@dataclass(frozen=True)
class Throttle:
    maximum: int
    period: float = 1.0


@dataclass(frozen=True)
class Delay:
    seconds: float


@dataclass(frozen=True)
class CircuitBreaker:
    steps: tuple[Step, ...]
    fallback: tuple[Step, ...] | None = None
    failure_threshold: int = 5
    open_seconds: float = 30.0
    half_open_calls: int = 1


@dataclass(frozen=True)
class LoadBalance:
    branches: tuple[Step, ...]
    strategy: Literal["round_robin", "weighted", "failover", "random"] = "round_robin"
    weights: tuple[int, ...] | None = None


@dataclass(frozen=True)
class IdempotentConsumer:
    """Runs ``steps`` once per key; a duplicate stops. The key is forgotten on failure."""

    expr: Expression
    steps: tuple[Step, ...]
    repository: str = "memory"
    ttl: float | None = None


@dataclass(frozen=True)
class Process:
    """A Python callable as a step (builder only), as Camel's ``process``."""

    function: Callable[[Exchange], Awaitable[None] | None]


Step = (
    To
    | Log
    | SetHeader
    | RemoveHeader
    | SetProperty
    | Transform
    | Marshal
    | Unmarshal
    | Validate
    | Stop
    | Choice
    | Filter
    | Split
    | Aggregate
    | Multicast
    | RecipientList
    | RoutingSlip
    | WireTap
    | Enrich
    | Throttle
    | Delay
    | CircuitBreaker
    | LoadBalance
    | IdempotentConsumer
    | Process
)


@dataclass(frozen=True)
class ErrorHandler:
    """Redelivery at the failing step, then the dead letter channel (if any).

    The n-th redelivery waits ``delay * backoff ** (n - 1)`` seconds, at most ``max_delay``.
    """

    dead_letter: str | None = None
    maximum_redeliveries: int = 0
    delay: float = 0.0
    backoff: float = 2.0
    max_delay: float = 60.0


@dataclass(frozen=True)
class Route:
    id: str
    from_uri: str
    steps: tuple[Step, ...] = ()
    error_handler: ErrorHandler | None = None
    auto_start: bool = True
    description: str | None = None
    # Where relative paths in the route (schemas) were resolved from; not part of equality.
    source: str | None = field(default=None, compare=False)
