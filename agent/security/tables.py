"""The security tables: the hash-chained audit records, their signed checkpoints, API tokens.

Declared on `localdb.Base` with the code that owns them; created by the migrations in
`localdb/migrations/` (0002; 0006 for the token name index).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Index, Integer, String, text
from sqlalchemy.orm import Mapped, mapped_column

from localdb import Base, utcnow


class AuditRecord(Base):
    """One audited decision; `digest` chains it to the record before (tamper evidence)."""

    __tablename__ = "audit_records"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    time: Mapped[str] = mapped_column(String(32))  # ISO 8601 UTC, as hashed
    subject: Mapped[str] = mapped_column(String(128))
    uid: Mapped[int | None] = mapped_column(Integer)
    pid: Mapped[int | None] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(64))
    resource: Mapped[str] = mapped_column(String(256))
    decision: Mapped[str] = mapped_column(String(8))
    outcome: Mapped[str] = mapped_column(String(32))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    digest: Mapped[str] = mapped_column(String(64))


class AuditCheckpoint(Base):
    """A signature by the device key over the chain head at `seq`."""

    __tablename__ = "audit_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, index=True)
    digest: Mapped[str] = mapped_column(String(64))
    time: Mapped[str] = mapped_column(String(32))
    key_id: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(128))  # base64 Ed25519 signature


class ApiToken(Base):
    """A bearer token for callers whose uid says little; only a slow hash is stored.

    A name is unique among tokens that are not revoked (migration 0006): revoking frees
    the name for a new token, and the revoked row stays for `tokens list` and the audit.
    """

    __tablename__ = "api_tokens"
    __table_args__ = (
        Index("ux_api_tokens_active_name", "name", unique=True,
              sqlite_where=text("revoked_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_id: Mapped[str] = mapped_column(String(32), unique=True)  # public part, for lookup
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(64))
    secret_hash: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
