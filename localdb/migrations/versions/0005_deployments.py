"""Deployments: the device's received desired-state documents, and the variant pinned to
serve each model.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("active_variant", sa.String(length=64), nullable=True))
    op.create_table(
        "sync_deployments",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=1024), nullable=True),
        sa.Column("models", sa.JSON(), nullable=False),
        sa.Column("received", sa.Float(), nullable=False),
        sa.Column("updated", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_sync_deployments_version", "sync_deployments", ["version"],
                    unique=False)


def downgrade() -> None:
    op.drop_index("ix_sync_deployments_version", table_name="sync_deployments")
    op.drop_table("sync_deployments")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("active_variant")
