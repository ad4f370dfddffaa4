"""Expressions (JMESPath over the body) and templates (sandboxed Jinja2), compiled once.

An expression sees the body (bytes as UTF-8 text) as its document; ``headers`` and
``properties`` are reachable by name too (``headers.priority``), as is ``body`` itself,
unless the body has a field of that name. A template renders with ``body``,
``headers``, ``properties`` and ``exchange_id``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jinja2
import jmespath
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jmespath.exceptions import JMESPathError

from meshgate.integration._errors import ExpressionError

if TYPE_CHECKING:
    from meshgate.integration._message import Exchange

__all__ = ["Constant", "Expression", "Template", "Value", "is_true"]

MAX_SOURCE = 16384


class _MappingScope(dict[str, Any]):
    """The body's fields, falling back to the exchange's names (a shallow copy)."""

    __slots__ = ("_names",)
    _names: dict[str, Any]

    def get(self, key: str, default: Any = None) -> Any:
        if key in self:
            return self[key]
        return self._names.get(key, default)


class _ListScope(list[Any]):
    """A list body, still indexable, with the exchange's names reachable as fields."""

    __slots__ = ("_names",)
    _names: dict[str, Any]

    def get(self, key: str, default: Any = None) -> Any:
        return self._names.get(key, default)


# JMESPath's functions check types by class name (length(@), type(@)): pass as the built-ins.
_MappingScope.__name__ = "dict"
_ListScope.__name__ = "list"


def _readable(body: Any) -> Any:
    """Bytes are read as UTF-8 text: expressions and templates compare and print text."""
    if isinstance(body, bytes | bytearray):
        return bytes(body).decode("utf-8", errors="replace")
    return body


def _scope(exchange: Exchange) -> Any:
    body = _readable(exchange.message.body)
    names = {"body": body, "headers": exchange.message.headers, "properties": exchange.properties}
    scope: _MappingScope | _ListScope
    if isinstance(body, dict):
        scope = _MappingScope(body)
    elif isinstance(body, list):
        scope = _ListScope(body)
    else:
        return names
    scope._names = names
    return scope


def is_true(value: Any) -> bool:
    """JMESPath's truth: false, null, and empty strings, lists and objects are false."""
    return not (value is None or value is False or value == "" or value == [] or value == {})


def _check_source(source: object, kind: str) -> str:
    if not isinstance(source, str):
        raise ExpressionError(f"{kind} must be a string, got {type(source).__name__}")
    if not source.strip():
        raise ExpressionError(f"{kind} must not be empty")
    if len(source) > MAX_SOURCE:
        raise ExpressionError(f"{kind} is longer than {MAX_SOURCE} characters")
    return source


class Expression:
    """A JMESPath expression, compiled when created."""

    __slots__ = ("source", "_compiled")

    def __init__(self, source: str) -> None:
        self.source = _check_source(source, "an expression")
        try:
            self._compiled = jmespath.compile(source)
        except JMESPathError as exc:
            text = _one_line(str(exc)).removeprefix("Invalid jmespath expression: ")
            raise ExpressionError(f"invalid JMESPath: {text}") from None
        except (RecursionError, ValueError) as exc:
            raise ExpressionError(f"invalid JMESPath: {_one_line(str(exc))}") from None

    def evaluate(self, exchange: Exchange) -> Any:
        try:
            return self._compiled.search(_scope(exchange))
        except JMESPathError as exc:
            raise ExpressionError(f"{self.source!r}: {_one_line(str(exc))}") from None
        except RecursionError:
            raise ExpressionError(f"{self.source!r}: the body is nested too deeply") from None

    def matches(self, exchange: Exchange) -> bool:
        return is_true(self.evaluate(exchange))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Expression) and other.source == self.source

    def __hash__(self) -> int:
        return hash(("expr", self.source))

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


# Immutable: a template may read the exchange but not change it (no list.append & co).
_environment = ImmutableSandboxedEnvironment(autoescape=False, keep_trailing_newline=True)


class Template:
    """A Jinja2 template in a sandbox, compiled when created."""

    __slots__ = ("source", "_compiled")

    def __init__(self, source: str) -> None:
        self.source = _check_source(source, "a template")
        try:
            self._compiled = _environment.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ExpressionError(
                f"invalid template, line {exc.lineno}: {_one_line(exc.message or '')}"
            ) from None
        except (RecursionError, MemoryError):
            raise ExpressionError("invalid template: nested too deeply") from None

    def render(self, exchange: Exchange) -> str:
        message = exchange.message
        try:
            return self._compiled.render(
                body=_readable(message.body),
                headers=message.headers,
                properties=exchange.properties,
                exchange_id=exchange.id,
            )
        except jinja2.TemplateError as exc:
            raise ExpressionError(f"template failed: {_one_line(str(exc))}") from None
        except (ArithmeticError, TypeError, ValueError, LookupError) as exc:
            raise ExpressionError(f"template failed: {type(exc).__name__}: {exc}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Template) and other.source == self.source

    def __hash__(self) -> int:
        return hash(("template", self.source))

    def __repr__(self) -> str:
        return f"Template({self.source!r})"


class Constant:
    """A fixed value, for steps that take a value, an expression or a template."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Constant) and other.value == self.value

    def __hash__(self) -> int:
        return hash(("constant", repr(self.value)))

    def __repr__(self) -> str:
        return f"Constant({self.value!r})"


Value = Constant | Expression | Template


def evaluate(value: Value, exchange: Exchange) -> Any:
    """What a constant, expression or template yields for ``exchange``."""
    if isinstance(value, Constant):
        return value.value
    if isinstance(value, Expression):
        return value.evaluate(exchange)
    return value.render(exchange)


def _one_line(text: str) -> str:
    return " ".join(text.split())
