"""The YAML DSL, modelled on Camel's: a file of routes, each ``from`` an endpoint through
``steps``, every step one named pattern. Every problem is reported with its path, e.g.
``routes[0].steps[2].choice.when[0].expr: invalid JMESPath: ...``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from meshgate.config.loader import ConfigError, _parse_yaml, _read
from meshgate.config.tracing import TracingSettings
from meshgate.integration import _model as m
from meshgate.integration._dataformats import FORMAT_OPTIONS, FORMATS
from meshgate.integration._errors import DefinitionError, EndpointError, ExpressionError
from meshgate.integration._expressions import Constant, Expression, Template, Value
from meshgate.integration._schemas import check_schema, load_schema
from meshgate.integration._uri import parse_duration

__all__ = ["RoutesFile", "load_routes", "parse_routes"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")
_BROKER_URLS = ("redis_url", "database_url", "amqp_url", "nats_url", "mqtt_url", "kafka_url")
_TOP_LEVEL = ("routes", "error_handler", "http", "sql_statements", "tracing", *_BROKER_URLS)


@dataclass
class RoutesFile:
    """What a routes file holds: its routes and the runtime settings beside them."""

    routes: list[m.Route]
    error_handler: m.ErrorHandler | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    source: str = "<routes>"
    #: The ``tracing`` section (read at start; a change applies on restart).
    tracing: TracingSettings | None = None


def load_routes(path: str | os.PathLike[str], *, context: Any = None) -> RoutesFile:
    """Read and check a routes file; relative schema paths are resolved against its folder."""
    source = os.fspath(path)
    try:
        data = _read(source)
    except ConfigError as exc:
        raise DefinitionError(exc.errors, source) from None
    return parse_routes(data, source, base_dir=Path(source).parent, context=context)


def parse_routes(
    text: str | bytes,
    source: str = "<routes>",
    *,
    base_dir: str | os.PathLike[str] | None = None,
    context: Any = None,
) -> RoutesFile:
    """Check YAML (or JSON) text; raises :class:`DefinitionError` listing every problem.

    Endpoint URIs are checked against ``context``'s components (the built-in ones when
    no context is given): an unknown scheme or option is an error here, not at start.
    """
    try:
        data = _parse_yaml(text, source)
    except ConfigError as exc:
        raise DefinitionError(exc.errors, source) from None
    if context is None:
        from meshgate.integration._context import IntegrationContext

        context = IntegrationContext()
    parser = _Parser(context, base_dir)
    result = parser.document(data)
    result.source = source
    if parser.errors:
        raise DefinitionError(list(dict.fromkeys(parser.errors)), source)
    for route in result.routes:
        object.__setattr__(route, "source", source)
    return result


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if value is None:
        return "null"
    return f"a {type(value).__name__}"


_Missing = object()


class _Parser:
    def __init__(self, context: Any, base_dir: str | os.PathLike[str] | None) -> None:
        self.context = context
        self.base_dir = base_dir
        self.errors: list[str] = []
        # Where each direct endpoint is consumed and called from, for the cycle check.
        self.direct_consumers: dict[str, tuple[int, str]] = {}
        self.direct_calls: list[tuple[int, str, str]] = []
        self._route_index = 0

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    # scalars

    def mapping(
        self, value: Any, path: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()
    ) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping, got {_kind(value)}")
            return None
        for key in value:
            if key not in allowed:
                self.error(f"{path}.{key}", f"unknown field (allowed: {', '.join(allowed)})")
        for key in required:
            if key not in value:
                self.error(f"{path}.{key}", "is required")
        return value

    def string(self, value: Any, path: str, *, empty: bool = False) -> str | None:
        if not isinstance(value, str):
            hint = " (put the value in quotes)" if isinstance(value, bool | int | float) else ""
            self.error(path, f"must be a string, got {_kind(value)}{hint}")
            return None
        if not empty and not value.strip():
            self.error(path, "must not be empty")
            return None
        return value

    def integer(self, value: Any, path: str, minimum: int = 0, maximum: int = 2**31) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(path, f"must be an integer, got {_kind(value)}")
            return None
        if not minimum <= value <= maximum:
            self.error(path, f"must be between {minimum} and {maximum}")
            return None
        return value

    def number(self, value: Any, path: str, minimum: float = 0.0) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            self.error(path, f"must be a number, got {_kind(value)}")
            return None
        if value < minimum:
            self.error(path, f"must be at least {minimum:g}")
            return None
        return float(value)

    def boolean(self, value: Any, path: str) -> bool | None:
        if not isinstance(value, bool):
            self.error(path, f"must be true or false, got {_kind(value)}")
            return None
        return value

    def duration(self, value: Any, path: str) -> float | None:
        try:
            return parse_duration(value, "duration")
        except ValueError as exc:
            self.error(path, str(exc).removeprefix("duration: "))
            return None

    def expr(self, value: Any, path: str) -> Expression | None:
        source = self.string(value, path)
        if source is None:
            return None
        try:
            return Expression(source)
        except ExpressionError as exc:
            self.error(path, str(exc))
            return None

    def template(self, value: Any, path: str) -> Template | None:
        source = self.string(value, path)
        if source is None:
            return None
        try:
            return Template(source)
        except ExpressionError as exc:
            self.error(path, str(exc))
            return None

    def uri(self, value: Any, path: str, *, consumer: bool = False) -> str | None:
        text = self.string(value, path)
        if text is None:
            return None
        try:
            endpoint = self.context.endpoint(text)
        except EndpointError as exc:
            self.error(path, str(exc))
            return None
        if endpoint.uri.scheme == "direct":
            name = endpoint.uri.path
            if consumer:
                first = self.direct_consumers.get(name)
                if first is not None:
                    self.error(path, f"direct:{name} is consumed by routes[{first[0]}] already")
                else:
                    self.direct_consumers[name] = (self._route_index, path)
            else:
                self.direct_calls.append((self._route_index, name, path))
        return text

    def value(self, data: dict[str, Any], path: str) -> Value | None:
        given = [key for key in ("value", "expr", "template") if key in data]
        if len(given) != 1:
            self.error(path, "give exactly one of value, expr, template")
            return None
        key = given[0]
        if key == "value":
            return Constant(data["value"])
        if key == "expr":
            return self.expr(data["expr"], f"{path}.expr")
        return self.template(data["template"], f"{path}.template")

    # the document

    def document(self, data: dict[str, Any]) -> RoutesFile:
        self.mapping(data, "top level", _TOP_LEVEL, ("routes",))
        settings: dict[str, Any] = {}
        handler = None
        if "error_handler" in data:
            handler = self.error_handler(data["error_handler"], "error_handler")
        if "http" in data:
            http = self.mapping(data["http"], "http", ("listen",))
            if http is not None and "listen" in http:
                listen = self.string(http["listen"], "http.listen")
                if listen is not None:
                    host, _, port = listen.rpartition(":")
                    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
                        self.error("http.listen", "must be host:port, e.g. 127.0.0.1:8088")
                    else:
                        settings["http_listen"] = listen
        for key in _BROKER_URLS:
            if key in data:
                url = self.string(data[key], key)
                if url is not None:
                    settings[key] = url
        if "sql_statements" in data:
            statements = data["sql_statements"]
            if not isinstance(statements, dict):
                self.error("sql_statements", f"must be a mapping, got {_kind(statements)}")
            else:
                for name, sql in statements.items():
                    if self.string(sql, f"sql_statements.{name}") is not None:
                        settings.setdefault("sql_statements", {})[str(name)] = sql
        routes: list[m.Route] = []
        raw = data.get("routes")
        if raw is not None and "routes" in data:
            if not isinstance(raw, list):
                self.error("routes", f"must be a list, got {_kind(raw)}")
            elif not raw:
                self.error("routes", "must hold at least one route")
            else:
                seen: dict[str, int] = {}
                for i, item in enumerate(raw):
                    self._route_index = i
                    route = self.route(item, f"routes[{i}]")
                    route_id = item.get("id") if isinstance(item, dict) else None
                    if isinstance(route_id, str):
                        if route_id in seen:
                            first = seen[route_id]
                            self.error(
                                f"routes[{i}].id",
                                f"duplicate route id {route_id!r} (first in routes[{first}])",
                            )
                        seen.setdefault(route_id, i)
                    if route is not None:
                        routes.append(route)
        self.check_direct()
        tracing = self.tracing(data["tracing"]) if "tracing" in data else None
        return RoutesFile(routes, handler, settings, tracing=tracing)

    def tracing(self, value: Any) -> TracingSettings | None:
        if not isinstance(value, dict):
            self.error("tracing", f"must be a mapping, got {_kind(value)}")
            return None
        try:
            return TracingSettings.model_validate(value)
        except ValidationError as exc:
            for problem in exc.errors():
                where = ".".join(str(part) for part in ("tracing", *problem["loc"]))
                self.error(where, problem["msg"])
            return None

    def route(self, value: Any, path: str) -> m.Route | None:
        allowed = ("id", "from", "steps", "error_handler", "auto_start", "description")
        data = self.mapping(value, path, allowed, ("id", "from"))
        if data is None:
            return None
        route_id = None
        if "id" in data:
            route_id = self.string(data["id"], f"{path}.id")
            if route_id is not None and not _ID.match(route_id):
                self.error(
                    f"{path}.id",
                    "must start with a letter or digit and hold only letters, digits,"
                    " '_', '.' and '-' (at most 200)",
                )
                route_id = None
        from_uri = None
        steps_value = data.get("steps", _Missing)
        steps_path = f"{path}.steps"
        raw_from = data.get("from")
        if isinstance(raw_from, dict):
            # Camel's own shape: from: {uri: ..., steps: [...]}.
            inner = self.mapping(raw_from, f"{path}.from", ("uri", "steps"), ("uri",))
            if inner is not None:
                if "uri" in inner:
                    from_uri = self.uri(inner["uri"], f"{path}.from.uri", consumer=True)
                if "steps" in inner:
                    if steps_value is not _Missing:
                        self.error(f"{path}.from.steps", "give steps here or beside from, not both")
                    steps_value, steps_path = inner["steps"], f"{path}.from.steps"
        elif "from" in data:
            from_uri = self.uri(raw_from, f"{path}.from", consumer=True)
        steps: tuple[m.Step, ...] | None = ()
        if steps_value is not _Missing:
            steps = self.steps(steps_value, steps_path, allow_empty=True)
        handler = None
        if "error_handler" in data:
            handler = self.error_handler(data["error_handler"], f"{path}.error_handler")
        auto_start = True
        if "auto_start" in data:
            auto_start = bool(self.boolean(data["auto_start"], f"{path}.auto_start"))
        description = None
        if "description" in data:
            description = self.string(data["description"], f"{path}.description", empty=True)
        if route_id is None or from_uri is None or steps is None:
            return None
        return m.Route(route_id, from_uri, steps, handler, auto_start, description)

    def error_handler(self, value: Any, path: str) -> m.ErrorHandler | None:
        allowed = (
            "dead_letter",
            "maximum_redeliveries",
            "redelivery_delay",
            "backoff_multiplier",
            "maximum_redelivery_delay",
        )
        data = self.mapping(value, path, allowed)
        if data is None:
            return None
        before = len(self.errors)
        handler = m.ErrorHandler()
        if "dead_letter" in data:
            handler = _replace(
                handler, dead_letter=self.uri(data["dead_letter"], f"{path}.dead_letter")
            )
        if "maximum_redeliveries" in data:
            handler = _replace(
                handler,
                maximum_redeliveries=self.integer(
                    data["maximum_redeliveries"], f"{path}.maximum_redeliveries", 0, 1000
                ),
            )
        if "redelivery_delay" in data:
            handler = _replace(
                handler, delay=self.duration(data["redelivery_delay"], f"{path}.redelivery_delay")
            )
        if "backoff_multiplier" in data:
            handler = _replace(
                handler,
                backoff=self.number(data["backoff_multiplier"], f"{path}.backoff_multiplier", 1.0),
            )
        if "maximum_redelivery_delay" in data:
            handler = _replace(
                handler,
                max_delay=self.duration(
                    data["maximum_redelivery_delay"], f"{path}.maximum_redelivery_delay"
                ),
            )
        return handler if len(self.errors) == before else None

    def steps(
        self, value: Any, path: str, *, allow_empty: bool = False
    ) -> tuple[m.Step, ...] | None:
        if not isinstance(value, list):
            self.error(path, f"must be a list of steps, got {_kind(value)}")
            return None
        if not value and not allow_empty:
            self.error(path, "must hold at least one step")
            return None
        steps = [self.step(item, f"{path}[{i}]") for i, item in enumerate(value)]
        if any(step is None for step in steps):
            return None
        return tuple(step for step in steps if step is not None)

    def step(self, value: Any, path: str) -> m.Step | None:
        if not isinstance(value, dict) or len(value) != 1:
            got = f"{len(value)} keys" if isinstance(value, dict) else _kind(value)
            self.error(
                path, f"a step is a mapping with one pattern name, e.g. {{to: ...}}; got {got}"
            )
            return None
        ((name, config),) = value.items()
        parse = _STEPS.get(name)
        if parse is None:
            self.error(f"{path}.{name}", f"unknown step (known: {', '.join(sorted(_STEPS))})")
            return None
        before = len(self.errors)
        step = parse(self, config, f"{path}.{name}")
        return step if len(self.errors) == before else None

    # the patterns

    def to(self, config: Any, path: str) -> m.Step | None:
        if isinstance(config, dict):
            data = self.mapping(config, path, ("uri",), ("uri",))
            if data is None or "uri" not in data:
                return None
            uri = self.uri(data["uri"], f"{path}.uri")
        else:
            uri = self.uri(config, path)
        return None if uri is None else m.To(uri)

    def log(self, config: Any, path: str) -> m.Step | None:
        if isinstance(config, dict):
            data = self.mapping(config, path, ("message", "level", "logger"), ("message",))
            if data is None or "message" not in data:
                return None
            message = self.template(data["message"], f"{path}.message")
            level = "INFO"
            if "level" in data:
                level = self._one_of(data["level"], f"{path}.level", _LEVELS) or "INFO"
            logger = None
            if "logger" in data:
                logger = self.string(data["logger"], f"{path}.logger")
            return None if message is None else m.Log(message, level, logger)
        message = self.template(config, path)
        return None if message is None else m.Log(message)

    def set_header(self, config: Any, path: str) -> m.Step | None:
        return self._named_value(config, path, m.SetHeader)

    def set_property(self, config: Any, path: str) -> m.Step | None:
        return self._named_value(config, path, m.SetProperty)

    def _named_value(
        self, config: Any, path: str, cls: Callable[[str, Value], m.Step]
    ) -> m.Step | None:
        data = self.mapping(config, path, ("name", "value", "expr", "template"), ("name",))
        if data is None or "name" not in data:
            return None
        name = self.string(data["name"], f"{path}.name")
        value = self.value(data, path)
        return None if name is None or value is None else cls(name, value)

    def remove_header(self, config: Any, path: str) -> m.Step | None:
        if isinstance(config, dict):
            data = self.mapping(config, path, ("name",), ("name",))
            config = None if data is None else data.get("name")
            path = f"{path}.name"
        name = self.string(config, path)
        return None if name is None else m.RemoveHeader(name)

    def transform(self, config: Any, path: str) -> m.Step | None:
        data = self.mapping(config, path, ("value", "expr", "template"))
        if data is None:
            return None
        value = self.value(data, path)
        return None if value is None else m.Transform(value)

    def _format(self, config: Any, path: str) -> tuple[str, tuple[tuple[str, Any], ...]] | None:
        if not isinstance(config, dict):
            fmt = self._one_of(config, path, FORMATS)
            return None if fmt is None else (fmt, ())
        fmt_name = config.get("format")
        known = FORMAT_OPTIONS.get(fmt_name) if isinstance(fmt_name, str) else None
        data = self.mapping(config, path, ("format", *(known or {})), ("format",))
        if data is None or "format" not in data:
            return None
        fmt = self._one_of(data["format"], f"{path}.format", FORMATS)
        if fmt is None:
            return None
        options = []
        for key, kind in FORMAT_OPTIONS[fmt].items():
            if key in data:
                option = data[key]
                if kind is bool:
                    if self.boolean(option, f"{path}.{key}") is None:
                        continue
                elif self.string(option, f"{path}.{key}") is None:
                    continue
                elif key == "delimiter" and len(option) != 1:
                    self.error(f"{path}.{key}", "must be one character")
                    continue
                options.append((key, option))
        return fmt, tuple(options)

    def marshal(self, config: Any, path: str) -> m.Step | None:
        parsed = self._format(config, path)
        return None if parsed is None else m.Marshal(parsed[0], parsed[1])  # type: ignore[arg-type]

    def unmarshal(self, config: Any, path: str) -> m.Step | None:
        parsed = self._format(config, path)
        return None if parsed is None else m.Unmarshal(parsed[0], parsed[1])  # type: ignore[arg-type]

    def validate(self, config: Any, path: str) -> m.Step | None:
        data = self.mapping(config, path, ("json_schema", "schema", "expr"))
        if data is None:
            return None
        if not any(key in data for key in ("json_schema", "schema", "expr")):
            self.error(path, "give json_schema (a file), schema (inline) or expr")
            return None
        if "json_schema" in data and "schema" in data:
            self.error(path, "give json_schema or schema, not both")
            return None
        schema = schema_path = None
        if "json_schema" in data:
            schema_path = self.string(data["json_schema"], f"{path}.json_schema")
            if schema_path is not None:
                try:
                    schema = load_schema(schema_path, self.base_dir)
                except ValueError as exc:
                    self.error(f"{path}.json_schema", str(exc))
        if "schema" in data:
            schema = data["schema"]
            try:
                check_schema(schema, "inline")
            except ValueError as exc:
                self.error(f"{path}.schema", str(exc))
        expr = self.expr(data["expr"], f"{path}.expr") if "expr" in data else None
        return m.Validate(schema, schema_path, expr)

    def stop(self, config: Any, path: str) -> m.Step | None:
        if config not in (None, {}):
            self.error(path, "takes no configuration: write stop: {}")
            return None
        return m.Stop()

    def choice(self, config: Any, path: str) -> m.Step | None:
        data = self.mapping(config, path, ("when", "otherwise"), ("when",))
        if data is None or "when" not in data:
            return None
        whens = data["when"]
        if not isinstance(whens, list) or not whens:
            self.error(f"{path}.when", "must be a list of {expr, steps}, at least one")
            return None
        parsed = []
        for i, item in enumerate(whens):
            where = f"{path}.when[{i}]"
            when = self.mapping(item, where, ("expr", "steps"), ("expr", "steps"))
            if when is None or "expr" not in when or "steps" not in when:
                continue
            expr = self.expr(when["expr"], f"{where}.expr")
            steps = self.steps(when["steps"], f"{where}.steps")
            if expr is not None and steps is not None:
                parsed.append(m.When(expr, steps))
        otherwise = None
        if "otherwise" in data:
            other = self.mapping(data["otherwise"], f"{path}.otherwise", ("steps",), ("steps",))
            if other is not None and "steps" in other:
                otherwise = self.steps(other["steps"], f"{path}.otherwise.steps")
        return m.Choice(tuple(parsed), otherwise)

    def _one_of(self, value: Any, path: str, choices: tuple[str, ...]) -> str | None:
        if value not in choices:
            self.error(path, "must be one of " + ", ".join(choices))
            return None
        return str(value)

    def filter(self, config: Any, path: str) -> m.Step | None:
        data = self.mapping(config, path, ("expr", "steps"), ("expr", "steps"))
        if data is None or "expr" not in data or "steps" not in data:
            return None
        expr = self.expr(data["expr"], f"{path}.expr")
        steps = self.steps(data["steps"], f"{path}.steps")
        return None if expr is None or steps is None else m.Filter(expr, steps)

    def _options(self, data: dict[str, Any], path: str, spec: Mapping[str, str]) -> dict[str, Any]:
        """Optional fields by kind: int, count, bool, duration, expr, strategy, string, uri."""
        out: dict[str, Any] = {}
        for key, kind in spec.items():
            if key not in data:
                continue
            value, where = data[key], f"{path}.{key}"
            if kind == "int":
                out[key] = self.integer(value, where, 1)
            elif kind == "bool":
                out[key] = self.boolean(value, where)
            elif kind == "duration":
                out[key] = self.duration(value, where)
            elif kind == "expr":
                out[key] = self.expr(value, where)
            elif kind == "strategy":
                out[key] = self._one_of(value, where, m.STRATEGIES)
            elif kind == "uri":
                out[key] = self.uri(value, where)
            else:
                out[key] = self.string(value, where)
        return out

    def split(self, config: Any, path: str) -> m.Step | None:
        spec = {
            "expr": "expr",
            "tokenize": "string",
            "parallel": "bool",
            "max_parallel": "int",
            "aggregate": "strategy",
            "stop_on_exception": "bool",
        }
        return self._steps_and_options(config, path, spec, m.Split)

    def _steps_and_options(
        self, config: Any, path: str, spec: Mapping[str, str], make: Callable[..., m.Step]
    ) -> m.Step | None:
        """A step made of ``steps`` and the optional fields of ``spec``."""
        data = self.mapping(config, path, (*spec, "steps"), ("steps",))
        if data is None or "steps" not in data:
            return None
        options = self._options(data, path, spec)
        steps = self.steps(data["steps"], f"{path}.steps")
        return None if steps is None else make(steps, **options)

    def aggregate(self, config: Any, path: str) -> m.Step | None:
        spec = {
            "strategy": "strategy",
            "completion_size": "int",
            "completion_timeout": "duration",
            "completion_interval": "duration",
            "completion_predicate": "expr",
            "repository": "string",
        }
        data = self.mapping(config, path, ("correlation", *spec, "steps"), ("correlation", "steps"))
        if data is None or "correlation" not in data or "steps" not in data:
            return None
        correlation = self.expr(data["correlation"], f"{path}.correlation")
        options = self._options(data, path, spec)
        if not any(key.startswith("completion_") for key in data):
            self.error(
                path,
                "give a completion: completion_size, completion_timeout,"
                " completion_interval or completion_predicate",
            )
        repository = options.get("repository")
        if repository is not None:
            self._repository(repository, f"{path}.repository")
        steps = self.steps(data["steps"], f"{path}.steps")
        if correlation is None or steps is None:
            return None
        return m.Aggregate(correlation, steps, **options)

    def _repository(self, name: str, path: str) -> None:
        from meshgate.integration._sql_state import is_database_url

        if name in ("memory", "redis", "sql") or is_database_url(name):
            return
        if not name.startswith(("redis://", "rediss://")):
            self.error(
                path,
                "must be memory, redis, a redis:// URL, sql (the database_url setting)"
                " or a postgresql:// or sqlite:/// URL",
            )

    def multicast(self, config: Any, path: str) -> m.Step | None:
        spec = {
            "parallel": "bool",
            "timeout": "duration",
            "strategy": "strategy",
            "stop_on_exception": "bool",
        }
        return self._steps_and_options(config, path, spec, m.Multicast)

    def _expr_or(self, config: Any, path: str, spec: Mapping[str, str]) -> dict[str, Any] | None:
        if isinstance(config, str):
            expr = self.expr(config, path)
            return None if expr is None else {"expr": expr}
        data = self.mapping(config, path, ("expr", *spec), ("expr",))
        if data is None or "expr" not in data:
            return None
        options = self._options(data, path, spec)
        options["expr"] = self.expr(data["expr"], f"{path}.expr")
        return options

    def recipient_list(self, config: Any, path: str) -> m.Step | None:
        spec = {
            "delimiter": "string",
            "parallel": "bool",
            "strategy": "strategy",
            "ignore_invalid_endpoints": "bool",
        }
        options = self._expr_or(config, path, spec)
        return None if options is None else m.RecipientList(**options)

    def routing_slip(self, config: Any, path: str) -> m.Step | None:
        options = self._expr_or(config, path, {"delimiter": "string"})
        return None if options is None else m.RoutingSlip(**options)

    def wire_tap(self, config: Any, path: str) -> m.Step | None:
        step = self.to(config, path)
        return None if not isinstance(step, m.To) else m.WireTap(step.uri)

    def enrich(self, config: Any, path: str) -> m.Step | None:
        if isinstance(config, str):
            uri = self.uri(config, path)
            return None if uri is None else m.Enrich(uri)
        data = self.mapping(config, path, ("uri", "strategy", "target"), ("uri",))
        if data is None or "uri" not in data:
            return None
        options = self._options(
            data, path, {"uri": "uri", "strategy": "strategy", "target": "string"}
        )
        return m.Enrich(**options)

    def throttle(self, config: Any, path: str) -> m.Step | None:
        data = self.mapping(config, path, ("maximum", "period"), ("maximum",))
        if data is None or "maximum" not in data:
            return None
        maximum = self.integer(data["maximum"], f"{path}.maximum", 1)
        period = 1.0
        if "period" in data:
            period = self.duration(data["period"], f"{path}.period") or 0.0
            if period <= 0:
                self.error(f"{path}.period", "must be more than 0")
        return None if maximum is None else m.Throttle(maximum, period)

    def delay(self, config: Any, path: str) -> m.Step | None:
        seconds = self.duration(config, path)
        return None if seconds is None else m.Delay(seconds)

    def circuit_breaker(self, config: Any, path: str) -> m.Step | None:
        allowed = ("failure_threshold", "open_duration", "half_open_calls", "steps", "fallback")
        data = self.mapping(config, path, allowed, ("steps",))
        if data is None or "steps" not in data:
            return None
        options: dict[str, Any] = {}
        if "failure_threshold" in data:
            options["failure_threshold"] = self.integer(
                data["failure_threshold"], f"{path}.failure_threshold", 1
            )
        if "half_open_calls" in data:
            options["half_open_calls"] = self.integer(
                data["half_open_calls"], f"{path}.half_open_calls", 1
            )
        if "open_duration" in data:
            options["open_seconds"] = self.duration(data["open_duration"], f"{path}.open_duration")
        fallback = None
        if "fallback" in data:
            other = self.mapping(data["fallback"], f"{path}.fallback", ("steps",), ("steps",))
            if other is not None and "steps" in other:
                fallback = self.steps(other["steps"], f"{path}.fallback.steps")
        steps = self.steps(data["steps"], f"{path}.steps")
        return None if steps is None else m.CircuitBreaker(steps, fallback, **options)

    def load_balance(self, config: Any, path: str) -> m.Step | None:
        data = self.mapping(config, path, ("strategy", "weights", "steps"), ("steps",))
        if data is None or "steps" not in data:
            return None
        strategy = "round_robin"
        if "strategy" in data:
            strategy = (
                self._one_of(
                    data["strategy"],
                    f"{path}.strategy",
                    ("round_robin", "weighted", "failover", "random"),
                )
                or strategy
            )
        steps = self.steps(data["steps"], f"{path}.steps")
        weights = None
        if "weights" in data:
            raw = data["weights"]
            if not isinstance(raw, list) or not all(
                isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= 1000 for w in raw
            ):
                self.error(f"{path}.weights", "must be a list of integers from 1 to 1000")
            elif steps is not None and len(raw) != len(steps):
                self.error(f"{path}.weights", f"must have one weight per step ({len(steps)})")
            else:
                weights = tuple(raw)
            if strategy != "weighted":
                self.error(f"{path}.weights", "only the weighted strategy takes weights")
        if steps is None:
            return None
        return m.LoadBalance(steps, strategy, weights)  # type: ignore[arg-type]

    def idempotent_consumer(self, config: Any, path: str) -> m.Step | None:
        data = self.mapping(config, path, ("expr", "repository", "ttl", "steps"), ("expr", "steps"))
        if data is None or "expr" not in data or "steps" not in data:
            return None
        expr = self.expr(data["expr"], f"{path}.expr")
        repository = "memory"
        if "repository" in data:
            repository = self.string(data["repository"], f"{path}.repository") or "memory"
            self._repository(repository, f"{path}.repository")
        ttl = self.duration(data["ttl"], f"{path}.ttl") if "ttl" in data else None
        steps = self.steps(data["steps"], f"{path}.steps")
        if expr is None or steps is None:
            return None
        return m.IdempotentConsumer(expr, steps, repository, ttl)

    # whole-file checks

    def check_direct(self) -> None:
        for _, name, path in self.direct_calls:
            if name not in self.direct_consumers:
                self.error(path, f"no route consumes direct:{name}")
        # A route calls another through direct: route index -> [(called index, call path)].
        calls: dict[int, list[tuple[int, str]]] = {}
        for index, name, path in self.direct_calls:
            if name in self.direct_consumers:
                calls.setdefault(index, []).append((self.direct_consumers[name][0], path))
        names = {index: name for name, (index, _) in self.direct_consumers.items()}
        done: set[int] = set()

        def visit(node: int, stack: list[int]) -> None:
            stack.append(node)
            for target, path in calls.get(node, []):
                if target in stack:
                    loop = [*stack[stack.index(target) :], target]
                    shown = " -> ".join(f"direct:{names[n]}" for n in loop if n in names)
                    self.error(path, f"direct endpoints call each other in a cycle: {shown}")
                elif target not in done:
                    visit(target, stack)
            stack.pop()
            done.add(node)

        for start in sorted(calls):
            if start not in done:
                visit(start, [])


def _replace(handler: m.ErrorHandler, **changes: Any) -> m.ErrorHandler:
    from dataclasses import replace

    if any(value is None for value in changes.values()):
        return handler
    return replace(handler, **changes)


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

_STEPS: dict[str, Callable[[_Parser, Any, str], m.Step | None]] = {
    "to": _Parser.to,
    "log": _Parser.log,
    "set_header": _Parser.set_header,
    "remove_header": _Parser.remove_header,
    "set_property": _Parser.set_property,
    "transform": _Parser.transform,
    "marshal": _Parser.marshal,
    "unmarshal": _Parser.unmarshal,
    "validate": _Parser.validate,
    "stop": _Parser.stop,
    "choice": _Parser.choice,
    "filter": _Parser.filter,
    "split": _Parser.split,
    "aggregate": _Parser.aggregate,
    "multicast": _Parser.multicast,
    "recipient_list": _Parser.recipient_list,
    "routing_slip": _Parser.routing_slip,
    "wire_tap": _Parser.wire_tap,
    "enrich": _Parser.enrich,
    "throttle": _Parser.throttle,
    "delay": _Parser.delay,
    "circuit_breaker": _Parser.circuit_breaker,
    "load_balance": _Parser.load_balance,
    "idempotent_consumer": _Parser.idempotent_consumer,
}
