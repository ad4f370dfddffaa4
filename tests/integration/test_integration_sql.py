"""The ``sql`` connector on a real PostgreSQL (``MESHGATE_DATABASE_URL``, a schema per test)
and on SQLite: statements, polling consumers, failures and a crash mid-route."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest
from integration_kit import run, run_routes, run_sql, wait_for_log

from meshgate.integration import Exchange, IntegrationContext, RouteStartError, from_
from meshgate.integration._errors import EndpointError, PayloadError
from meshgate.integration._model import ErrorHandler
from meshgate.integration._sql_state import SqlError
from meshgate.integration._yaml import parse_routes
from meshgate.integration.testing import mock_endpoint

ORDERS = "create table orders (id integer primary key, name text, total integer, status text)"


def orders(url: str, *rows: tuple[int, str, str]) -> None:
    run_sql(url, ORDERS)
    for order_id, name, status in rows:
        run_sql(
            url,
            "insert into orders (id, name, total, status) values (:i, :n, 1, :s)",
            i=order_id,
            n=name,
            s=status,
        )


def test_insert_batch_and_select(db: str) -> None:
    orders(db)
    insert = "sql:insert into orders (id, name, total, status) values (:id, :name, :total, 'new')"
    routes = [
        from_("direct:one", id="one").to(insert).build(),
        from_("direct:many", id="many").to(insert + "?batch=true").build(),
        from_("direct:all", id="all").to("sql:select id, name from orders order by id").build(),
        from_("direct:first", id="first")
        .to("sql:select name from orders where total > :total order by id?output_type=first")
        .build(),
        from_("direct:get", id="get")
        .to("sql:select name from orders where id = :id?output_type=one")
        .build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        # :total comes from the header when the body has none.
        one = await context.send("direct:one", {"id": 1, "name": "ada"}, {"total": 5})
        assert one.exception is None and one.message.headers["sql_update_count"] == 1
        many = await context.send(
            "direct:many",
            [{"id": 2, "name": "bob", "total": 7}, {"id": 3, "name": "cy"}],
            {"total": 9},
        )
        assert many.exception is None and many.message.headers["sql_update_count"] == 2
        reply = await context.request("direct:all")
        assert reply.body == [
            {"id": 1, "name": "ada"},
            {"id": 2, "name": "bob"},
            {"id": 3, "name": "cy"},
        ]
        assert reply.headers["sql_row_count"] == 3
        assert (await context.request("direct:first", {"total": 6})).body == {"name": "bob"}
        assert (await context.request("direct:first", {"total": 100})).body is None
        assert (await context.request("direct:get", {"id": 3})).body == {"name": "cy"}
        missing = await context.send("direct:get", {"id": 42})
        assert isinstance(missing.exception, SqlError)
        assert "output_type=one needs exactly one row, got 0" in str(missing.exception)

    run_routes(routes, scenario, settings={"database_url": db})
    assert run_sql(db, "select id, total from orders order by id") == [(1, 5), (2, 7), (3, 9)]


def test_rows_hold_json_ready_values(db: str) -> None:
    route = (
        from_("direct:q", id="q")
        .to(
            "sql:select cast(12.5 as numeric(10, 2)) as price, cast(3 as numeric) as count,"
            " current_date as today, :label as label?output_type=one"
        )
        .marshal("json")
        .build()
    )

    async def scenario(context: IntegrationContext) -> None:
        reply = await context.request("direct:q", {"label": "x"})
        row = json.loads(reply.body)
        assert (row["price"], row["count"], row["label"]) == (12.5, 3, "x")
        assert isinstance(row["count"], int)
        assert date.fromisoformat(row["today"])

    run_routes([route], scenario, settings={"database_url": db})


def test_hostile_values_stay_data(db: str) -> None:
    orders(db, (1, "ada", "new"))
    hostile = "x'); drop table orders; --"
    routes = [
        from_("direct:insert", id="insert")
        .to("sql:insert into orders (id, name, total, status) values (:id, :name, 1, :status)")
        .build(),
        from_("direct:find", id="find").to("sql:select id from orders where name = :name").build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        inserted = await context.send(
            "direct:insert", {"id": 2, "name": hostile, "status": {"nested": ["a", 1]}}
        )
        assert inserted.exception is None
        assert (await context.request("direct:find", {"name": "' or '1'='1"})).body == []
        assert (await context.request("direct:find", {"name": hostile})).body == [{"id": 2}]

    run_routes(routes, scenario, settings={"database_url": db})
    # A mapping value is bound as JSON text.
    assert run_sql(db, "select name, status from orders where id = 2") == [
        (hostile, '{"nested": ["a", 1]}')
    ]


def test_bad_statements_and_parameters_fail_the_exchange(db: str) -> None:
    orders(db)
    routes = [
        from_("direct:missing", id="missing")
        .to("sql:insert into orders (id, name) values (:id, :name)")
        .build(),
        from_("direct:malformed", id="malformed").to("sql:selec id frm orders").build(),
        from_("direct:batch", id="batch")
        .to("sql:insert into orders (id) values (:id)?batch=true")
        .build(),
        from_("direct:dup", id="dup").to("sql:insert into orders (id) values (:id)").build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        missing = await context.send("direct:missing", {"id": 1})
        assert isinstance(missing.exception, PayloadError)
        assert "no value for the parameter :name" in str(missing.exception)
        not_mapping = await context.send("direct:missing", b'{"id": 1}')
        assert "the body is bytes, not a mapping (unmarshal it first)" in str(not_mapping.exception)
        malformed = await context.send("direct:malformed", None)
        assert isinstance(malformed.exception, SqlError)
        assert malformed.exception.retryable is False
        assert "syntax error" in str(malformed.exception)
        batch = await context.send("direct:batch", {"id": 1})
        assert "batch=true needs a list of mappings as the body, got dict" in str(batch.exception)
        assert (await context.send("direct:dup", {"id": 7})).exception is None
        duplicate = await context.send("direct:dup", {"id": 7})
        assert isinstance(duplicate.exception, SqlError)

    run_routes(routes, scenario, settings={"database_url": db})
    assert run_sql(db, "select id from orders") == [(7,)]


def test_a_batch_is_one_transaction(db: str) -> None:
    orders(db, (3, "cy", "new"))
    route = (
        from_("direct:many", id="many")
        .to("sql:insert into orders (id, name) values (:id, :name)?batch=true")
        .build()
    )

    async def scenario(context: IntegrationContext) -> None:
        failed = await context.send(
            "direct:many", [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
        )
        assert isinstance(failed.exception, SqlError)

    run_routes([route], scenario, settings={"database_url": db})
    assert run_sql(db, "select id from orders order by id") == [(3,)]


def test_the_consumer_takes_each_row_once_and_marks_it(db: str) -> None:
    orders(db, (1, "ada", "new"), (2, "bob", "new"), (3, "cy", "old"))
    uri = (
        "sql:select id, name from orders where status = 'new' order by id"
        "?delay=20ms&on_consume=update orders set status = 'done' where id = :id"
    )
    route = from_(uri, id="poll").to("mock:rows").build()

    async def scenario(context: IntegrationContext) -> None:
        rows = await mock_endpoint(context, "mock:rows").wait_for(2)
        assert [r.message.body for r in rows] == [
            {"id": 1, "name": "ada"},
            {"id": 2, "name": "bob"},
        ]
        assert rows[0].message.headers["sql_row_count"] == 2
        run_sql(db, "insert into orders (id, name, status) values (4, 'dee', 'new')")
        rows = await mock_endpoint(context, "mock:rows").wait_for(3)
        assert rows[2].message.body == {"id": 4, "name": "dee"}
        await asyncio.sleep(0.1)  # several more polls: none takes a row again
        assert len(mock_endpoint(context, "mock:rows").received) == 3

    run_routes([route], scenario, settings={"database_url": db})
    assert run_sql(db, "select id, status from orders order by id") == [
        (1, "done"),
        (2, "done"),
        (3, "old"),
        (4, "done"),
    ]


def test_a_failed_row_is_taken_again(db: str) -> None:
    orders(db, (1, "ada", "new"), (2, "bob", "new"))
    attempts: list[int] = []

    def flaky(exchange: Exchange) -> None:
        attempts.append(exchange.message.body["id"])
        if exchange.message.body["id"] == 1 and attempts.count(1) == 1:
            raise RuntimeError("not now")

    uri = (
        "sql:select id from orders where status = 'new' order by id"
        "?delay=20ms&on_consume=update orders set status = 'done' where id = :id"
    )
    route = from_(uri, id="poll").process(flaky).to("mock:done").build()

    async def scenario(context: IntegrationContext) -> None:
        done = await mock_endpoint(context, "mock:done").wait_for(2)
        assert sorted(e.message.body["id"] for e in done) == [1, 2]

    run_routes([route], scenario, settings={"database_url": db})
    assert attempts.count(1) == 2 and attempts.count(2) == 1
    assert run_sql(db, "select status from orders order by id") == [("done",), ("done",)]


def test_on_consume_failed_marks_a_row_the_dead_letter_did_not_take(db: str) -> None:
    orders(db, (1, "ada", "new"), (2, "bob", "new"))

    def refuse_ada(exchange: Exchange) -> None:
        if exchange.message.body["name"] == "ada":
            raise RuntimeError("refused")

    uri = (
        "sql:select id, name from orders where status = 'new'?delay=20ms"
        "&on_consume=update orders set status = 'done' where id = :id"
        "&on_consume_failed=update orders set status = 'failed' where id = :id"
    )
    route = from_(uri, id="poll").process(refuse_ada).to("mock:done").build()

    async def scenario(context: IntegrationContext) -> None:
        await mock_endpoint(context, "mock:done").wait_for(1)
        for _ in range(100):
            if run_sql(db, "select status from orders where id = 1") == [("failed",)]:
                break
            await asyncio.sleep(0.02)

    run_routes([route], scenario, settings={"database_url": db})
    assert run_sql(db, "select id, status from orders order by id") == [(1, "failed"), (2, "done")]


def test_a_dead_lettered_row_counts_as_consumed(db: str) -> None:
    orders(db, (1, "ada", "new"))

    def refuse(exchange: Exchange) -> None:
        raise RuntimeError("refused")

    uri = (
        "sql:select id from orders where status = 'new'?delay=20ms"
        "&on_consume=update orders set status = 'done' where id = :id"
    )
    route = from_(uri, id="poll").process(refuse).build()

    async def scenario(context: IntegrationContext) -> None:
        dead = await mock_endpoint(context, "mock:dead").wait_for(1)
        assert dead[0].message.body == {"id": 1}
        for _ in range(100):
            if run_sql(db, "select status from orders") == [("done",)]:
                break
            await asyncio.sleep(0.02)
        assert len(mock_endpoint(context, "mock:dead").received) == 1

    run_routes(
        [route],
        scenario,
        settings={"database_url": db},
        error_handler=ErrorHandler(dead_letter="mock:dead"),
    )
    assert run_sql(db, "select status from orders") == [("done",)]


def test_without_the_iterator_a_poll_is_one_exchange(db: str) -> None:
    orders(db, (1, "ada", "new"), (2, "bob", "new"), (3, "cy", "new"))
    uri = (
        "sql:select id from orders where status = 'new' order by id?delay=20ms"
        "&use_iterator=false&max_messages_per_poll=2"
        "&on_consume=update orders set status = 'done' where id = :id"
    )
    route = from_(uri, id="poll").to("mock:polls").build()

    async def scenario(context: IntegrationContext) -> None:
        polls = await mock_endpoint(context, "mock:polls").wait_for(2)
        assert [p.message.body for p in polls] == [[{"id": 1}, {"id": 2}], [{"id": 3}]]

    run_routes([route], scenario, settings={"database_url": db})
    assert run_sql(db, "select status from orders") == [("done",)] * 3


def test_named_statements_from_yaml(db: str) -> None:
    orders(db, (1, "what?", "new"))
    routes = parse_routes(
        f"""
