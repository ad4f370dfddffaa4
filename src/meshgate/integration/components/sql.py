"""``sql``: statements on PostgreSQL or SQLite through SQLAlchemy, as Camel's sql component.

``to: sql:insert into orders (id, total) values (:id, :total)`` runs the statement with
each ``:name`` bound from the body (a mapping) or else from the header of that name;
values are always bound parameters, never spliced into the text. With ``batch=true`` the
body is a list of mappings and the statement runs once for each, in one transaction. A
query sets the body to its rows (mappings) and the header ``sql_row_count``; any other
statement leaves the body and sets ``sql_update_count``.

``from: sql:select * from orders where status = 'new'?on_consume=update orders set
status = 'done' where id = :id`` polls every ``delay``; each row is one exchange. Once
the row's route completed, ``on_consume`` runs with the row's columns as parameters; a
route that failed runs ``on_consume_failed`` if given, else leaves the row to be taken
again at the next poll, as does a runtime that dies mid-route: at least once.

The statement is the URI's path, up to its first ``?``; option values are URL-decoded
(``%26`` for ``&``, ``%2B`` for ``+``). A statement that needs ``?`` or is long is named
instead: ``sql:named:NAME`` takes it from the ``sql_statements`` setting. The database is
the ``database_url`` setting (``postgresql://...`` or ``sqlite:///file.db``). Statements
run in a thread pool beside the event loop, each in its own transaction (``_sql_state``
says why not SQLAlchemy asyncio). A database's pool is shared by the routes that use it
and disposed once the last of them stopped (after a reload that changed ``database_url``).

A poll that fails (the database unreachable, a statement that raises) is logged with the
endpoint and tried again after ``delay``: the consumer keeps polling.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from meshgate.integration._component import Component, Consumer, Endpoint, Processor, Producer
from meshgate.integration._errors import EndpointError, IntegrationError, PayloadError
from meshgate.integration._message import Exchange, ExchangePattern, Message
from meshgate.integration._sql_state import SqlDatabase, SqlError
from meshgate.integration._uri import EndpointUri, Options
from meshgate.integration.components.core import PollingConsumer

if TYPE_CHECKING:
    from meshgate.integration._context import IntegrationContext

__all__ = ["SqlComponent"]

log = logging.getLogger("meshgate.integration.sql")
_CONSUMER_OPTIONS = (
    "delay",
    "on_consume",
    "on_consume_failed",
    "max_messages_per_poll",
    "use_iterator",
)


class SqlComponent(Component):
    def __init__(self) -> None:
        self._databases: dict[str, SqlDatabase] = {}
        self._users: dict[str, int] = {}
        self._lock = asyncio.Lock()

    def create_endpoint(self, uri: EndpointUri, context: IntegrationContext) -> Endpoint:
        return _SqlEndpoint(uri, context, self)

    async def database(self, url: str) -> SqlDatabase:
        """The database of ``url``, shared by the endpoints, checked on first use; each
        call is matched by a ``release(url)`` when its user stops."""
        async with self._lock:
            database = self._databases.get(url)
            if database is None:
                database = SqlDatabase(url, "sql")
                try:
                    await database.check()
                except IntegrationError:
                    await database.close()
                    raise
                self._databases[url] = database
            self._users[url] = self._users.get(url, 0) + 1
            return database

    async def release(self, url: str) -> None:
        """One user of ``url`` stopped; the pool is disposed with its last user."""
        async with self._lock:
            users = self._users.get(url, 0) - 1
            if users > 0:
                self._users[url] = users
                return
            self._users.pop(url, None)
            database = self._databases.pop(url, None)
        if database is not None:
            await database.close()

    async def stop(self) -> None:
        databases, self._databases = self._databases, {}
        self._users.clear()
        for database in databases.values():
            await database.close()


class _Statement:
    """A statement's text and the names of its ``:name`` parameters."""

    def __init__(self, sql: str, where: str) -> None:
        from sqlalchemy import text
        from sqlalchemy.exc import ArgumentError

        if not sql.strip():
            raise EndpointError(f"{where}: the statement is empty")
        try:
            self.clause = text(sql)
            self.names = list(self.clause.compile().params)
        except ArgumentError as exc:
            raise EndpointError(f"{where}: {exc}") from None
        self.sql = sql
        self.where = where

    def bind(self, *sources: Mapping[str, Any]) -> dict[str, Any]:
        """Each parameter from the first source that has it; a mapping or list as JSON."""
        values: dict[str, Any] = {}
        for name in self.names:
            for source in sources:
                if name in source:
                    values[name] = _bindable(source[name])
                    break
            else:
                raise PayloadError(
                    f"{self.where}: no value for the parameter :{name}"
                    " (looked in the body mapping, then the headers)"
                )
        return values


def _bindable(value: Any) -> Any:
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, default=str)
    return value


