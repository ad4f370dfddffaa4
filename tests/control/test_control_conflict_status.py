"""A transaction that loses to a concurrent one on PostgreSQL is a 409 to send again."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from control_support import postgres_schema, postgres_url
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from meshgate.control._db import normalize_url
from meshgate.control._problems import _unavailable


@pytest.fixture
def pg() -> Iterator[str]:
    yield from postgres_schema(postgres_url())


def test_a_serialization_failure_is_409_not_503(pg: str) -> None:
    engine = create_engine(normalize_url(pg), isolation_level="REPEATABLE READ")
    with engine.begin() as setup:
        setup.execute(text("CREATE TABLE t (id int primary key, v int)"))
        setup.execute(text("INSERT INTO t VALUES (1, 0)"))
    first, second = engine.connect(), engine.connect()
    try:
        first.begin()
        first.execute(text("SELECT v FROM t WHERE id = 1")).one()
        with second.begin():
            second.execute(text("UPDATE t SET v = 2 WHERE id = 1"))
        with pytest.raises(OperationalError) as lost:
            first.execute(text("UPDATE t SET v = 1 WHERE id = 1"))
        first.rollback()
    finally:
        first.close()
        second.close()
        engine.dispose()
    response = _unavailable(None, lost.value)  # type: ignore[arg-type]
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    assert "send the request again" in json.loads(response.body)["detail"]
