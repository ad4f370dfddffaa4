"""SQL databases for the integration runtime: the ``sql`` connector's connections and the
aggregation and idempotency state kept in tables, on PostgreSQL or SQLite.

SQLAlchemy's synchronous engine runs in a small thread pool rather than SQLAlchemy
asyncio: one code path for both databases with the drivers meshgate already has
(psycopg, the standard library's sqlite3), where asyncio would add greenlet and aiosqlite
(which itself runs SQLite in a thread). The event loop only awaits the pool. One engine
and pool serve each database URL in the process, however many endpoints and
repositories use it.

The state lives in three tables, created when missing:

- ``meshgate_aggregation_groups(prefix, key, updated)``: one row per open group;
- ``meshgate_aggregation_items(id, prefix, key, item)``: the group's items as JSON, in
  ``id`` order;
- ``meshgate_idempotent(prefix, key, created)``: the keys seen.

Adding to a group first updates (or inserts) its group row, which locks it until the
transaction commits: two runtimes adding to one group concurrently are serialised, and
each sees the other's item. Taking a group deletes its row in the same way, so exactly
one of two concurrent takes gets the items. SQLite transactions begin IMMEDIATE (one
writer at a time, the others wait up to ``busy_timeout``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from meshgate.integration._errors import IntegrationError

__all__ = [
    "SqlAggregationRepository",
    "SqlDatabase",
    "SqlError",
    "SqlIdempotentRepository",
    "database_url",
    "is_database_url",
]

T = TypeVar("T")

POOL_SIZE = 8
CONNECT_TIMEOUT = 5
SQLITE_BUSY_TIMEOUT = 15.0
MAX_KEY = 255
_SCHEMES = ("postgresql", "postgres", "sqlite", "mysql", "mariadb")


class SqlError(IntegrationError):
    """A statement the database refused or could not run; the message is the database's."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


