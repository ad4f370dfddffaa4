"""The fast paths of expressions, templates and schema validation give what the reference
implementations give (jmespath's interpreter, Jinja2, jsonschema), for any data."""

from __future__ import annotations

import os
from typing import Any

import jsonschema
import jsonschema_rs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshgate.integration._expressions import Expression, Template, _interpreter, _scope
from meshgate.integration._message import Exchange, Message
from meshgate.integration._schemas import SchemaValidator

# JSON-like data, with the names an expression or a template may meet.
_keys = st.sampled_from(["id", "total", "body", "headers", "items", "a", "b", "0", "keys"])
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from([0, 1, 1000, 2500, 0.0, 1.0, 2.5, float("inf")]),
    st.sampled_from(["", "a", "b", "1000", "x y"]),
)
_data = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=4)),
    max_leaves=12,
)
_bodies = st.one_of(_data, st.binary(max_size=8), st.text(max_size=8))
_headers = st.dictionaries(st.sampled_from(["a", "priority", "body"]), _scalars, max_size=3)

EXPRESSIONS = [
    "total > `1000`",
    "total >= `0` && total < `300`",
    "total == `1`",
    "total != `0`",
    "id == 'a'",
    "id < 'b'",
    "a.b",
    "a.b.a",
    "items[0]",
    "items[-1].id",
    "a[1][0]",
    "headers.priority == 'high'",
    "headers.a",
    "body.id",
    "properties.p",
    "!total",
    "!a.b",
    "a || b",
    "a && b || total",
    "`true` && `0`",
    '`null` || `[]` || `{}` || `""` || `0`',
    "!(a == b)",
    "keys",
]


def _exchange(body: Any, headers: dict[str, Any]) -> Exchange:
    return Exchange(Message(body, dict(headers)), properties={"p": 1})


def _outcome(function: Any) -> Any:
    try:
        return ("value", function())
    except Exception as exc:
        return ("error", type(exc).__name__)


def test_the_common_conditions_take_the_fast_path() -> None:
    compiled = [source for source in EXPRESSIONS if Expression(source)._fast is not None]
    assert compiled == EXPRESSIONS
    # Functions, projections and filters are interpreted.
    for source in ("length(id) > `2`", "items[?total > `1`]", "items[*].id", "@"):
        assert Expression(source)._fast is None


@settings(max_examples=300, deadline=None)
@given(body=_bodies, headers=_headers)
def test_compiled_expressions_agree_with_the_interpreter(
    body: Any, headers: dict[str, Any]
) -> None:
    exchange = _exchange(body, headers)
    for source in EXPRESSIONS:
        expression = Expression(source)
        fast = _outcome(lambda: expression.evaluate(exchange))  # noqa: B023
        slow = _outcome(lambda: _interpreter.visit(expression._tree, _scope(exchange)))  # noqa: B023
        assert fast == slow, (source, body)


TEMPLATES = [
    '{"accepted": true, "id": "{{ body.id }}"}',
    "{{ body.a.b }}-{{ body['total'] }}",
    "{{ body.b[0] }} {{ body.b[1] }} {{ body[0] }}",
    "{{ body.items[0] }} {{ body.b[-1] }}",  # items: a method of dict; -1: an operation
    "{{ headers.priority }}/{{ headers['a'] }}/{{ properties.p }}/{{ exchange_id }}",
    "{{ body }}",
    "{{ body.keys }}",  # the dict's method, as Jinja2 reads it
    "plain text, no field\n",
]


def test_templates_of_fields_take_the_fast_path() -> None:
    planned = [source for source in TEMPLATES if Template(source)._plan is not None]
    assert planned == [t for t in TEMPLATES if "keys" not in t and "items" not in t]
    for source in ("{% if body %}x{% endif %}", "{{ body.id | upper }}", "{{ body.a + 1 }}"):
        assert Template(source)._plan is None


