"""Products: TLS to backends, the listener certificate naming their hosts, WebSocket, the cap
on upstream connections; applications: the client certificates that identify them (mtls).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing rows get the defaults a gateway file has.
    with op.batch_alter_table("products") as batch:
        batch.add_column(sa.Column("upstream_tls", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("certificate", sa.String(200), nullable=True))
        batch.add_column(
            sa.Column("websocket", sa.Boolean(), nullable=False, server_default=sa.true())
        )
        batch.add_column(
            sa.Column(
                "max_upstream_connections",
                sa.Integer(),
                nullable=False,
                server_default=sa.text("1024"),
            )
        )
    with op.batch_alter_table("applications") as batch:
        batch.add_column(sa.Column("certificates", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("applications") as batch:
        batch.drop_column("certificates")
    with op.batch_alter_table("products") as batch:
        batch.drop_column("max_upstream_connections")
        batch.drop_column("websocket")
        batch.drop_column("certificate")
        batch.drop_column("upstream_tls")
