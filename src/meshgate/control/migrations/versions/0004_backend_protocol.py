"""The protocol a product's backends speak: http1, h2 or h2c.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("products") as batch:
        batch.add_column(
            sa.Column("protocol", sa.String(8), nullable=False, server_default="http1")
        )


def downgrade() -> None:
    with op.batch_alter_table("products") as batch:
        batch.drop_column("protocol")