def is_database_url(text: str) -> bool:
    """Whether ``text`` looks like a SQLAlchemy database URL (``postgresql://``, ``sqlite:///``)."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.split("+", 1)[0] in _SCHEMES


def database_url(url: str) -> str:
    """The SQLAlchemy URL of ``url``: ``postgresql://`` means psycopg (v3)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise IntegrationError(
            f"{_shown(url)!r} is not a database URL"
            " (e.g. postgresql://user@host/db or sqlite:///path/file.db)"
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def _shown(url: str) -> str:
    """``url`` without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        credentials, _, host = rest.partition("@")
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}@{host}"
    return url


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _Engine:
    """One engine and the threads that run its statements, shared by every user of a
    database URL in the process: a route with ten aggregators still opens one pool."""

    def __init__(self, url: str, shown: str, what: str) -> None:
        from sqlalchemy import create_engine, event

        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT}
        else:
            # As many connections as threads: a thread never waits for a connection.
            kwargs.update(pool_size=POOL_SIZE, max_overflow=0)
            if url.startswith("postgresql"):
                kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
        try:
            self.engine = create_engine(url, **kwargs)
        except Exception as exc:
            raise IntegrationError(f"{what}: cannot use {shown}: {exc}") from None
        if self.engine.dialect.name == "sqlite":
            if self.engine.url.database in (None, "", ":memory:"):
                raise IntegrationError(
                    f"{what}: an in-memory SQLite database is one per connection;"
                    " give a file, e.g. sqlite:///state.db"
                )
            event.listen(self.engine, "connect", _sqlite_connect)
            event.listen(self.engine, "begin", _sqlite_begin)
        self.executor = ThreadPoolExecutor(POOL_SIZE, thread_name_prefix="meshgate-sql")
        self.users = 0


_ENGINES: dict[str, _Engine] = {}
_ENGINES_LOCK = threading.Lock()


class SqlDatabase:
    """A user of a database: runs transactions in the URL's shared engine, opened on first
    use and released by ``close`` (the engine is disposed with its last user)."""

    def __init__(self, url: str, what: str) -> None:
        self.url = database_url(url)
        self.shown = _shown(url)
        self.what = what
        self._shared: _Engine | None = None

    def _open(self) -> _Engine:
        if self._shared is None:
            with _ENGINES_LOCK:
                shared = _ENGINES.get(self.url)
                if shared is None:
                    shared = _ENGINES[self.url] = _Engine(self.url, self.shown, self.what)
                shared.users += 1
            self._shared = shared
        return self._shared

    async def run(self, work: Callable[[Any], T]) -> T:
        """``work(connection)`` in one transaction, in the pool; database errors as SqlError."""
        from sqlalchemy.exc import DBAPIError, SQLAlchemyError

        shared = self._open()
        engine = shared.engine

        def transaction() -> T:
            with engine.begin() as connection:
                return work(connection)

        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(shared.executor, transaction)
        except DBAPIError as exc:
            raise SqlError(f"{self.what}: {_first_line(exc)}", not _lasting(exc)) from exc
        except SQLAlchemyError as exc:
            raise SqlError(f"{self.what}: {_first_line(exc)}") from exc

    async def check(self) -> None:
        """Connects once: an unreachable database is an error at start, not at first use."""
        from sqlalchemy import text

        try:
            await self.run(lambda connection: connection.execute(text("SELECT 1")))
        except SqlError as exc:
            raise IntegrationError(
                f"{self.what}: cannot connect to {self.shown}: {_first_line(exc.__cause__ or exc)}"
            ) from None

    async def close(self) -> None:
        shared, self._shared = self._shared, None
        if shared is None:
            return
        with _ENGINES_LOCK:
            shared.users -= 1
            last = shared.users == 0
            if last:
                del _ENGINES[self.url]
        if last:
            await asyncio.get_running_loop().run_in_executor(shared.executor, shared.engine.dispose)
            shared.executor.shutdown(wait=False)


def _lasting(exc: Any) -> bool:
    """Whether the same statement would fail again: bad SQL, bad data, a broken constraint
    (SQLite reports bad SQL as an OperationalError named SQLITE_ERROR)."""
    from sqlalchemy.exc import DataError, IntegrityError, OperationalError, ProgrammingError

    if isinstance(exc, ProgrammingError | DataError | IntegrityError):
        return True
    name = getattr(exc.orig, "sqlite_errorname", None)
    return isinstance(exc, OperationalError) and name == "SQLITE_ERROR"


def _sqlite_connect(dbapi_connection: Any, record: Any) -> None:
    # Transactions are begun by _sqlite_begin, not by the driver (SQLAlchemy's recipe).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT * 1000)}")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    # IMMEDIATE: take the write lock now, so that a read-then-write transaction never
    # fails on upgrading its lock while another writer holds it.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _tables() -> Any:
    from sqlalchemy import BigInteger, Column, Float, Integer, MetaData, String, Table, Text

    metadata = MetaData()
    Table(
        "meshgate_aggregation_groups",
        metadata,
        Column("prefix", String(MAX_KEY), primary_key=True),
        Column("key", String(MAX_KEY), primary_key=True),
        Column("updated", Float, nullable=False),
    )
    Table(
        "meshgate_aggregation_items",
        metadata,
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
        Column("prefix", String(MAX_KEY), nullable=False, index=True),
        Column("key", String(MAX_KEY), nullable=False),
        Column("item", Text, nullable=False),
    )
    Table(
        "meshgate_idempotent",
        metadata,
        Column("prefix", String(MAX_KEY), primary_key=True),
        Column("key", String(MAX_KEY), primary_key=True),
        Column("created", Float, nullable=False),
    )
    return metadata


_METADATA: Any = None


def _metadata() -> Any:
    global _METADATA
    if _METADATA is None:
        _METADATA = _tables()
    return _METADATA


def _bounded(value: str) -> str:
    """Keys fit the column: a longer one is kept as its start and a hash of the whole."""
    if len(value) <= MAX_KEY:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{value[: MAX_KEY - 66]}#{digest}"


class _SqlState:
    """The tables on one database, created (if missing) before the first statement."""

    def __init__(self, url: str, prefix: str, what: str) -> None:
        self.database = SqlDatabase(url, what)
        self.prefix = _bounded(prefix)
        self._ready = False
        self._lock = asyncio.Lock()

    async def _run(self, work: Callable[[Any], T]) -> T:
        if not self._ready:
            async with self._lock:
                if not self._ready:
                    await self._create_tables()
                    self._ready = True
        return await self.database.run(work)

    async def _create_tables(self) -> None:
        metadata = _metadata()
        try:
            await self.database.run(lambda connection: metadata.create_all(connection))
        except SqlError:
            # Another runtime created them meanwhile (PostgreSQL refuses the second CREATE).
            await self.database.run(lambda connection: metadata.create_all(connection))

    async def close(self) -> None:
        self._ready = False
        await self.database.close()


class SqlAggregationRepository(_SqlState):
    """Aggregation groups in ``meshgate_aggregation_groups`` and ``..._items``."""

    def __init__(self, url: str, prefix: str) -> None:
        super().__init__(url, prefix, "aggregation repository (SQL)")
        tables = _metadata().tables
        self._groups = tables["meshgate_aggregation_groups"]
        self._items = tables["meshgate_aggregation_items"]

    async def add(self, key: str, item: dict[str, Any]) -> list[dict[str, Any]]:
        from sqlalchemy import exc, insert, select, update

        groups, items, prefix = self._groups, self._items, self.prefix
        key = _bounded(key)
        data = json.dumps(item, separators=(",", ":"))

        def work(connection: Any) -> list[str]:
            now = time.time()
            this = (groups.c.prefix == prefix) & (groups.c.key == key)
            # The UPDATE (or the INSERT) locks the group row until commit: adds to one
            # group from several runtimes take turns.
            if connection.execute(update(groups).where(this).values(updated=now)).rowcount == 0:
                connection.execute(insert(groups).values(prefix=prefix, key=key, updated=now))
            connection.execute(insert(items).values(prefix=prefix, key=key, item=data))
            query = (
                select(items.c.item)
                .where((items.c.prefix == prefix) & (items.c.key == key))
                .order_by(items.c.id)
            )
            return list(connection.execute(query).scalars())

        for attempt in range(5):
            try:
                raw = await self._run(work)
                break
            except SqlError as error:
                # Two runtimes inserted the same new group: the loser updates it next time.
                if not isinstance(error.__cause__, exc.IntegrityError) or attempt == 4:
                    raise
        return [json.loads(entry) for entry in raw]

    async def take(self, key: str) -> list[dict[str, Any]]:
        from sqlalchemy import delete, select

        groups, items, prefix = self._groups, self._items, self.prefix
        key = _bounded(key)

        def work(connection: Any) -> list[str]:
            this = (groups.c.prefix == prefix) & (groups.c.key == key)
            # Deleting the group row locks it: of two concurrent takes, one gets the items.
            if connection.execute(delete(groups).where(this)).rowcount == 0:
                return []
            mine = (items.c.prefix == prefix) & (items.c.key == key)
            found = list(
                connection.execute(select(items.c.item).where(mine).order_by(items.c.id)).scalars()
            )
            connection.execute(delete(items).where(mine))
            return found

        return [json.loads(entry) for entry in await self._run(work)]

    async def groups(self) -> dict[str, float]:
        from sqlalchemy import select

        groups, prefix = self._groups, self.prefix

        def work(connection: Any) -> dict[str, float]:
            query = select(groups.c.key, groups.c.updated).where(groups.c.prefix == prefix)
            return {key: float(updated) for key, updated in connection.execute(query)}

        return await self._run(work)


class SqlIdempotentRepository(_SqlState):
    """Keys in ``meshgate_idempotent``; with a ``ttl`` an older key counts as new again."""

    PURGE_EVERY = 1000

    def __init__(self, url: str, prefix: str, ttl: float | None = None) -> None:
        super().__init__(url, prefix, "idempotent repository (SQL)")
        self._keys = _metadata().tables["meshgate_idempotent"]
        self.ttl = ttl
        self._added = 0

    async def add(self, key: str) -> bool:
        from sqlalchemy import delete, exc, insert

        keys, prefix, ttl = self._keys, self.prefix, self.ttl
        key = _bounded(key)
        self._added += 1
        purge = ttl is not None and self._added % self.PURGE_EVERY == 1

        def work(connection: Any) -> None:
            now = time.time()
            if ttl is not None:
                expired = (keys.c.prefix == prefix) & (keys.c.created < now - ttl)
                if not purge:
                    expired = expired & (keys.c.key == key)
                connection.execute(delete(keys).where(expired))
            connection.execute(insert(keys).values(prefix=prefix, key=key, created=now))

        try:
            await self._run(work)
        except SqlError as error:
            if isinstance(error.__cause__, exc.IntegrityError):
                return False
            raise
        return True

    async def contains(self, key: str) -> bool:
        from sqlalchemy import select

        keys, prefix, ttl = self._keys, self.prefix, self.ttl
        key = _bounded(key)

        def work(connection: Any) -> bool:
            found = (keys.c.prefix == prefix) & (keys.c.key == key)
            if ttl is not None:
                found = found & (keys.c.created >= time.time() - ttl)
            return connection.execute(select(keys.c.key).where(found)).first() is not None

        return await self._run(work)

    async def remove(self, key: str) -> None:
        from sqlalchemy import delete

        keys, prefix = self._keys, self.prefix
        key = _bounded(key)
        await self._run(
            lambda connection: connection.execute(
                delete(keys).where((keys.c.prefix == prefix) & (keys.c.key == key))
            )
        )
