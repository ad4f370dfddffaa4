"""Fixtures: a real ``meshgate control`` on loopback, on SQLite and on PostgreSQL
(``MESHGATE_DATABASE_URL``; each test in a schema of its own)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from control_support import ControlPlane, postgres_schema, postgres_url, start_control


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each store the control plane supports; a test using it runs once on each."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'control.db'}"
    else:
        yield from postgres_schema(postgres_url())


@pytest.fixture
def control(tmp_path: Path, database_url: str) -> Iterator[ControlPlane]:
    """A control plane on each database, with the admin token ``TOKEN`` (all scopes)."""
    cp = start_control(tmp_path, database_url)
    yield cp
    cp.stop()


@pytest.fixture
def control_sqlite(tmp_path: Path) -> Iterator[ControlPlane]:
    """A control plane on SQLite only, for tests whose subject is not the store."""
    cp = start_control(tmp_path, f"sqlite:///{tmp_path / 'control.db'}")
    yield cp
    cp.stop()


@pytest.fixture(scope="module")
def control_shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """One SQLite control plane for a module's tests that each make their own, uniquely named
    data and read nothing global (no counts of all rows, no snapshots, no audit totals)."""
    workdir = tmp_path_factory.mktemp("control-shared")
    cp = start_control(workdir, f"sqlite:///{workdir / 'control.db'}")
    yield cp
    cp.stop()
