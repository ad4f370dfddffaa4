"""The store is migrated on start, on each database; a second start changes nothing."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from control_support import dump_database, make_product, make_subscription, start_control
from sqlalchemy import create_engine

import meshgate.analytics.alert_models  # noqa: F401 (registers the alerts tables on Base)
import meshgate.analytics.graph  # noqa: F401 (registers the service graph's table on Base)
import meshgate.analytics.models  # noqa: F401 (registers the analytics tables on Base)
import meshgate.billing.models  # noqa: F401 (registers the billing tables on Base)
from meshgate.control._db import _alembic, normalize_url
from meshgate.control.models import Base


def _head() -> str:
    config = _alembic(None)
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def test_a_fresh_store_is_migrated_to_the_model_and_a_restart_is_a_no_op(
    tmp_path: Path, database_url: str
) -> None:
    first = start_control(tmp_path, database_url)
    try:
        product = make_product(first)
        sub = make_subscription(first, product["id"])
        first.post(f"/products/{product['id']}/promote")
        first.wait_snapshot("staging", lambda d: bool(d["products"]))
    finally:
        first.stop()
    assert "Running upgrade  -> " in first.log()
    stored = dump_database(database_url)
    assert stored["alembic_version"] == [{"version_num": _head()}]
    assert set(stored) == set(Base.metadata.tables) | {"alembic_version"}

    second = start_control(tmp_path, database_url)
    try:
        assert second.api.get(f"/products/{product['id']}").json()["name"] == "echo"
        app = second.api.get(f"/applications/{sub['application']['id']}").json()
        assert app["app_id"] == sub["application"]["app_id"]
        # The same data compiles to the same snapshots: no new version on start.
        for env in ("staging", "production"):
            served = second.snapshot(env).json()
            assert served["version"] == str(
                max(r["version"] for r in stored["snapshots"] if r["env"] == env)
            )
    finally:
        second.stop()
    assert "Running upgrade" not in second.log()
    restarted = dump_database(database_url)
    # Only the bootstrap token's last use may differ.
    for rows in (stored, restarted):
        for row in rows["admin_tokens"]:
            row.pop("last_used_at")
    assert restarted == stored

    # The migrated store and the models agree: autogenerate finds nothing to add.
    engine = create_engine(normalize_url(database_url))
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()
