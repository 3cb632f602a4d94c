"""The SQLite engine: WAL, foreign keys, one writer in BEGIN IMMEDIATE, deferred readers.

Every read and write of the local database goes through `Database.write()` and
`Database.read()` (or their Core-connection forms, or `point_read()` for single-statement
lookups on hot paths); nothing else opens the file. Writers take the write lock up front, so
two writers never deadlock upgrading a read lock; readers take a deferred transaction,
which under WAL is a consistent snapshot that never waits for a writer. Migrations run at
open when the file is not at `HEAD_REVISION` (Alembic is imported only then: ~10 MB and
~0.1 s the daemon saves on an up-to-date database).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# The newest migration. A test checks it against Alembic's head, so start-up can skip
# importing Alembic when the database is already current.
HEAD_REVISION = "0006"


def _alembic_config() -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str:
    """Alembic's head, read from the migration scripts."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
    # Autocommit at the driver level so SQLAlchemy's BEGIN is the only transaction start.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _begin_immediate(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _begin_deferred(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN")


def _engine(path: Path, *, writer: bool) -> Engine:
    engine = create_engine(f"sqlite:///{path}")
    event.listen(engine, "connect", _on_connect)
    event.listen(engine, "begin", _begin_immediate if writer else _begin_deferred)
    return engine


class Database:
    """The open database file. `write()` and `read()` are the only ways in."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            # Created 0640 before SQLite does, so the database is never world-readable.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640))
        with sqlite3.connect(path) as raw:
            raw.execute("PRAGMA journal_mode=WAL")
        self._writer = _engine(path, writer=True)
        self._reader = _engine(path, writer=False)
        self._write_sessions = sessionmaker(self._writer, expire_on_commit=False)
        self._read_sessions = sessionmaker(self._reader, expire_on_commit=False)
        self._point: Any = None
        self._point_lock = threading.Lock()

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session in one BEGIN IMMEDIATE transaction; commits on exit, rolls back on error."""
        with self._write_sessions.begin() as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session in a deferred transaction: a consistent snapshot that never queues."""
        with self._read_sessions.begin() as session:
            yield session

    @contextmanager
    def write_connection(self) -> Iterator[Connection]:
        """A Core connection in one BEGIN IMMEDIATE transaction, for bulk inserts."""
        with self._writer.begin() as conn:
            yield conn

    @contextmanager
    def read_connection(self) -> Iterator[Connection]:
        """A Core connection in a deferred transaction (rolled back: reads change nothing)."""
        with self._reader.connect() as conn, conn.begin() as tx:
            try:
                yield conn
            finally:
                tx.rollback()

    @contextmanager
    def point_read(self) -> Iterator[Any]:
        """The DB-API connection for single-statement reads on hot paths (a token lookup per
        request): one reader connection kept checked out, in autocommit, so a statement is
        its own snapshot and costs no pool checkout or BEGIN/ROLLBACK (~10 µs instead of
        ~50-250 µs). Serialised by a lock; use `read()` for anything that needs more than
        one statement to be consistent."""
        with self._point_lock:
            if self._point is None:
                self._point = self._reader.raw_connection()
            yield self._point.driver_connection

    def current_revision(self) -> str | None:
        with self.read_connection() as conn:
            try:
                row = conn.exec_driver_sql("SELECT version_num FROM alembic_version").first()
            except Exception:  # no table yet: an empty database
                return None
        return str(row[0]) if row else None

    def migrate(self, revision: str = "head") -> None:
        from alembic import command

        cfg = _alembic_config()
        with self._writer.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)

    def close(self) -> None:
        with self._point_lock:
            if self._point is not None:
                self._point.close()
                self._point = None
        self._writer.dispose()
        self._reader.dispose()


def open_database(path: Path) -> Database:
    """Open (creating if needed) and migrate the database at `path`."""
    db = Database(path)
    if db.current_revision() != HEAD_REVISION:
        db.migrate()
    return db