database_url: "{db}"
sql_statements:
  questions: "select id, name from orders where name like '%?' order by id"
  insert_order: >-
    insert into orders (id, name, total, status)
    values (:id, :name, :total, 'new')
routes:
  - id: insert
    from: direct:insert
    steps:
      - to: sql:named:insert_order
      - to: sql:named:questions
"""
    )
    context = IntegrationContext(settings=routes.settings)
    context.add_routes(routes.routes)

    async def main() -> None:
        await context.start()
        try:
            reply = await context.request("direct:insert", {"id": 2, "name": "why?", "total": 3})
            assert reply.body == [{"id": 1, "name": "what?"}, {"id": 2, "name": "why?"}]
        finally:
            await context.stop()

    run(main)


def test_endpoint_and_yaml_errors_are_clear() -> None:
    context = IntegrationContext()
    with pytest.raises(EndpointError, match="write sql:STATEMENT"):
        context.endpoint("sql:")
    with pytest.raises(EndpointError, match="unknown option 'max_rows'"):
        context.endpoint("sql:select 1?max_rows=3")
    with pytest.raises(EndpointError, match="option 'output_type' must be one of rows, first"):
        context.endpoint("sql:select 1?output_type=all")
    with pytest.raises(EndpointError, match="option 'delay' must be at least 10ms"):
        context.endpoint("sql:select 1?delay=1ms")
    with pytest.raises(EndpointError, match="option 'delay' applies to a 'from' only"):
        context.endpoint("sql:select 2?delay=1s").create_producer()
    with pytest.raises(EndpointError, match="option 'batch' applies to a 'to' only"):
        context.endpoint("sql:select 3?batch=true").create_consumer(lambda e: asyncio.sleep(0))
    with pytest.raises(EndpointError, match="write sql:named:NAME"):
        context.endpoint("sql:named:")
    consumer = context.endpoint("sql:select * from t where id = :id").create_consumer(
        lambda e: asyncio.sleep(0)
    )
    with pytest.raises(EndpointError, match=r"a 'from' query takes no parameters \(:id\)"):
        asyncio.run(consumer.start())
    errors = _yaml_errors(
        """