class _SqlEndpoint(Endpoint):
    def __init__(self, uri: EndpointUri, context: IntegrationContext, component: SqlComponent):
        super().__init__(uri, context)
        self.component = component
        if not uri.path.strip():
            raise EndpointError(
                f"{uri.text}: write sql:STATEMENT, e.g. sql:select * from orders,"
                " or sql:named:NAME for a statement of the sql_statements setting"
            )
        self.name: str | None = None
        if uri.path.startswith("named:"):
            self.name = uri.path.removeprefix("named:")
            if not self.name:
                raise EndpointError(f"{uri.text}: write sql:named:NAME")
        else:
            _Statement(uri.path, uri.text)
        options = Options(uri)
        self.output_type = options.choice("output_type", ("rows", "first", "one"), "rows")
        self.batch = options.boolean("batch", False)
        self.delay = options.duration("delay", 0.5)
        self.on_consume = options.text("on_consume")
        self.on_consume_failed = options.text("on_consume_failed")
        self.max_messages_per_poll = options.integer("max_messages_per_poll", 0, 0, 1_000_000)
        self.use_iterator = options.boolean("use_iterator", True)
        options.finish()
        self.given = {name for name, _ in uri.options}
        if self.delay < 0.01:
            raise EndpointError(f"{uri.text}: option 'delay' must be at least 10ms")
        for option in ("on_consume", "on_consume_failed"):
            statement = getattr(self, option)
            if statement is not None:
                _Statement(statement, f"{uri.text}: option {option!r}")

    def database_url(self) -> str:
        url = self.context.settings.get("database_url")
        if not url:
            raise EndpointError(
                f"{self.uri.text}: no database: set database_url"
                " (e.g. postgresql://user@host/db or sqlite:///orders.db)"
            )
        return str(url)

    def statement(self) -> _Statement:
        """The endpoint's statement; a named one is looked up when the route starts."""
        if self.name is None:
            return _Statement(self.uri.path, self.uri.text)
        statements = self.context.settings.get("sql_statements") or {}
        sql = statements.get(self.name) if isinstance(statements, Mapping) else None
        if not isinstance(sql, str):
            known = ", ".join(sorted(statements)) if isinstance(statements, Mapping) else ""
            raise EndpointError(
                f"{self.uri.text}: no statement named {self.name!r}"
                f" in sql_statements (known: {known or 'none'})"
            )
        return _Statement(sql, f"{self.uri.text} ({self.name})")

    def create_consumer(self, processor: Processor) -> Consumer:
        for option in ("batch", "output_type"):
            if option in self.given:
                raise EndpointError(f"{self.uri.text}: option {option!r} applies to a 'to' only")
        return _SqlConsumer(self, processor)

    def create_producer(self) -> Producer:
        for option in _CONSUMER_OPTIONS:
            if option in self.given:
                raise EndpointError(f"{self.uri.text}: option {option!r} applies to a 'from' only")
        return _SqlProducer(self)


def _rows(result: Any, limit: int = 0) -> list[dict[str, Any]]:
    rows = result.fetchmany(limit) if limit else result.fetchall()
    return [{str(k): _plain(v) for k, v in row._mapping.items()} for row in rows]


