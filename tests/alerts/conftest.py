"""Fixtures: each store (SQLite, PostgreSQL in a schema of its own) migrated, for the alerts'
evaluation and deliveries, and a real control plane for their API."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The control plane's test helpers (start_control, postgres_schema) live with its suite.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "control"))

from control_support import (  # noqa: E402
    ControlPlane,
    postgres_schema,
    postgres_url,
    start_control,
)

from meshgate.control._db import Database  # noqa: E402


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'control.db'}"
    else:
        yield from postgres_schema(postgres_url())


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    """The control plane's store, migrated to the newest revision."""
    database = Database(database_url)
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture(scope="module")
def control_shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """One SQLite control plane for a module's tests that each make their own data."""
    workdir = tmp_path_factory.mktemp("alerts-control")
    cp = start_control(workdir, f"sqlite:///{workdir / 'control.db'}")
    yield cp
    cp.stop()