database_url: 5
sql_statements: [select 1]
routes:
  - id: a
    from: direct:a
    steps:
      - idempotent_consumer: {expr: id, repository: "mysqlx:x", steps: [{to: "mock:a"}]}
"""
    )
    assert "database_url: must be a string, got a number (put the value in quotes)" in errors
    assert "sql_statements: must be a mapping, got a list" in errors
    assert any("repository: must be memory, redis" in e for e in errors), errors


def _yaml_errors(text: str) -> list[str]:
    from meshgate.integration._errors import DefinitionError

    with pytest.raises(DefinitionError) as caught:
        parse_routes(text)
    return caught.value.errors


def test_a_route_without_a_database_or_statement_fails_to_start(tmp_path: Path) -> None:
    async def main() -> None:
        for settings, uri, message in [
            ({}, "sql:select 1", "no database: set database_url"),
            (
                {"database_url": f"sqlite:///{tmp_path / 'x.db'}"},
                "sql:named:nope",
                "no statement named 'nope' in sql_statements (known: none)",
            ),
            (
                {"database_url": "postgresql://postgres@127.0.0.1:1/test"},
                "sql:select 1",
                "sql: cannot connect to postgresql://postgres@127.0.0.1:1/test",
            ),
            (
                {"database_url": "sqlite://"},
                "sql:select 1",
                "sql: an in-memory SQLite database is one per connection",
            ),
            (
                {"database_url": "mysql://nobody@127.0.0.1:1/x"},
                "sql:select 1",
                "sql: cannot use mysql://nobody@127.0.0.1:1/x: No module named",
            ),
            (
                {"database_url": f"sqlite:///{tmp_path / 'missing' / 'x.db'}"},
                "sql:select 1",
                "sql: cannot connect to sqlite:///",
            ),
        ]:
            context = IntegrationContext(settings=settings)
            context.add_route(from_("direct:a", id="a").to(uri).build())
            with pytest.raises(RouteStartError, match=re.escape(message)):
                await context.start()
            await context.stop()

    run(main)


def test_a_runtime_killed_mid_route_takes_the_row_again(db: str, tmp_path: Path) -> None:
    orders(db, (1, "precious", "new"))
    log_path = tmp_path / "runtime.log"
    routes = tmp_path / "routes.yaml"
    uri = (
        "sql:select id, name from orders where status = 'new'"
        "?delay=50ms&on_consume=update orders set status = 'done' where id = :id"
    )
    routes.write_text(
        f"""
