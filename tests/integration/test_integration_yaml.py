"""The YAML DSL: the issue's example, equality with the builder, and every error by path."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from harness import service_url
from integration_kit import run_routes

from meshgate.integration import (
    DefinitionError,
    ErrorHandler,
    Exchange,
    IntegrationContext,
    SchemaValidationError,
    from_,
    load_routes,
    parse_routes,
)
from meshgate.integration.testing import advise, mock_endpoint

EXAMPLE = """\
routes:
  - id: orders
    from: http:/orders?method=POST
    steps:
      - unmarshal: json
      - validate: {json_schema: schemas/order.json}
      - choice:
          when:
            - expr: "total > `1000`"
              steps:
                - set_header: {name: priority, value: high}
                - to: amqp:queue:big-orders
          otherwise:
            steps:
              - to: direct:small-orders
      - transform: {template: '{"accepted": true, "id": "{{ body.id }}"}'}
  - id: small
    from: direct:small-orders
    steps:
      - log: "small order {{ body.id }}"
"""
ORDER_SCHEMA = """{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["id", "total"],
  "properties": {"id": {"type": "string"}, "total": {"type": "number", "minimum": 0}}
}"""


@pytest.fixture
def example(tmp_path: Path) -> Path:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "order.json").write_text(ORDER_SCHEMA)
    path = tmp_path / "routes.yaml"
    path.write_text(EXAMPLE)
    return path


def errors_of(text: str, base_dir: Path | None = None) -> list[str]:
    with pytest.raises(DefinitionError) as caught:
        parse_routes(text, base_dir=base_dir)
    return caught.value.errors


def test_the_example_loads_as_the_builder_writes_it(example: Path) -> None:
    loaded = load_routes(example)
    built = [
        from_("http:/orders?method=POST", id="orders")
        .unmarshal("json")
        .validate(json_schema="schemas/order.json", base_dir=example.parent)
        .choice()
        .when("total > `1000`")
        .set_header("priority", "high")
        .to("amqp:queue:big-orders")
        .otherwise()
        .to("direct:small-orders")
        .end()
        .transform(template='{"accepted": true, "id": "{{ body.id }}"}')
        .build(),
        from_("direct:small-orders", id="small").log("small order {{ body.id }}").build(),
    ]
    assert loaded.routes == built
    assert loaded.routes[0].source == str(example)


def _amqp_reachable() -> str | None:
    import aio_pika

    url = service_url("AMQP", "amqp://guest:guest@127.0.0.1:5672/")

    async def probe() -> None:
        connection = await aio_pika.connect(url, timeout=2)
        await connection.close()

    try:
        asyncio.run(probe())
    except Exception:
        return None
    return url


def test_the_example_runs_with_the_broker_when_reachable(example: Path) -> None:
    """The example's flow, entered through direct: (test_integration_example covers HTTP).

    The queue big-orders is shared: only this run's orders (unique ids) are counted.
    """
    loaded = load_routes(example)
    amqp_url = _amqp_reachable()
    queue = "big-orders"
    run_id = uuid.uuid4().hex[:12]
    routes = [
        advise(loaded.routes[0], replace_from="direct:orders"),
        advise(loaded.routes[1], replace_to={}, mock_endpoints=[]),
    ]
    if amqp_url is None:
        routes[0] = advise(routes[0], mock_endpoints=["amqp:*"])
    else:
        routes.append(from_(f"amqp:queue:{queue}", id="big").to("mock:big").build())

    def order(number: int, total: int | None) -> bytes:
        doc: dict[str, object] = {"id": f"o-{number}-{run_id}"}
        if total is not None:
            doc["total"] = total
        return json.dumps(doc).encode()

    async def scenario(context: IntegrationContext) -> None:
        big = "mock:big" if amqp_url else "mock:amqp:queue:big-orders"
        mine = mock_endpoint(context, big)

        def ours() -> list[Exchange]:
            return [e for e in mine.received if run_id.encode() in e.message.body_bytes()]

        reply = await context.request("direct:orders", order(1, 5000))
        assert reply.body == f'{{"accepted": true, "id": "o-1-{run_id}"}}'
        for _ in range(200):
            if ours():
                break
            await asyncio.sleep(0.025)
        assert ours()[0].headers["priority"] == "high"
        reply = await context.request("direct:orders", order(2, 10))
        assert reply.body == f'{{"accepted": true, "id": "o-2-{run_id}"}}'
        with pytest.raises(SchemaValidationError, match="'total' is a required property"):
            await context.request("direct:orders", order(3, None))
        await asyncio.sleep(0.05)
        assert len(ours()) == 1

    settings = {"amqp_url": amqp_url} if amqp_url else {}
    run_routes(routes, scenario, settings=settings)


def test_every_error_is_reported_with_its_path(tmp_path: Path) -> None:
    text = """
