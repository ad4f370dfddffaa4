"""Usage analytics: batches received and roll-ups by minute, hour, day and month.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_batches",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("dataplane", sa.String(length=200), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_batches")),
    )
    op.create_index(
        op.f("ix_usage_batches_received_at"), "usage_batches", ["received_at"], unique=False
    )
    op.create_table(
        "usage_rollups",
        sa.Column("granularity", sa.String(length=8), nullable=False),
        sa.Column("product", sa.String(length=200), nullable=False),
        sa.Column("start", sa.BigInteger(), nullable=False),
        sa.Column("application", sa.String(length=200), nullable=False),
        sa.Column("metric", sa.String(length=200), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=True),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "granularity",
            "product",
            "start",
            "application",
            "metric",
            name=op.f("pk_usage_rollups"),
        ),
    )
    op.create_index(
        "ix_usage_rollups_application", "usage_rollups", ["application", "granularity", "start"]
    )
    op.create_index(
        "ix_usage_rollups_account", "usage_rollups", ["account_id", "granularity", "start"]
    )
    op.create_table(
        "response_rollups",
        sa.Column("granularity", sa.String(length=8), nullable=False),
        sa.Column("product", sa.String(length=200), nullable=False),
        sa.Column("start", sa.BigInteger(), nullable=False),
        sa.Column("application", sa.String(length=200), nullable=False),
        sa.Column("status", sa.SmallInteger(), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "granularity",
            "product",
            "start",
            "application",
            "status",
            "reason",
            name=op.f("pk_response_rollups"),
        ),
    )
    op.create_table(
        "latency_rollups",
        sa.Column("granularity", sa.String(length=8), nullable=False),
        sa.Column("product", sa.String(length=200), nullable=False),
        sa.Column("start", sa.BigInteger(), nullable=False),
        sa.Column("bucket", sa.SmallInteger(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "granularity", "product", "start", "bucket", name=op.f("pk_latency_rollups")
        ),
    )


def downgrade() -> None:
    op.drop_table("latency_rollups")
    op.drop_table("response_rollups")
    op.drop_index("ix_usage_rollups_account", table_name="usage_rollups")
    op.drop_index("ix_usage_rollups_application", table_name="usage_rollups")
    op.drop_table("usage_rollups")
    op.drop_index(op.f("ix_usage_batches_received_at"), table_name="usage_batches")
    op.drop_table("usage_batches")
