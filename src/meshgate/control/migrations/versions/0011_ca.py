"""The mesh's certificate authority: its signing certificates (keys encrypted) and the
bootstrap tokens that let workloads obtain their first certificate.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ca_authorities",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("cert_pem", sa.Text(), nullable=False),
        sa.Column("key_encrypted", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ca_authorities")),
    )
    op.create_index(op.f("ix_ca_authorities_state"), "ca_authorities", ["state"], unique=False)
    op.create_table(
        "mesh_bootstrap_tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("token_hash", sa.String(length=80), nullable=False),
        sa.Column("service", sa.String(length=128), nullable=False),
        sa.Column("env", sa.String(length=32), nullable=False),
        sa.Column("single_use", sa.Boolean(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mesh_bootstrap_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_mesh_bootstrap_tokens_token_hash")),
    )


def downgrade() -> None:
    op.drop_table("mesh_bootstrap_tokens")
    op.drop_index(op.f("ix_ca_authorities_state"), table_name="ca_authorities")
    op.drop_table("ca_authorities")