routes:
  - id: a
    from: direct:a
    steps:
      - unmarshal: yaml
      - set_header: {name: x}
      - choice:
          when:
            - expr: "total >"
              steps: [{to: mock:x}]
      - to: ftp:files
      - to: seda:q?sise=1
      - split: {steps: []}
      - frobnicate: {}
      - aggregate: {correlation: id, steps: [{to: mock:x}]}
      - validate: {json_schema: missing.json}
      - transform: {template: "{{ body. }}"}
      - throttle: {maximum: 0}
      - delay: soon
  - id: a
    from: direct:b
    steps: [{to: direct:nowhere}]
"""
    assert errors_of(text, tmp_path) == [
        "routes[0].steps[0].unmarshal: must be one of json, xml, csv",
        "routes[0].steps[1].set_header: give exactly one of value, expr, template",
        "routes[0].steps[2].choice.when[0].expr: invalid JMESPath: Incomplete expression:"
        ' "total >" ^',
        "routes[0].steps[3].to: unknown endpoint scheme 'ftp' in 'ftp:files' (known: amqp,"
        " cron, direct, file, http, kafka, log, mock, mqtt, nats, redis, seda, sql, timer)",
        "routes[0].steps[4].to: seda:q?sise=1: unknown option 'sise' (allowed: size,"
        " concurrent_consumers, block_when_full, timeout)",
        "routes[0].steps[5].split.steps: must hold at least one step",
        "routes[0].steps[6].frobnicate: unknown step (known: aggregate, choice, circuit_breaker,"
        " delay, enrich, filter, idempotent_consumer, load_balance, log, marshal, multicast,"
        " recipient_list, remove_header, routing_slip, set_header, set_property, split, stop,"
        " throttle, to, transform, unmarshal, validate, wire_tap)",
        "routes[0].steps[7].aggregate: give a completion: completion_size, completion_timeout,"
        " completion_interval or completion_predicate",
        "routes[0].steps[8].validate.json_schema: schema 'missing.json': file not found",
        "routes[0].steps[9].transform.template: invalid template, line 1: expected name or number",
        "routes[0].steps[10].throttle.maximum: must be between 1 and 2147483648",
        "routes[0].steps[11].delay: must be a duration such as 500 (ms), '500ms', '2s' or '1m'",
        "routes[1].id: duplicate route id 'a' (first in routes[0])",
        "routes[1].steps[0].to: no route consumes direct:nowhere",
    ]


def test_the_jmespath_error_text_is_exact() -> None:
    errors = errors_of(
        "routes: [{id: a, from: 'direct:a',"
        " steps: [{choice: {when: [{expr: 'a[', steps: [{stop: {}}]}]}}]}]"
    )
    assert errors[0].startswith("routes[0].steps[0].choice.when[0].expr: invalid JMESPath: ")


def test_a_cycle_of_direct_endpoints_is_an_error() -> None:
    text = """
