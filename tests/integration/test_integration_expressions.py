"""Expressions (JMESPath) and templates (sandboxed Jinja2) over an exchange."""

from __future__ import annotations

import jmespath
import pytest
from integration_kit import run_routes

from meshgate.integration import (
    Exchange,
    Expression,
    ExpressionError,
    IntegrationContext,
    Message,
    Template,
    from_,
)
from meshgate.integration.testing import mock_endpoint


def exchange(body: object, headers: dict[str, object] | None = None) -> Exchange:
    return Exchange(Message(body, headers or {}), properties={"tenant": "acme"})


def test_an_expression_reads_the_body_and_reaches_headers_and_properties() -> None:
    ex = exchange({"total": 1500, "items": [{"sku": "a"}, {"sku": "b"}]}, {"priority": "high"})
    assert Expression("total > `1000`").matches(ex)
    assert Expression("items[].sku").evaluate(ex) == ["a", "b"]
    assert Expression("headers.priority").evaluate(ex) == "high"
    assert Expression("properties.tenant").evaluate(ex) == "acme"
    assert Expression("body.total").evaluate(ex) == 1500
    assert Expression("length(@)").evaluate(ex) == 2


def test_a_list_body_stays_indexable_with_headers_reachable() -> None:
    ex = exchange([{"id": 1}, {"id": 2}], {"source": "x"})
    assert Expression("[1].id").evaluate(ex) == 2
    assert Expression("headers.source").evaluate(ex) == "x"
    assert Expression("length(@)").evaluate(ex) == 2


def test_a_text_body_is_reached_as_body() -> None:
    ex = exchange("hello", {"n": 1})
    assert Expression("body").evaluate(ex) == "hello"
    assert Expression("headers.n").evaluate(ex) == 1


def test_a_body_field_wins_over_the_exchange_names() -> None:
    ex = exchange({"headers": "mine"}, {"h": 1})
    assert Expression("headers").evaluate(ex) == "mine"


def test_jmespath_truth_is_used() -> None:
    for body, expected in ([], False), ({}, False), ("", False), (0, True), ([0], True):
        assert Expression("body").matches(exchange(body)) is expected


@pytest.mark.parametrize("source", ["total >", "[?", "foo[", "a ||", "a.b.c.d." * 3])
def test_invalid_jmespath_is_an_expression_error(source: str) -> None:
    with pytest.raises(ExpressionError, match="^invalid JMESPath: "):
        Expression(source)


def test_oversized_and_empty_sources_are_refused() -> None:
    with pytest.raises(ExpressionError, match="longer than 16384"):
        Expression("a" * 20000)
    with pytest.raises(ExpressionError, match="must not be empty"):
        Expression("  ")
    with pytest.raises(ExpressionError, match="must not be empty"):
        Template("")


def test_a_deeply_nested_expression_is_refused_not_crashing() -> None:
    with pytest.raises(ExpressionError):
        Expression("(" * 5000 + "a" + ")" * 5000)


def test_a_template_renders_with_body_headers_properties_and_id() -> None:
    ex = exchange({"id": 7}, {"h": "v"})
    out = Template("{{ body.id }} {{ headers.h }} {{ properties.tenant }} {{ exchange_id }}")
    assert out.render(ex) == f"7 v acme {ex.id}"


def test_the_template_sandbox_refuses_internals_and_mutation() -> None:
    ex = exchange({"items": []})
    with pytest.raises(ExpressionError, match="template failed"):
        Template("{{ body.__class__.__mro__ }}").render(ex)
    with pytest.raises(ExpressionError, match="template failed"):
        Template("{{ body['items'].append(1) }}").render(ex)
    assert ex.message.body == {"items": []}
    with pytest.raises(ExpressionError, match="template failed"):
        Template("{{ range(10**9) | list | length }}").render(ex)


def test_template_syntax_errors_give_the_line() -> None:
    with pytest.raises(ExpressionError, match=r"invalid template, line 2: "):
        Template("ok\n{{ body. }}")


def test_expressions_compile_once_per_route_not_per_exchange(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    route = (
        from_("direct:in", id="r")
        .filter("total > `10`")
        .set_header("big", expr="total")
        .to("mock:out")
        .end()
        .build()
    )
    calls = []
    original = jmespath.compile

    def counting(source: str) -> object:
        calls.append(source)
        return original(source)

    monkeypatch.setattr(jmespath, "compile", counting)

    async def scenario(context: IntegrationContext) -> None:
        for total in range(20):
            await context.send("direct:in", {"total": total})
        assert len(mock_endpoint(context, "mock:out").received) == 9

    run_routes([route], scenario)
    assert calls == []  # compiled when the route was built, before the patch
