"""Expressions (JMESPath over the body) and templates (sandboxed Jinja2), compiled once.

An expression sees the body (bytes as UTF-8 text) as its document; ``headers`` and
``properties`` are reachable by name too (``headers.priority``), as is ``body`` itself,
unless the body has a field of that name. A template renders with ``body``,
``headers``, ``properties`` and ``exchange_id``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jinja2
import jmespath
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jmespath.exceptions import JMESPathError
from jmespath.visitor import TreeInterpreter, _is_actual_number, _is_comparable

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


class _Root:
    """The scope as a compiled expression reads it: only by field, so nothing is copied.

    ``get`` answers as the scope's would: the body's field if the body is a mapping that
    has it, else ``headers``, ``properties`` or ``body``.
    """

    __slots__ = ("exchange",)

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    def get(self, key: str, default: Any = None) -> Any:
        exchange = self.exchange
        body = exchange.message.body
        if isinstance(body, dict) and key in body:
            return body[key]
        if key == "body":
            return _readable(body)
        if key == "headers":
            return exchange.message.headers
        if key == "properties":
            return exchange.properties
        return default


class _Interpreted(Exception):
    """The expression holds a node the closures do not cover: the interpreter runs it."""


_COMPARATORS = TreeInterpreter.COMPARATOR_FUNC
_ORDERED = (int, float, str)


def _compile(node: dict[str, Any]) -> Callable[[Any], Any]:
    """Closures for a tree whose root is only read by field (see :class:`_Root`)."""
    kind = node["type"]
    if kind in ("subexpression", "index_expression"):
        first, *rest = node["children"]
        steps = [_compile(first), *(_compile_on_value(child) for child in rest)]
        return _chain(steps)
    if kind in ("field", "literal"):
        return _compile_on_value(node)
    if kind == "comparator":
        left, right = (_compile(child) for child in node["children"])
        return _comparator(node["value"], left, right)
    if kind in ("and_expression", "or_expression"):
        left, right = (_compile(child) for child in node["children"])
        return _and(left, right) if kind == "and_expression" else _or(left, right)
    if kind == "not_expression":
        return _not(_compile(node["children"][0]))
    raise _Interpreted(kind)


def _compile_on_value(node: dict[str, Any]) -> Callable[[Any], Any]:
    """Closures for the nodes that read a value other than the root: fields and indexes."""
    kind = node["type"]
    if kind == "field":
        name = node["value"]

        def field(value: Any) -> Any:
            try:
                return value.get(name)
            except AttributeError:
                return None

        return field
    if kind == "index":
        index = node["value"]

        def item(value: Any) -> Any:
            if not isinstance(value, list):
                return None
            try:
                return value[index]
            except IndexError:
                return None

        return item
    if kind == "literal":
        literal = node["value"]
        return lambda value: literal
    if kind in ("subexpression", "index_expression"):
        return _chain([_compile_on_value(child) for child in node["children"]])
    raise _Interpreted(kind)


def _chain(steps: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    def chain(value: Any) -> Any:
        for step in steps:
            value = step(value)
        return value

    return chain


def _comparator(
    op: str, left: Callable[[Any], Any], right: Callable[[Any], Any]
) -> Callable[[Any], Any]:
    compare = _COMPARATORS[op]
    if op in ("eq", "ne"):
        return lambda value: compare(left(value), right(value))

    def ordering(value: Any) -> Any:
        a, b = left(value), right(value)
        # Ordering is defined for numbers and strings only; otherwise null. (int, float
        # and str first: jmespath's check is an ABC isinstance, slow on the common case.)
        if not (type(a) in _ORDERED or _is_comparable(a)) or not (
            type(b) in _ORDERED or _is_comparable(b)
        ):
            return None
        return compare(a, b)

    return ordering


def _and(left: Callable[[Any], Any], right: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def both(value: Any) -> Any:
        matched = left(value)
        return matched if not is_true(matched) else right(value)

    return both


def _or(left: Callable[[Any], Any], right: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def either(value: Any) -> Any:
        matched = left(value)
        return right(value) if not is_true(matched) else matched

    return either


def _not(inner: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def negated(value: Any) -> Any:
        result = inner(value)
        if _is_actual_number(result) and result == 0:
            return False  # !`0` is false: 0 is not a false value in JMESPath
        return not result

    return negated


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


# jmespath's search() builds an interpreter (and its function table) per call; the
# interpreter keeps no state between calls, so every expression shares this one.
_interpreter = TreeInterpreter()


class Expression:
    """A JMESPath expression, compiled when created.

    An expression made of fields, indexes, literals, comparisons and and/or/not (most
    ``choice`` and ``filter`` conditions) is also compiled into nested closures, which
    read the body's fields in place instead of walking the tree through the interpreter
    on a copy of them. The closures are jmespath's own rules (its comparison and truth
    functions), so both ways give the same result; anything else is interpreted.
    """

    __slots__ = ("source", "_tree", "_fast")

    def __init__(self, source: str) -> None:
        self.source = _check_source(source, "an expression")
        try:
            self._tree = jmespath.compile(source).parsed
        except JMESPathError as exc:
            text = _one_line(str(exc)).removeprefix("Invalid jmespath expression: ")
            raise ExpressionError(f"invalid JMESPath: {text}") from None
        except (RecursionError, ValueError) as exc:
            raise ExpressionError(f"invalid JMESPath: {_one_line(str(exc))}") from None
        try:
            self._fast: Callable[[Any], Any] | None = _compile(self._tree)
        except (_Interpreted, RecursionError):
            self._fast = None

    def evaluate(self, exchange: Exchange) -> Any:
        try:
            fast = self._fast
            if fast is not None:
                return fast(_Root(exchange))
            return _interpreter.visit(self._tree, _scope(exchange))
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
    """A Jinja2 template in a sandbox, compiled when created.

    Most templates only put fields into text (``{"id": "{{ body.id }}"}``). Such a
    template also gets a plan of its literal parts and field paths, rendered without
    Jinja2's per-call context; whenever a path does not lead to a value as plainly as a
    dict or list lookup would, that render falls back to Jinja2, so the output is
    Jinja2's in every case.
    """

    __slots__ = ("source", "_compiled", "_plan")

    def __init__(self, source: str) -> None:
        self.source = _check_source(source, "a template")
        try:
            self._compiled = _environment.from_string(source)
            self._plan = _plan(_environment.parse(source))
        except jinja2.TemplateSyntaxError as exc:
            raise ExpressionError(
                f"invalid template, line {exc.lineno}: {_one_line(exc.message or '')}"
            ) from None
        except (RecursionError, MemoryError):
            raise ExpressionError("invalid template: nested too deeply") from None

    def render(self, exchange: Exchange) -> str:
        message = exchange.message
        plan = self._plan
        if plan is not None:
            roots = (_readable(message.body), message.headers, exchange.properties, exchange.id)
            text = _render_plan(plan, roots)
            if text is not None:
                return text
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

    evaluate = render

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Template) and other.source == self.source

    def __hash__(self) -> int:
        return hash(("template", self.source))

    def __repr__(self) -> str:
        return f"Template({self.source!r})"


# A template plan: literal text, or (root index, ((is_attribute, key), ...)) for a field.
_Part = str | tuple[int, tuple[tuple[bool, Any], ...]]
_ROOTS = {"body": 0, "headers": 1, "properties": 2, "exchange_id": 3}
# Jinja2 reads ``x.name`` as the attribute first: ``body.items`` is dict.items, not a field.
_METHOD_NAMES = frozenset(dir(dict)) | frozenset(dir(list)) | frozenset(dir(str))
_MISSING = object()
_PLAIN = (str, int, float, bool, type(None), dict, list)


def _plan(tree: nodes.Template) -> tuple[_Part, ...] | None:
    """Literal text and field paths, if that is all the template holds; else None."""
    parts: list[_Part] = []
    for statement in tree.body:
        if not isinstance(statement, nodes.Output):
            return None
        for node in statement.nodes:
            if isinstance(node, nodes.TemplateData):
                parts.append(node.data)
                continue
            path: list[tuple[bool, Any]] = []
            while True:
                if isinstance(node, nodes.Getattr) and node.attr not in _METHOD_NAMES:
                    path.append((True, node.attr))
                elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
                    if type(node.arg.value) not in (str, int):
                        return None
                    path.append((False, node.arg.value))
                else:
                    break
                node = node.node
            if not isinstance(node, nodes.Name) or node.name not in _ROOTS:
                return None
            parts.append((_ROOTS[node.name], tuple(reversed(path))))
    return tuple(parts)


def _render_plan(plan: tuple[_Part, ...], roots: tuple[Any, ...]) -> str | None:
    """The plan's text, or None where a path needs Jinja2 (a missing field, an object)."""
    out: list[str] = []
    for part in plan:
        if isinstance(part, str):
            out.append(part)
            continue
        root, path = part
        value = roots[root]
        for attribute, key in path:
            kind = type(value)
            if attribute:
                if kind is not dict:
                    return None
                value = value.get(key, _MISSING)
            elif kind is dict:
                value = value.get(key, _MISSING)
            elif kind is list and type(key) is int and -len(value) <= key < len(value):
                value = value[key]
            else:
                return None
            if value is _MISSING:
                return None
        if type(value) is str:
            out.append(value)
        elif type(value) in _PLAIN:
            out.append(str(value))
        else:
            return None
    return "".join(out)


class Constant:
    """A fixed value, for steps that take a value, an expression or a template."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def evaluate(self, exchange: Exchange) -> Any:
        return self.value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Constant) and other.value == self.value

    def __hash__(self) -> int:
        return hash(("constant", repr(self.value)))

    def __repr__(self) -> str:
        return f"Constant({self.value!r})"


Value = Constant | Expression | Template


def evaluate(value: Value, exchange: Exchange) -> Any:
    """What a constant, expression or template yields for ``exchange``."""
    return value.evaluate(exchange)


def _one_line(text: str) -> str:
    return " ".join(text.split())
