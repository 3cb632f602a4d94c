"""The controller's database: one engine from a SQLAlchemy URL (SQLite for one controller,
PostgreSQL when several workers on several hosts share it), tables created at open.

Storing is idempotent by construction (unique keys + INSERT ... ON CONFLICT DO NOTHING),
so any number of workers can write concurrently: the database settles duplicates.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from sqlalchemy import Engine, Table, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from controller.tables import Base


def _sqlite_pragmas(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def open_engine(url: str) -> Engine:
    """The engine for `url`, with every table created (idempotent)."""
    if url.startswith("sqlite"):
        engine = create_engine(url)
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    Base.metadata.create_all(engine)
    return engine


def insert_ignore(conn: Connection, table: Table, rows: list[dict[str, Any]],
                  keys: list[str]) -> None:
    """Insert `rows`, skipping any whose unique `keys` already exist."""
    if not rows:
        return
    dialect = conn.dialect.name
    if dialect == "postgresql":
        stmt: Any = postgresql.insert(table).on_conflict_do_nothing(index_elements=keys)
    elif dialect == "sqlite":
        stmt = sqlite.insert(table).on_conflict_do_nothing(index_elements=keys)
    else:
        raise ValueError(f"unsupported database {dialect!r}: use SQLite or PostgreSQL")
    conn.execute(stmt, rows)


def upsert_add(conn: Connection, table: Table, row: dict[str, Any], keys: list[str],
               add: list[str]) -> None:
    """Insert `row`, or add its `add` columns to the existing row's."""
    dialect = conn.dialect.name
    mod: Any = postgresql if dialect == "postgresql" else sqlite
    stmt = mod.insert(table).values(**row)
    stmt = stmt.on_conflict_do_update(
        index_elements=keys, set_={c: getattr(table.c, c) + getattr(stmt.excluded, c)
                                   for c in add})
    conn.execute(stmt)
