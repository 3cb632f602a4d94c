"""The sync tables: the outbox of records meant for the fleet controller, the cursors and
counters of what has been delivered or dropped, and a quarantine for rows that fail their
check. Declared on `localdb.Base`; created by migrations 0003 (outbox) and 0005 (deployments).

Audit records are not copied here: the audit log is their outbox, and `sync_state` keeps
the highest sequence the controller acknowledged (a record exists once, in one table).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Float, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from localdb import Base


class OutboxRecord(Base):
    """One record waiting for the controller's acknowledgement (PUBACK); deleted after it."""

    __tablename__ = "sync_outbox"
    __table_args__ = (
        Index("ix_sync_outbox_cls_id", "cls", "id"),
        # AUTOINCREMENT: ids are never reused after deletes, so (device, class, id) names a
        # record for ever and the controller's de-duplication can rely on it.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    cls: Mapped[str] = mapped_column(String(16))  # telemetry | events | deploy
    created: Mapped[float] = mapped_column(Float)  # unix time
    body: Mapped[str] = mapped_column(Text)  # compact JSON
    size: Mapped[int] = mapped_column(Integer)  # bytes of body, for quotas
    check: Mapped[str] = mapped_column(String(8))  # crc32 of body, hex: detects corruption


class SyncState(Base):
    """Counters and cursors: `cursor:audit` (highest audit seq acknowledged),
    `cursor:checkpoint`, `dropped:<class>` (records dropped over quota, not yet reported)."""

    __tablename__ = "sync_state"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(Integer)


class QuarantinedRecord(Base):
    """An outbox row that failed its check, kept aside for recovery instead of deleted."""

    __tablename__ = "sync_quarantine"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    outbox_id: Mapped[int] = mapped_column(Integer)
    cls: Mapped[str] = mapped_column(String(16))
    created: Mapped[float] = mapped_column(Float)
    body: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(String(256))
    moved_at: Mapped[float] = mapped_column(Float)


class Deployment(Base):
    """A desired-state document the device received, and how far it got. The signed bytes
    are kept as received (evidence); `version` of accepted documents only grows."""

    __tablename__ = "sync_deployments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, index=True)
    document: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))  # accepted | done | failed | rejected
    reason: Mapped[str | None] = mapped_column(String(1024))
    models: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # alias -> progress
    received: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)