@settings(max_examples=300, deadline=None)
@given(body=_bodies, headers=_headers)
def test_planned_templates_render_as_jinja2_does(body: Any, headers: dict[str, Any]) -> None:
    exchange = _exchange(body, headers)
    for source in TEMPLATES:
        template, reference = Template(source), Template(source)
        reference._plan = None  # Jinja2 alone
        expected = _outcome(lambda: reference.render(exchange))  # noqa: B023
        assert _outcome(lambda: template.render(exchange)) == expected, (source, body)  # noqa: B023


SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["id", "total"],
    "properties": {
        "id": {"type": ["string", "integer"], "minLength": 1},
        "total": {"type": "number", "minimum": 0},
        "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "email": {"type": "string", "format": "email"},
        "items": {"type": "array", "items": {"type": "object", "required": ["sku"]}},
    },
}


@settings(max_examples=300, deadline=None)
@given(
    data=st.one_of(
        _data,
        st.fixed_dictionaries(
            {"id": st.one_of(st.text(max_size=3), st.integers()), "total": _scalars},
            optional={
                "currency": st.sampled_from(["EUR", "eur", "EURO", 3]),
                "email": st.sampled_from(["a@b.co", "nope", ""]),
                "items": st.lists(st.dictionaries(st.sampled_from(["sku", "x"]), _scalars)),
            },
        ),
    )
)
def test_the_schema_validator_accepts_what_either_validator_accepts(data: Any) -> None:
    reference = jsonschema.Draft202012Validator(
        SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    problems = SchemaValidator(SCHEMA).errors(data)
    try:
        compiled = jsonschema_rs.validator_for(SCHEMA, validate_formats=True).is_valid(data)
    except ValueError:  # data it cannot read
        compiled = False
    # Valid when either accepts; where the reference refuses, its words are the answer.
    assert (problems == []) == (compiled or reference.is_valid(data)), (data, problems)
    assert all(p.startswith("body") or p.startswith("and ") for p in problems)


def test_schema_problems_name_the_field_and_are_capped() -> None:
    validator = SchemaValidator(SCHEMA)
    assert validator.errors({"id": "o-1", "total": 5, "currency": "EUR"}) == []
    problems = validator.errors({"id": 5, "total": "x", "currency": "eur"})
    assert problems == [
        "body.currency: 'eur' does not match '^[A-Z]{3}$'",
        "body.total: 'x' is not of type 'number'",
    ]
    many = {"id": "", "total": -1, "items": [{}] * 10}
    problems = validator.errors(many)
    assert len(problems) == 6 and problems[-1] == "and 7 more"


@pytest.mark.parametrize("data", [b"bytes", {1: "non-string key"}, {"id": ("a",), "total": 1}])
def test_data_the_compiled_validator_cannot_read_is_checked_by_jsonschema(data: Any) -> None:
    problems = SchemaValidator(SCHEMA).errors(data)
    reference = jsonschema.Draft202012Validator(SCHEMA)
    assert (problems == []) == reference.is_valid(data)


def test_a_schema_with_a_reference_it_may_not_fetch_is_still_checked() -> None:
    schema = {"$ref": "https://example.invalid/order.json"}
    validator = SchemaValidator(schema)
    assert validator._fast is None  # never fetched from the network
    with pytest.raises(Exception, match="example.invalid"):
        validator.errors({})


def test_exchange_ids_are_unique_in_a_process_and_across_a_fork() -> None:
    ids = {Exchange().id for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first id, then out
        os.write(write, Exchange().id.encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert len(child) == 32 and child[:16] != Exchange().id[:16]


def test_where_the_validators_differ_the_compiled_one_follows_the_specification() -> None:
    fractions = SchemaValidator({"multipleOf": 0.1})
    assert fractions.errors(0.3) == []  # jsonschema alone refuses it (floating point)
    assert fractions.errors(0.35) == ["body: 0.35 is not a multiple of 0.1"]
    patterns = SchemaValidator({"type": "string", "format": "regex"})
    assert patterns.errors("(?<n>a)") == []  # an ECMA 262 named group