def _plain(value: Any) -> Any:
    """A column value as JSON has it, so that a row can be marshalled or stored as it is:
    numerics as int or float, dates and times in ISO 8601, UUIDs as text."""
    if isinstance(value, Decimal):
        return int(value) if value.is_finite() and value == int(value) else float(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


class _SqlProducer(Producer):
    endpoint: _SqlEndpoint

    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__(endpoint)
        self._database: SqlDatabase | None = None
        self._url = ""
        self._statement: _Statement | None = None

    async def start(self) -> None:
        endpoint = self.endpoint
        self._statement = endpoint.statement()
        if self._database is None:
            self._url = endpoint.database_url()
            self._database = await endpoint.component.database(self._url)

    async def process(self, exchange: Exchange) -> None:
        database, statement = self._database, self._statement
        if database is None or statement is None:
            raise IntegrationError(f"{self.endpoint.uri.text}: the producer is not started")
        message = exchange.message
        body = message.body
        if self.endpoint.batch:
            if not isinstance(body, list) or not all(isinstance(i, Mapping) for i in body):
                raise PayloadError(
                    f"{self.endpoint.uri.text}: batch=true needs a list of mappings as the body,"
                    f" got {type(body).__name__}"
                )
            params: Any = [statement.bind(item, message.headers) for item in body]
            if not params:
                message.headers["sql_update_count"] = 0
                return
        elif isinstance(body, Mapping) or body is None:
            params = statement.bind(body or {}, message.headers)
        else:
            try:
                params = statement.bind(message.headers)
            except PayloadError as exc:
                hint = f"; the body is {type(body).__name__}, not a mapping (unmarshal it first)"
                raise PayloadError(f"{exc}{hint}") from None

        def work(connection: Any) -> tuple[list[dict[str, Any]] | None, int]:
            if isinstance(params, list):
                total = 0
                for one in params:
                    total += max(0, connection.execute(statement.clause, one).rowcount)
                return None, total
            result = connection.execute(statement.clause, params)
            if result.returns_rows:
                return _rows(result), 0
            return None, max(0, result.rowcount)

        rows, count = await database.run(work)
        if rows is None:
            message.headers["sql_update_count"] = count
            return
        message.headers["sql_row_count"] = len(rows)
        output = self.endpoint.output_type
        if output == "rows":
            message.body = rows
        elif output == "first":
            message.body = rows[0] if rows else None
        elif len(rows) != 1:
            raise SqlError(
                f"{self.endpoint.uri.text}: output_type=one needs exactly one row, got {len(rows)}",
                retryable=False,
            )
        else:
            message.body = rows[0]

    async def stop(self) -> None:
        database, self._database = self._database, None
        if database is not None:
            await self.endpoint.component.release(self._url)


class _SqlConsumer(PollingConsumer):
    endpoint: _SqlEndpoint

    def __init__(self, endpoint: Endpoint, processor: Processor) -> None:
        super().__init__(endpoint, processor)
        self._database: SqlDatabase | None = None
        self._url = ""
        self._idle = False

    async def start(self) -> None:
        endpoint = self.endpoint
        self._query = endpoint.statement()
        if self._query.names:
            names = ", ".join(f":{name}" for name in self._query.names)
            raise EndpointError(
                f"{endpoint.uri.text}: a 'from' query takes no parameters ({names})"
            )
        self._on_consume = self._optional(endpoint.on_consume, "on_consume")
        self._on_failed = self._optional(endpoint.on_consume_failed, "on_consume_failed")
        url = endpoint.database_url()
        self._database = await endpoint.component.database(url)
        self._url = url
        self._stopping = False
        self._task = asyncio.create_task(self._poll(), name=f"sql consumer {endpoint.uri.text}")

    def _optional(self, sql: str | None, option: str) -> _Statement | None:
        where = f"{self.endpoint.uri.text}: option {option!r}"
        return None if sql is None else _Statement(sql, where)

    async def _poll(self) -> None:
        endpoint = self.endpoint
        while not self._stopping:
            try:
                await self._poll_once()
            except Exception:
                # Whatever failed, the consumer goes on polling (after ``delay``).
                log.exception("%s: polling failed; polling again", endpoint.uri.text)
            if not self._stopping:
                await self._idly(asyncio.sleep(endpoint.delay))

    async def _poll_once(self) -> None:
        endpoint = self.endpoint
        rows = await self._idly(self._select())
        if not rows:
            return
        if endpoint.use_iterator:
            for row in rows:
                if self._stopping:
                    return
                await self._deliver(row, [row], len(rows))
        else:
            await self._deliver(rows, rows, len(rows))

    async def _select(self) -> list[dict[str, Any]]:
        assert self._database is not None
        query, limit = self._query, self.endpoint.max_messages_per_poll

        def work(connection: Any) -> list[dict[str, Any]]:
            result = connection.execute(query.clause, query.bind())
            if not result.returns_rows:
                raise SqlError(f"{query.where}: a 'from' needs a query (select)", retryable=False)
            return _rows(result, limit)

        return await self._database.run(work)

    async def _idly(self, awaitable: Any) -> Any:
        """Awaits while stop may cancel: no row is in a route meanwhile."""
        self._idle = True
        try:
            return await awaitable
        except Exception as exc:
            if self._stopping:
                raise asyncio.CancelledError from None
            log.warning("%s: polling failed (%s); retrying", self.endpoint.uri.text, exc)
            await asyncio.sleep(self.endpoint.delay)
            return None
        finally:
            self._idle = False

    async def _deliver(self, body: Any, rows: list[dict[str, Any]], count: int) -> None:
        endpoint = self.endpoint
        exchange = Exchange(Message(body, {"sql_row_count": count}), ExchangePattern.IN_ONLY)
        try:
            await self.processor(exchange)
        except Exception as exc:
            exchange.exception = exc
        statement = self._on_consume if exchange.exception is None else self._on_failed
        if exchange.exception is not None:
            log.warning(
                "%s: a row failed (%s); %s",
                endpoint.uri.text,
                exchange.exception,
                "on_consume_failed runs" if statement else "taken again at the next poll",
            )
        if statement is None:
            return
        assert self._database is not None
        try:
            params = [statement.bind(row, exchange.message.headers) for row in rows]
            await self._database.run(
                lambda connection: [connection.execute(statement.clause, p) for p in params]
            )
        except Exception as exc:
            # The row stays as it was: the next poll takes it again.
            cause = (
                str(exc) if isinstance(exc, IntegrationError) else f"{type(exc).__name__}: {exc}"
            )
            log.warning("%s: %s", statement.where, cause)

    async def release(self) -> None:
        database, self._database = self._database, None
        if database is not None:
            await self.endpoint.component.release(self._url)
