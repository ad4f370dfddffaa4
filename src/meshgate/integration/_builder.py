"""The fluent Python DSL: the same :class:`Route` values as the YAML DSL.

    route = (
        from_("direct:orders", id="orders")
        .unmarshal("json")
        .choice()
            .when("total > `1000`").set_header("priority", "high").to("mock:big")
            .otherwise().to("direct:small-orders")
        .end()
        .transform(template='{"accepted": true}')
        .build()
    )

Blocks (``choice``, ``filter``, ``split``...) are closed with ``end()``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from meshgate.integration import _model as m
from meshgate.integration._errors import DefinitionError
from meshgate.integration._expressions import Constant, Expression, Template, Value
from meshgate.integration._message import Exchange
from meshgate.integration._schemas import check_schema, load_schema
from meshgate.integration._uri import parse_duration

__all__ = ["RouteBuilder", "from_"]


def from_(uri: str, *, id: str, error_handler: m.ErrorHandler | None = None) -> RouteBuilder:
    """Start a route consuming ``uri``."""
    return RouteBuilder(uri, id, error_handler)


def _value(value: Any, expr: str | None, template: str | None) -> Value:
    given = sum(x is not None for x in (expr, template)) + (value is not _UNSET)
    if given != 1:
        raise DefinitionError(["give exactly one of value, expr, template"], "builder")
    if expr is not None:
        return Expression(expr)
    if template is not None:
        return Template(template)
    return Constant(value)


def _duration(value: float | int | str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise DefinitionError([str(exc)], "builder") from None


_UNSET: Any = object()


@dataclass
class _Block:
    """An open block: the steps it collects and how it becomes a step when it ends."""

    kind: str
    steps: list[m.Step] = field(default_factory=list)
    make: Callable[[tuple[m.Step, ...]], m.Step] | None = None
    # A choice: its finished when-branches, the expression of the open one, the otherwise.
    whens: list[m.When] = field(default_factory=list)
    when_expr: Expression | None = None
    otherwise: tuple[m.Step, ...] | None = None
    in_otherwise: bool = False


class RouteBuilder:
    def __init__(self, uri: str, route_id: str, error_handler: m.ErrorHandler | None) -> None:
        self._uri = uri
        self._id = route_id
        self._error_handler = error_handler
        self._stack: list[_Block] = [_Block("route")]
        self._description: str | None = None
        self._auto_start = True

    def _add(self, step: m.Step) -> RouteBuilder:
        self._stack[-1].steps.append(step)
        return self

    def _open(self, kind: str, make: Callable[[tuple[m.Step, ...]], m.Step]) -> RouteBuilder:
        self._stack.append(_Block(kind, make=make))
        return self

    def _fail(self, message: str) -> DefinitionError:
        return DefinitionError([message], f"route {self._id!r}")

    # simple steps

    def to(self, uri: str) -> RouteBuilder:
        return self._add(m.To(uri))

    def log(self, message: str, level: str = "INFO", logger: str | None = None) -> RouteBuilder:
        return self._add(m.Log(Template(message), level.upper(), logger))

    def set_header(
        self,
        name: str,
        value: Any = _UNSET,
        *,
        expr: str | None = None,
        template: str | None = None,
    ) -> RouteBuilder:
        return self._add(m.SetHeader(name, _value(value, expr, template)))

    def remove_header(self, name: str) -> RouteBuilder:
        return self._add(m.RemoveHeader(name))

    def set_property(
        self,
        name: str,
        value: Any = _UNSET,
        *,
        expr: str | None = None,
        template: str | None = None,
    ) -> RouteBuilder:
        return self._add(m.SetProperty(name, _value(value, expr, template)))

    def transform(
        self, value: Any = _UNSET, *, expr: str | None = None, template: str | None = None
    ) -> RouteBuilder:
        return self._add(m.Transform(_value(value, expr, template)))

    def marshal(self, fmt: m.DataFormat, **options: Any) -> RouteBuilder:
        return self._add(m.Marshal(fmt, tuple(options.items())))

    def unmarshal(self, fmt: m.DataFormat, **options: Any) -> RouteBuilder:
        return self._add(m.Unmarshal(fmt, tuple(options.items())))

    def validate(
        self,
        *,
        json_schema: str | None = None,
        schema: Any = None,
        expr: str | None = None,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> RouteBuilder:
        """Check the body against a JSON Schema file or inline schema, and/or a predicate."""
        loaded = schema
        try:
            if json_schema is not None:
                loaded = load_schema(json_schema, base_dir)
            elif schema is not None:
                check_schema(schema, "inline")
        except ValueError as exc:
            raise self._fail(str(exc)) from None
        if loaded is None and expr is None:
            raise self._fail("validate: give json_schema, schema or expr")
        return self._add(
            m.Validate(loaded, json_schema, None if expr is None else Expression(expr))
        )

    def stop(self) -> RouteBuilder:
        return self._add(m.Stop())

    def process(self, function: Callable[[Exchange], Awaitable[None] | None]) -> RouteBuilder:
        return self._add(m.Process(function))

    def recipient_list(self, expr: str, **options: Any) -> RouteBuilder:
        return self._add(m.RecipientList(Expression(expr), **options))

    def routing_slip(self, expr: str, delimiter: str = ",") -> RouteBuilder:
        return self._add(m.RoutingSlip(Expression(expr), delimiter))

    def wire_tap(self, uri: str) -> RouteBuilder:
        return self._add(m.WireTap(uri))

    def enrich(
        self, uri: str, strategy: m.Strategy = "last", target: str | None = None
    ) -> RouteBuilder:
        return self._add(m.Enrich(uri, strategy, target))

    def throttle(self, maximum: int, period: float | int | str = "1s") -> RouteBuilder:
        return self._add(m.Throttle(maximum, _duration(period)))

    def delay(self, duration: float | int | str) -> RouteBuilder:
        return self._add(m.Delay(_duration(duration)))

    # blocks

    def choice(self) -> RouteBuilder:
        self._stack.append(_Block("choice"))
        return self

    def when(self, expr: str) -> RouteBuilder:
        block = self._choice_block("when")
        self._close_when(block)
        if block.in_otherwise:
            raise self._fail("when() after otherwise()")
        block.when_expr = Expression(expr)
        return self

    def otherwise(self) -> RouteBuilder:
        block = self._choice_block("otherwise")
        self._close_when(block)
        block.in_otherwise = True
        return self

    def _choice_block(self, what: str) -> _Block:
        block = self._stack[-1]
        if block.kind != "choice":
            raise self._fail(f"{what}() outside a choice()")
        return block

    def _close_when(self, block: _Block) -> None:
        if block.when_expr is not None:
            block.whens.append(m.When(block.when_expr, tuple(block.steps)))
        elif block.steps:
            raise self._fail("a choice's steps must follow when() or otherwise()")
        block.when_expr = None
        block.steps = []

    def filter(self, expr: str) -> RouteBuilder:
        compiled = Expression(expr)
        return self._open("filter", lambda steps: m.Filter(compiled, steps))

    def split(self, expr: str | None = None, **options: Any) -> RouteBuilder:
        compiled = None if expr is None else Expression(expr)
        return self._open("split", lambda steps: m.Split(steps, compiled, **options))

    def aggregate(
        self,
        correlation: str,
        *,
        strategy: m.Strategy = "collect",
        completion_size: int | None = None,
        completion_timeout: float | int | str | None = None,
        completion_interval: float | int | str | None = None,
        completion_predicate: str | None = None,
        repository: str = "memory",
    ) -> RouteBuilder:
        if not any(
            x is not None
            for x in (
                completion_size,
                completion_timeout,
                completion_interval,
                completion_predicate,
            )
        ):
            raise self._fail("aggregate: give a completion (size, timeout, interval or predicate)")
        compiled = Expression(correlation)
        timeout = None if completion_timeout is None else _duration(completion_timeout)
        interval = None if completion_interval is None else _duration(completion_interval)
        predicate = None if completion_predicate is None else Expression(completion_predicate)
        return self._open(
            "aggregate",
            lambda steps: m.Aggregate(
                compiled, steps, strategy, completion_size, timeout, interval, predicate, repository
            ),
        )

    def multicast(
        self,
        *,
        parallel: bool = False,
        timeout: float | int | str | None = None,
        strategy: m.Strategy | None = None,
        stop_on_exception: bool = True,
    ) -> RouteBuilder:
        """Each step until ``end()`` is a branch that gets its own copy."""
        seconds = None if timeout is None else _duration(timeout)
        return self._open(
            "multicast",
            lambda steps: m.Multicast(steps, parallel, seconds, strategy, stop_on_exception),
        )

    def circuit_breaker(
        self,
        *,
        failure_threshold: int = 5,
        open_duration: float | int | str = "30s",
        half_open_calls: int = 1,
    ) -> RouteBuilder:
        """Steps until ``fallback()`` (or ``end()``) are protected; the fallback's follow."""
        seconds = _duration(open_duration)
        block = _Block("circuit_breaker")

        def make(steps: tuple[m.Step, ...]) -> m.Step:
            if block.in_otherwise:
                steps, fallback = block.otherwise or (), steps
                return m.CircuitBreaker(
                    steps, fallback, failure_threshold, seconds, half_open_calls
                )
            return m.CircuitBreaker(steps, None, failure_threshold, seconds, half_open_calls)

        block.make = make
        self._stack.append(block)
        return self

    def fallback(self) -> RouteBuilder:
        block = self._stack[-1]
        if block.kind != "circuit_breaker" or block.in_otherwise:
            raise self._fail("fallback() outside a circuit_breaker()")
        if not block.steps:
            raise self._fail("circuit_breaker() has no steps before fallback()")
        # The protected steps wait in ``otherwise`` while the fallback's are collected.
        block.otherwise, block.steps, block.in_otherwise = tuple(block.steps), [], True
        return self

    def load_balance(
        self, strategy: str = "round_robin", weights: tuple[int, ...] | None = None
    ) -> RouteBuilder:
        return self._open(
            "load_balance",
            lambda steps: m.LoadBalance(steps, strategy, weights),  # type: ignore[arg-type]
        )

    def idempotent_consumer(
        self, expr: str, *, repository: str = "memory", ttl: float | int | str | None = None
    ) -> RouteBuilder:
        compiled = Expression(expr)
        seconds = None if ttl is None else _duration(ttl)
        return self._open(
            "idempotent_consumer",
            lambda steps: m.IdempotentConsumer(compiled, steps, repository, seconds),
        )

    def end(self) -> RouteBuilder:
        """Close the innermost open block."""
        if len(self._stack) == 1:
            raise self._fail("end() without an open block")
        block = self._stack.pop()
        if block.kind == "choice":
            if block.in_otherwise:
                block.otherwise = tuple(block.steps)
            else:
                self._close_when(block)
            if not block.whens:
                raise self._fail("a choice() needs at least one when()")
            return self._add(m.Choice(tuple(block.whens), block.otherwise))
        if not block.steps:
            raise self._fail(f"{block.kind}() has no steps before end()")
        assert block.make is not None
        return self._add(block.make(tuple(block.steps)))

    def description(self, text: str) -> RouteBuilder:
        self._description = text
        return self

    def auto_start(self, start: bool) -> RouteBuilder:
        self._auto_start = start
        return self

    def build(self) -> m.Route:
        if len(self._stack) != 1:
            open_blocks = ", ".join(b.kind for b in self._stack[1:])
            raise self._fail(f"blocks left open (close each with end()): {open_blocks}")
        return m.Route(
            self._id,
            self._uri,
            tuple(self._stack[0].steps),
            self._error_handler,
            self._auto_start,
            self._description,
        )
