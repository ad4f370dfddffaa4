"""Products: hide_credentials (default true) and case_insensitive_rules (default false).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing products get the defaults a gateway file has.
    op.add_column(
        "products",
        sa.Column("hide_credentials", sa.Boolean(), nullable=False, server_default=sa.true()),
    )
    op.add_column(
        "products",
        sa.Column(
            "case_insensitive_rules", sa.Boolean(), nullable=False, server_default=sa.false()
        ),
    )


def downgrade() -> None:
    with op.batch_alter_table("products") as batch:
        batch.drop_column("case_insensitive_rules")
        batch.drop_column("hide_credentials")