database_url: "{db}"
routes:
  - id: slow
    from: "{uri}"
    steps:
      - log: "got {{{{ body.name }}}}"
      - delay: 2s
      - log: "done {{{{ body.name }}}}"
"""
    )
    first = _runtime(routes, log_path)
    try:
        wait_for_log(log_path, "got precious", first)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    assert "done precious" not in log_path.read_text()
    assert run_sql(db, "select status from orders") == [("new",)]
    routes.write_text(routes.read_text().replace("delay: 2s", "delay: 10ms"))
    second = _runtime(routes, log_path)
    try:
        wait_for_log(log_path, "done precious", second)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(15) == 0
    assert log_path.read_text().count("done precious") == 1
    assert run_sql(db, "select status from orders") == [("done",)]


def _runtime(routes: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "meshgate", "integration", "run", str(routes)],
            cwd=routes.parent,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def test_a_poll_failing_with_any_exception_is_logged_and_polling_goes_on(
    db: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The first on_consume gets a header it cannot bind (a TypeError, no IntegrationError):
    it is logged with the endpoint, the row stays, and the next poll takes it again."""
    orders(db, (1, "ada", "new"))
    attempts: list[int] = []

    def bad_header_once(exchange: Exchange) -> None:
        attempts.append(exchange.message.body["id"])
        # JSON has no tuple keys: binding it as :status raises TypeError.
        exchange.message.headers["status"] = {(1, 2): "x"} if len(attempts) == 1 else "done"

    uri = (
        "sql:select id from orders where status = 'new' order by id"
        "?delay=20ms&on_consume=update orders set status = :status where id = :id"
    )
    route = from_(uri, id="poll").process(bad_header_once).to("mock:done").build()

    async def scenario(context: IntegrationContext) -> None:
        await mock_endpoint(context, "mock:done").wait_for(2)
        deadline = asyncio.get_running_loop().time() + 3
        while run_sql(db, "select status from orders") != [("done",)]:
            assert asyncio.get_running_loop().time() < deadline, "the row was never marked"
            await asyncio.sleep(0.02)

    run_routes([route], scenario, settings={"database_url": db})
    assert attempts == [1, 1]
    logged = [r.getMessage() for r in caplog.records if r.name == "meshgate.integration.sql"]
    assert any("option 'on_consume'" in m and "TypeError" in m for m in logged), logged
