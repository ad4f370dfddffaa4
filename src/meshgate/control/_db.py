"""The control plane's SQL store: engine, sessions, migrations on start."""

from __future__ import annotations

import logging
import os
from importlib import resources
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["Database", "normalize_url"]

# Alembic announces each of its plugins at INFO on every start.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def normalize_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here, the driver the project installs."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def _alembic(connection: Any) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option(
        "script_location", str(resources.files("meshgate.control").joinpath("migrations"))
    )
    cfg.attributes["connection"] = connection
    return cfg


class Database:
    """One engine and session factory; ``migrate()`` brings the schema to the latest revision."""

    def __init__(self, url: str) -> None:
        self.url = normalize_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if self.is_sqlite:
            _create_private(make_url(self.url).database)
            # Sessions run in FastAPI's thread pool; SQLite waits for a writer instead of failing.
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs.update(pool_size=10, max_overflow=20)
        self.engine: Engine = create_engine(self.url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Changes take SQLite's write lock when they begin (BEGIN IMMEDIATE): a read that
        # later writes could otherwise fail at once when another writer got there first.
        self.writers = sessionmaker(
            self.engine.execution_options(sqlite_begin="IMMEDIATE"), expire_on_commit=False
        )

    def migrate(self) -> None:
        with self.engine.begin() as connection:
            command.upgrade(_alembic(connection), "head")

    def session(self) -> Session:
        return self.sessions()

    def writer(self) -> Session:
        return self.writers()

    def dispose(self) -> None:
        self.engine.dispose()


def _create_private(path: str | None) -> None:
    """Create the SQLite file readable by its owner only, as the gateway's snapshot cache is:
    it holds JWT secrets, key and token hashes and the audit log. SQLite gives the -wal,
    -shm and -journal files it makes beside it the database file's permissions."""
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        # There already, or not creatable: SQLite opens it, or says why it cannot.
        pass


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite's own transaction handling is off: "begin" below starts them.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    connection.exec_driver_sql(
        "BEGIN " + connection.get_execution_options().get("sqlite_begin", "")
    )
