"""Reading configuration text: YAML or JSON, bounded and hostile-input-proof, validated
against a pydantic model with every problem reported by its path (``a.b[2].c: message``).

Shared by every configuration (gateway, mesh, integration routes); knows none of them.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import stat
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    Discriminator,
    Tag,
    ValidationError,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from meshgate.config._fields import _NAME, Problems

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "MAX_NODES",
    "MAX_SNAPSHOT_BYTES",
    "ConfigError",
    "DepthLimitedLoader",
]

MAX_BYTES = 8 * 1024 * 1024
# A snapshot of 100,000 keys is about 10 MiB; a control plane's snapshot may be far larger.
MAX_SNAPSHOT_BYTES = 256 * 1024 * 1024
MAX_DEPTH = 64
MAX_NODES = 1_000_000

_M = TypeVar("_M", bound=BaseModel)

_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class ConfigError(Exception):
    """An unusable configuration; ``errors`` holds every problem, one ``PATH: message`` each."""

    def __init__(self, errors: Iterable[str], source: str = "<string>") -> None:
        self.errors = list(errors)
        self.source = source
        super().__init__(self.errors, source)

    def __str__(self) -> str:
        if len(self.errors) == 1:
            return f"{self.source}: {self.errors[0]}"
        listed = "".join(f"\n  {error}" for error in self.errors)
        return f"{self.source}: {len(self.errors)} errors{listed}"


@contextlib.contextmanager
def _no_collection() -> Iterator[None]:
    """Hundreds of thousands of new objects, none in a cycle: without this the collector
    runs over and over while a large snapshot is parsed and takes most of its time."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _validate(model: type[_M], data: dict[str, Any], source: str) -> _M:
    try:
        # Strict: "5" is not an integer and yes is not a string, as in the JSON Schema.
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        lines = _messages(exc, model)
        # Cross-references are checked once a model's fields are valid; a model that can
        # read them from the raw document says them now, so that one pass finds every error.
        more = getattr(model, "reference_problems", None)
        if more is not None:
            lines += [line for line in more(data) if line not in lines]
        raise ConfigError(lines, source) from None