routes:
  - {id: entry, from: "timer:t", steps: [{to: "direct:a"}]}
  - {id: a, from: "direct:a", steps: [{to: "direct:b"}]}
  - {id: b, from: "direct:b", steps: [{filter: {expr: x, steps: [{to: "direct:c"}]}}]}
  - {id: c, from: "direct:c", steps: [{to: "direct:a"}]}
  - {id: self, from: "direct:self", steps: [{to: "direct:self"}]}
"""
    assert errors_of(text) == [
        "routes[3].steps[0].to: direct endpoints call each other in a cycle:"
        " direct:a -> direct:b -> direct:c -> direct:a",
        "routes[4].steps[0].to: direct endpoints call each other in a cycle:"
        " direct:self -> direct:self",
    ]


def test_a_direct_endpoint_consumed_twice_is_an_error() -> None:
    text = "routes: [{id: a, from: 'direct:x'}, {id: b, from: 'direct:x'}]"
    assert errors_of(text) == ["routes[1].from: direct:x is consumed by routes[0] already"]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "the configuration is empty"),
        ("routes: [", "line 1, column 10: expected the node content"),
        ("- a\n- b", "top level: must be a mapping, got a list"),
        ("routes: []", "routes: must hold at least one route"),
        ("routes: {}", "routes: must be a list, got a mapping"),
        ("rutes: []", "top level.rutes: unknown field"),
        ("routes: [{id: a, from: 'direct:a'}]\nroutes: []", "duplicate key 'routes'"),
        ("routes: [{id: 'a b', from: 'direct:a'}]", "routes[0].id: must start with a letter"),
        ("routes: [{id: a, from: 5}]", "routes[0].from: must be a string, got a number"),
        ("routes: [{id: a, from: 'direct:a', steps: [{to: x, log: y}]}]", "got 2 keys"),
        ("routes: [{id: a, from: 'direct:a', steps: [to]}]", "one pattern name"),
        (
            "routes: !!python/object:os.system {}",
            "YAML tag '!!python/object:os.system' is not allowed",
        ),
    ],
)
def test_malformed_and_hostile_files_are_clear_errors(text: str, error: str) -> None:
    assert any(error in line for line in errors_of(text)), errors_of(text)


def test_yaml_bombs_deep_nesting_and_oversized_files_are_refused(tmp_path: Path) -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)},"
        f" *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)},"
        f" *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(7)
    )
    assert "once aliases are expanded" in errors_of(bomb)[0]
    assert "nested deeper than 64 levels" in errors_of("routes: " + "[" * 200 + "]" * 200)[0]
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (9 * 1024 * 1024))
    with pytest.raises(DefinitionError, match="too large"):
        load_routes(big)
    with pytest.raises(DefinitionError, match="not UTF-8 text"):
        parse_routes(b"routes: \xff")
    with pytest.raises(DefinitionError, match="file not found"):
        load_routes(tmp_path / "missing.yaml")


def test_a_schema_file_is_checked_and_hardened(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"type": "nonsense"}')
    (tmp_path / "broken.json").write_text('{"type": ')
    text = """
routes:
  - id: a
    from: direct:a
    steps:
      - validate: {json_schema: bad.json}
      - validate: {json_schema: broken.json}
      - validate: {schema: {minimum: "x"}}
"""
    errors = errors_of(text, tmp_path)
    assert errors[0].startswith(
        "routes[0].steps[0].validate.json_schema: schema 'bad.json' is not a valid JSON Schema"
    )
    assert errors[1].startswith("routes[0].steps[1].validate.json_schema: schema 'broken.json':")
    assert errors[2].startswith("routes[0].steps[2].validate.schema: schema 'inline' is not")


def test_error_handlers_and_settings_are_read() -> None:
    loaded = parse_routes(
        """
http: {listen: "127.0.0.1:9999"}
redis_url: redis://127.0.0.1:6379/1
error_handler: {dead_letter: "mock:dead", maximum_redeliveries: 3, redelivery_delay: 10}
routes:
  - id: a
    from: {uri: "direct:a", steps: [{to: "mock:x"}]}
    error_handler: {maximum_redeliveries: 2, redelivery_delay: 1s, backoff_multiplier: 3,
                    maximum_redelivery_delay: 5s}
