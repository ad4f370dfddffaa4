"""The service graph: edges reported by sidecars.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mesh_edges",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("env", sa.String(length=32), nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("reporter", sa.String(length=200), nullable=False),
        sa.Column("source", sa.String(length=253), nullable=False),
        sa.Column("destination", sa.String(length=253), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("mtls", sa.BigInteger(), nullable=False),
        sa.Column("durations", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mesh_edges")),
    )
    op.create_index("ix_mesh_edges_env_at", "mesh_edges", ["env", "at"])


def downgrade() -> None:
    op.drop_index("ix_mesh_edges_env_at", table_name="mesh_edges")
    op.drop_table("mesh_edges")