def _read(path: str, max_bytes: int = MAX_BYTES) -> bytes:
    def fail(message: str) -> ConfigError:
        return ConfigError([message], path)

    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise fail("file not found") from None
    except IsADirectoryError:
        raise fail("is a directory, not a file") from None
    except PermissionError:
        raise fail("permission denied: the file is not readable") from None
    except OSError as exc:
        raise fail(f"cannot open: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise fail("is a directory, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise fail("is not a regular file")
        if info.st_size > max_bytes:
            raise fail(_too_large(info.st_size, max_bytes))
        # One byte past the limit tells a file that grew since fstat from one at the limit.
        with open(fd, "rb", closefd=False) as file:
            data = file.read(max_bytes + 1)
    except OSError as exc:
        raise fail(f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise fail(_too_large(len(data), max_bytes))
    return data


def _too_large(size: int, limit: int = MAX_BYTES) -> str:
    return f"too large: {size} bytes, the limit is {limit // 2**20} MiB"


def _parse_yaml(text: str | bytes, source: str, max_bytes: int = MAX_BYTES) -> dict[str, Any]:
    if isinstance(text, bytes):
        if len(text) > max_bytes:
            raise ConfigError([_too_large(len(text), max_bytes)], source)
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raw = exc.object
            line = raw.count(b"\n", 0, exc.start) + 1
            message = f"not UTF-8 text: byte 0x{raw[exc.start]:02x} on line {line}"
            raise ConfigError([message], source) from None
    else:
        size = len(text) if len(text) > max_bytes else len(text.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            raise ConfigError([_too_large(size, max_bytes)], source)
        text = text.removeprefix("\ufeff")
    if not text.strip():
        raise ConfigError(["the configuration is empty"], source)
    data = _load_json(text)
    if data is None:
        data = _load_yaml(text, source)
    if data is None:
        raise ConfigError(["the configuration is empty"], source)
    if not isinstance(data, dict):
        raise ConfigError([f"top level: must be a mapping, got {_kind_of(data)}"], source)
    return data


def _load_json(text: str) -> Any:
    """Parse plain JSON (snapshots) in C; None sends anything unusual to the YAML loader."""
    if not text.lstrip().startswith(("{", "[")):
        return None
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_not_json)
    except (ValueError, RecursionError):
        # Duplicates, NaN, bad syntax, deep nesting: the YAML loader says where.
        return None
    return data if _within_depth(data) else None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    mapping = dict(pairs)
    if len(mapping) != len(pairs):
        raise ValueError("duplicate key")
    return mapping


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _within_depth(data: Any) -> bool:
    pending = [(data, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > MAX_DEPTH:
            return False
        if isinstance(value, dict):
            pending.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            pending.extend((item, depth + 1) for item in value)
    return True


def _load_yaml(text: str, source: str) -> Any:
    loader: _Loader | None = None
    try:
        loader = _Loader(text)
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([_marked_message(exc)], source) from None
    except yaml.reader.ReaderError as exc:
        raise ConfigError([_reader_message(exc, text)], source) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"invalid YAML: {_one_line(str(exc))}"], source) from None
    except Exception as exc:
        # Values built after their node was left (a mapping's items) lose the node's mark.
        raise ConfigError([f"invalid YAML value: {_one_line(str(exc))}"], source) from None
    finally:
        if loader is not None:
            loader.dispose()
    return data


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _at(mark: yaml.Mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _marked_message(exc: yaml.MarkedYAMLError) -> str:
    problem = _one_line(exc.problem or exc.context or "invalid YAML")
    if exc.problem and exc.context:
        context = _one_line(exc.context)
        if exc.context_mark is not None and exc.context_mark is not exc.problem_mark:
            context = f"{context} at {_at(exc.context_mark)}"
        problem = f"{problem} ({context})"
    mark = exc.problem_mark or exc.context_mark
    return f"{_at(mark)}: {problem}" if mark is not None else problem


def _reader_message(exc: yaml.reader.ReaderError, text: str) -> str:
    line = text.count("\n", 0, exc.position) + 1
    column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
    code = ord(exc.character) if isinstance(exc.character, str) else exc.character
    return f"line {line}, column {column}: character U+{code:04X} is not allowed in YAML"


def _tag_name(tag: str) -> str:
    return "!!" + tag.removeprefix("tag:yaml.org,2002:") if tag.startswith("tag:yaml.org") else tag


class DepthLimitedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing nesting deeper than ``max_depth``."""

    max_depth = MAX_DEPTH

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        # The composer recurses per level; refuse before Python's own stack limit does.
        self._depth += 1
        try:
            if self._depth > self.max_depth:
                mark = self.peek_event().start_mark
                message = f"nested deeper than {self.max_depth} levels"
                raise ComposerError(None, None, message, mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Loader(DepthLimitedLoader):
    """The configuration's loader: also refuses duplicate or non-string keys and bombs."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return self.construct_document(node)

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as exc:
            # PyYAML's scalar constructors trust their input: 2024-13-01 raises ValueError,
            # an empty !!int IndexError, and so on; any of them is a bad value at this node.
            problem = f"invalid {_tag_name(node.tag)} value: {_one_line(str(exc))}"
            raise ConstructorError(None, None, problem, node.start_mark) from None

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        # Duplicates among written keys only: a merged (<<) key overridden here is legitimate.
        seen: dict[str, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            _check_key(key_node)
            first = seen.setdefault(key_node.value, key_node.start_mark)
            if first is not key_node.start_mark:
                problem = f"duplicate key {key_node.value!r} (first on line {first.line + 1})"
                raise ConstructorError(None, None, problem, key_node.start_mark)
        self.flatten_mapping(node)
        for key_node, _ in node.value:
            _check_key(key_node)
        return super().construct_mapping(node, deep)

    def refuse_tag(self, node: Node) -> Any:
        problem = f"YAML tag {_tag_name(node.tag)!r} is not allowed"
        raise ConstructorError(None, None, problem, node.start_mark)


_Loader.add_constructor(None, _Loader.refuse_tag)
# YAML 1.1 wants a dot and a signed exponent; JSON numbers such as 1e-05 or 1e16 (pydantic's
# JSON) would read as text. YAML 1.2 and JSON agree that they are numbers.
_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def _check_key(node: Node) -> None:
    # JSON and the JSON Schema only know string keys; YAML would make `yes:` a boolean.
    if isinstance(node, ScalarNode) and node.tag == _STR_TAG:
        return
    if isinstance(node, ScalarNode):
        problem = f"key {node.value!r} is not a string; put it in quotes"
    else:
        problem = "keys must be strings, not lists or mappings"
    raise ConstructorError(None, None, problem, node.start_mark)


def _check_expansion(root: Node) -> None:
    """Refuse alias cycles and documents whose aliases expand past the size or depth limits."""
    measured: dict[int, tuple[int, int]] = {}
    active: set[int] = set()

    def measure(node: Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in measured:
            size, height = measured[key]
        else:
            if key in active:
                raise ComposerError(
                    None, None, "an alias refers to its own ancestor", node.start_mark
                )
            active.add(key)
            size, height = 1, 0
            children: list[Node] = []
            if isinstance(node, SequenceNode):
                children = node.value
            elif isinstance(node, MappingNode):
                children = [n for pair in node.value for n in pair]
            for child in children:
                child_size, child_height = measure(child, depth + 1)
                size += child_size
                height = max(height, child_height + 1)
                if size > MAX_NODES:
                    problem = f"more than {MAX_NODES} values once aliases are expanded"
                    raise ComposerError(None, None, problem, node.start_mark)
            active.discard(key)
            measured[key] = size, height
        if depth + height > MAX_DEPTH:
            problem = f"nested deeper than {MAX_DEPTH} levels once aliases are expanded"
            raise ComposerError(None, None, problem, node.start_mark)
        return size, height

    measure(root, 1)


@dataclass
class _Where:
    path: str
    target: Any = None
    parent: Any = None
    union_path: str | None = None
    union: Any = None


def _unwrap(tp: Any, discriminator: Any = None) -> tuple[Any, Any]:
    """Strip Annotated and Optional, keeping a union's discriminator."""
    while True:
        if get_origin(tp) is Annotated:
            tp, *metadata = get_args(tp)
            for item in metadata:
                if isinstance(item, Discriminator):
                    named = isinstance(item.discriminator, str)
                    discriminator = item.discriminator if named else item
                elif isinstance(item, FieldInfo) and item.discriminator is not None:
                    discriminator = item.discriminator
        elif _is_union(tp):
            members = [m for m in get_args(tp) if m is not type(None)]
            if len(members) != 1:
                return tp, discriminator
            tp = members[0]
        else:
            return tp, discriminator


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _members(union: Any) -> list[Any]:
    return [m for m in get_args(union) if m is not type(None)]


def _tags(member: Any, discriminator: Any) -> list[Any]:
    if get_origin(member) is Annotated:
        tags = [m.tag for m in get_args(member)[1:] if isinstance(m, Tag)]
        if tags:
            return tags
        member = get_args(member)[0]
    if (
        isinstance(discriminator, str)
        and isinstance(member, type)
        and issubclass(member, BaseModel)
    ):
        field = member.model_fields.get(discriminator)
        if field is not None and get_origin(field.annotation) is Literal:
            return list(get_args(field.annotation))
    return []


def _child(tp: Any, item: str | int) -> tuple[Any, Any]:
    if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(item, str):
        for name, field in tp.model_fields.items():
            if item in (name, field.alias):
                annotation: Any = field.annotation
                if field.metadata:
                    annotation = Annotated[(annotation, *field.metadata)]
                return annotation, field.discriminator
        return None, None
    origin, args = get_origin(tp), get_args(tp)
    if origin in (list, tuple, set, frozenset, Sequence) and isinstance(item, int) and args:
        return args[0], None
    if origin in (dict, Mapping) and isinstance(item, str) and len(args) == 2:
        return args[1], None
    return None, None


def _key(item: str | int, first: bool) -> str:
    if isinstance(item, int):
        return f"[{item}]"
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", item):
        return item if first else f".{item}"
    return f"[{json.dumps(item)}]"


def _locate(root: type[BaseModel], loc: tuple[str | int, ...]) -> _Where:
    """Printed path of a pydantic ``loc`` (union tags dropped) and the types along it."""
    where = _Where(path="")
    tp: Any = root
    discriminator: Any = None
    for item in loc:
        tp, discriminator = _unwrap(tp, discriminator)
        if _is_union(tp) or discriminator is not None:
            # The item names a union member: the tag of a tagged union, else a type label.
            # A tagged union of one member is that member, still tagged in the loc.
            if discriminator is not None and _is_union(tp):
                tp = next((m for m in _members(tp) if item in _tags(m, discriminator)), None)
            elif discriminator is None:
                if where.union_path is None:
                    where.union_path, where.union = where.path, tp
                tp = None
            discriminator = None
            continue
        where.parent = tp
        where.path += _key(item, not where.path)
        tp, discriminator = _child(tp, item)
    if isinstance(discriminator, str):
        discriminator = Discriminator(discriminator)
    where.target = tp if discriminator is None else Annotated[tp, discriminator]
    return where


_TYPES = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "tuple_type": "a list",
    "set_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "dataclass_type": "a mapping",
    "none_required": "null",
}

_BOUNDS = {
    "greater_than": ("gt", "must be greater than {}"),
    "greater_than_equal": ("ge", "must be at least {}"),
    "less_than": ("lt", "must be less than {}"),
    "less_than_equal": ("le", "must be at most {}"),
    "too_short": ("min_length", "must have at least {} items"),
    "too_long": ("max_length", "must have at most {} items"),
    "string_too_long": ("max_length", "must be at most {} characters long"),
}

_PATTERNS = {
    _NAME: "must start with a letter or digit and hold only letters, digits, '_', '.' and '-'",
}


def _kind(tp: Any) -> str:
    tp, _ = _unwrap(tp)
    origin = get_origin(tp) or tp
    if origin is Literal:
        return "one of " + ", ".join(map(repr, get_args(tp)))
    kinds = {str: "a string", bool: "true or false", int: "an integer", float: "a number"}
    if origin in kinds:
        return kinds[origin]
    if origin in (list, tuple, set, frozenset, Sequence):
        return "a list"
    return "a mapping"


def _kind_of(value: Any) -> str:
    kinds = [
        (bool, "a boolean"),
        (int, "a number"),
        (float, "a number"),
        (str, "a string"),
        (list, "a list"),
        (date, "a date"),
    ]
    return next(
        (kind for cls, kind in kinds if isinstance(value, cls)), f"a {type(value).__name__}"
    )


def _messages(exc: ValidationError, root: type[BaseModel]) -> list[str]:
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        where = _locate(root, error["loc"])
        if where.union_path is not None:
            # Each member of a plain union failed; one line says what any of them takes.
            kinds = " or ".join(dict.fromkeys(_kind(m) for m in _members(where.union)))
            lines.append(f"{where.union_path or 'top level'}: must be {kinds}")
            continue
        for path, message in _explain(error, where):
            lines.append(f"{path or 'top level'}: {message}")
    return list(dict.fromkeys(lines))


def _explain(error: ErrorDetails, where: _Where) -> list[tuple[str, str]]:
    kind, ctx, path = error["type"], error.get("ctx") or {}, where.path
    if kind in _TYPES:
        message = f"must be {_TYPES[kind]}"
        if kind == "string_type" and isinstance(error["input"], (bool, int, float, date)):
            message += " (put the value in quotes)"
        return [(path, message)]
    if kind == "missing":
        return [(path, "is required")]
    if kind == "extra_forbidden":
        parent = where.parent
        if isinstance(parent, type) and issubclass(parent, BaseModel):
            allowed = ", ".join(f.alias or name for name, f in parent.model_fields.items())
            return [(path, f"unknown field (allowed: {allowed})")]
        return [(path, "unknown field")]
    if kind == "literal_error":
        target, _ = _unwrap(where.target)
        if get_origin(target) is Literal:
            return [(path, "must be one of " + ", ".join(map(repr, get_args(target))))]
        expected = str(ctx.get("expected", ""))
        head, _, tail = expected.rpartition(" or ")
        return [(path, f"must be one of {head}, {tail}" if head else f"must be {expected}")]
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return [_explain_tag(error, where)]
    if kind in ("value_error", "assertion_error"):
        cause = ctx.get("error")
        if isinstance(cause, Problems):
            return [(path, problem) for problem in cause.problems]
        if cause is not None:
            return [(path, _one_line(str(cause)))]
    if kind in _BOUNDS and _BOUNDS[kind][0] in ctx:
        key, template = _BOUNDS[kind]
        bound = ctx[key]
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return [(path, template.format(bound))]
    if kind == "string_too_short":
        length = ctx.get("min_length", 1)
        message = "must not be empty" if length == 1 else f"must be at least {length} characters"
        return [(path, message)]
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern", ""))
        return [(path, _PATTERNS.get(pattern, f"must match the pattern {pattern}"))]
    message = _one_line(error["msg"])
    return [(path, re.sub(r"^(Input|Value) should (be|have)", r"must \2", message))]


def _explain_tag(error: ErrorDetails, where: _Where) -> tuple[str, str]:
    ctx = error.get("ctx") or {}
    union, discriminator = _unwrap(where.target)
    if _is_union(union):
        tags = [t for m in _members(union) for t in _tags(m, discriminator)]
    else:
        tags = _tags(where.target, discriminator)
    if isinstance(discriminator, Discriminator) and discriminator.discriminator is _policy_name:
        if error["type"] == "union_tag_invalid":
            known = ", ".join(sorted(map(str, tags))) or str(ctx.get("expected_tags", ""))
            return where.path, f"unknown policy {ctx.get('tag')!r} (known: {known})"
        if not isinstance(error["input"], dict):
            return where.path, "must be a mapping"
        return where.path, "must name exactly one policy, e.g. {cors: {}}"
    field = str(ctx.get("discriminator", "")).strip("'")
    path = f"{where.path}.{field}" if where.path else field
    expected = ", ".join(map(repr, tags)) or str(ctx.get("expected_tags", ""))
    if error["type"] == "union_tag_invalid":
        return path, f"must be one of {expected}"
    return path, f"is required (one of {expected})"


def _policy_name(entry: Any) -> str | None:
    if isinstance(entry, dict) and len(entry) == 1:
        (name,) = entry
        return name if isinstance(name, str) else None
    return None
