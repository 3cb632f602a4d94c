"""API token names are unique among active tokens only: a revoked name is free again.

`api_tokens.name` carried a table-level UNIQUE, so `tokens create --name kiosk` after
`tokens revoke kiosk` was refused for ever. The revoked row must stay (the audit log and
`tokens list` refer to it), so the uniqueness moves to a partial index over rows that are
not revoked. SQLite cannot drop a table constraint in place: the table is rebuilt with
its rows, ids and token ids unchanged.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_COLUMNS = "id, token_id, name, role, secret_hash, created_at, expires_at, revoked_at"
ACTIVE_NAME_INDEX = "ux_api_tokens_active_name"


def _rebuild(*, unique_name: bool) -> None:
    constraints: list[sa.Constraint] = [sa.PrimaryKeyConstraint("id"),
                                        sa.UniqueConstraint("token_id")]
    if unique_name:
        constraints.append(sa.UniqueConstraint("name"))
    op.create_table(
        "_api_tokens_new",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=64), nullable=False),
        sa.Column("secret_hash", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        *constraints,
    )
    op.execute(f"INSERT INTO _api_tokens_new ({_COLUMNS}) "  # noqa: S608 - constant names
               f"SELECT {_COLUMNS} FROM api_tokens")
    op.drop_table("api_tokens")
    op.rename_table("_api_tokens_new", "api_tokens")


def upgrade() -> None:
    _rebuild(unique_name=False)
    op.create_index(ACTIVE_NAME_INDEX, "api_tokens", ["name"], unique=True,
                    sqlite_where=sa.text("revoked_at IS NULL"))


def downgrade() -> None:
    # The old schema holds one row per name: a name re-used after a revoke keeps only its
    # newest row's name; older revoked rows are renamed NAME~ID so no row (and no audit
    # reference to its token id) is lost.
    op.drop_index(ACTIVE_NAME_INDEX, table_name="api_tokens")
    op.execute(
        "UPDATE api_tokens SET name = substr(name, 1, 48) || '~' || id "
        "WHERE id NOT IN (SELECT max(id) FROM api_tokens GROUP BY name)"
    )
    _rebuild(unique_name=True)
