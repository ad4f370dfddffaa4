"""Fixtures for billing: the store in this process (SQLite and PostgreSQL, each test in a
schema of its own) for the run's rules, and a real ``meshgate control`` for the API."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The control plane's test helpers (start_control, postgres_schema, problem) are shared.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "control"))

from control_support import (  # noqa: E402
    ControlPlane,
    postgres_schema,
    postgres_url,
    start_control,
)

from meshgate.billing import history  # noqa: E402, F401 (records plan history)
from meshgate.control._db import Database  # noqa: E402


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each store the control plane supports; a test using it runs once on each."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'control.db'}"
    else:
        yield from postgres_schema(postgres_url())


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    """The control plane's store, migrated, used in this process."""
    database = Database(database_url)
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'control.db'}")
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture(scope="module")
def control_shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """One SQLite control plane for a module's tests, each making its own accounts."""
    workdir = tmp_path_factory.mktemp("billing-control")
    cp = start_control(workdir, f"sqlite:///{workdir / 'control.db'}")
    yield cp
    cp.stop()