"""
    )
    assert loaded.settings == {
        "http_listen": "127.0.0.1:9999",
        "redis_url": "redis://127.0.0.1:6379/1",
    }
    assert loaded.error_handler == ErrorHandler("mock:dead", 3, 0.01)
    assert loaded.routes[0].error_handler == ErrorHandler(None, 2, 1.0, 3.0, 5.0)
    assert loaded.routes[0].steps == from_("direct:a", id="a").to("mock:x").build().steps


def test_every_pattern_reads_the_same_in_yaml_and_python() -> None:
    yaml_routes = parse_routes(
        """
routes:
  - id: all
    from: direct:all
    steps:
      - filter: {expr: ok, steps: [{stop: {}}]}
      - split: {expr: items, parallel: true, aggregate: collect, steps: [{to: mock:a}]}
      - aggregate: {correlation: id, completion_size: 2, completion_timeout: 1s,
                    steps: [{to: mock:a}]}
      - multicast: {parallel: true, timeout: 500ms, strategy: merge,
                    steps: [{to: mock:a}, {to: mock:b}]}
      - recipient_list: headers.to
      - routing_slip: {expr: headers.slip, delimiter: ";"}
      - wire_tap: mock:tap
      - enrich: {uri: mock:e, target: extra}
      - throttle: {maximum: 5, period: 2s}
      - delay: 20
      - circuit_breaker: {failure_threshold: 3, open_duration: 10s,
                          steps: [{to: mock:a}], fallback: {steps: [{transform: {value: x}}]}}
      - load_balance: {strategy: weighted, weights: [2, 1], steps: [{to: mock:a}, {to: mock:b}]}
      - idempotent_consumer: {expr: id, ttl: 1m, steps: [{to: mock:a}]}
      - marshal: {format: csv, delimiter: ";", header: false}
      - remove_header: x
      - set_property: {name: p, template: "{{ body }}"}
      - log: {message: hi, level: DEBUG}
"""
    ).routes[0]
    built = (
        from_("direct:all", id="all")
        .filter("ok").stop().end()
        .split("items", parallel=True, aggregate="collect").to("mock:a").end()
        .aggregate("id", completion_size=2, completion_timeout="1s").to("mock:a").end()
        .multicast(parallel=True, timeout=500, strategy="merge").to("mock:a").to("mock:b").end()
        .recipient_list("headers.to")
        .routing_slip("headers.slip", ";")
        .wire_tap("mock:tap")
        .enrich("mock:e", target="extra")
        .throttle(5, "2s")
        .delay(20)
        .circuit_breaker(failure_threshold=3, open_duration="10s")
        .to("mock:a").fallback().transform("x").end()
        .load_balance("weighted", (2, 1)).to("mock:a").to("mock:b").end()
        .idempotent_consumer("id", ttl="1m").to("mock:a").end()
        .marshal("csv", delimiter=";", header=False)
        .remove_header("x")
        .set_property("p", template="{{ body }}")
        .log("hi", level="DEBUG")
        .build()
    )  # fmt: skip
    assert yaml_routes == built


def test_builder_mistakes_are_definition_errors() -> None:
    with pytest.raises(DefinitionError, match="blocks left open"):
        from_("direct:a", id="a").filter("x").to("mock:a").build()
    with pytest.raises(DefinitionError, match="end\\(\\) without an open block"):
        from_("direct:a", id="a").end()
    with pytest.raises(DefinitionError, match="when\\(\\) outside a choice"):
        from_("direct:a", id="a").when("x")
    with pytest.raises(DefinitionError, match="needs at least one when"):
        from_("direct:a", id="a").choice().otherwise().to("mock:a").end()
    with pytest.raises(DefinitionError, match="give a completion"):
        from_("direct:a", id="a").aggregate("id")
