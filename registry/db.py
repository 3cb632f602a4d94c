"""The registry database: SQLite engine (WAL, foreign keys), migrations at open, sessions."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# The newest migration. A test checks it against Alembic's head, so start-up can skip
# importing Alembic (~10 MB, ~0.1 s) when the database is already current.
HEAD_REVISION = "0002"


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


def _on_begin(conn: Any) -> None:
    # Every transaction takes the write lock up front: no SQLITE_BUSY upgrade deadlocks.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(path: Path, *, writer: bool = True) -> Engine:
    engine = create_engine(f"sqlite:///{path}")
    event.listen(engine, "connect", _on_connect)
    # Readers take a deferred BEGIN: under WAL they never wait for the writer.
    event.listen(engine, "begin", _on_begin if writer else _on_begin_read)
    return engine


def _on_begin_read(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN")


class Database:
    """An open registry database. `migrate()` brings it to the newest schema."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            # Create it 0640 before SQLite does, so the DB is never world-readable.
            path.touch(mode=0o640)
        with sqlite3.connect(path) as raw:
            raw.execute("PRAGMA journal_mode=WAL")
        self.engine = make_engine(path)
        self.read_engine = make_engine(path, writer=False)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(self.read_engine, expire_on_commit=False)

    def current_revision(self) -> str | None:
        with sqlite3.connect(self.path) as raw:
            try:
                row = raw.execute("SELECT version_num FROM alembic_version").fetchone()
            except sqlite3.OperationalError:  # no table yet: an empty database
                return None
        return row[0] if row else None

    def migrate(self, revision: str = "head") -> None:
        from alembic import command

        cfg = _alembic_config()
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A write-capable session in one BEGIN IMMEDIATE transaction, committed on exit."""
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only session (deferred transaction): never queues behind a writer."""
        with self._read_sessions.begin() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()
        self.read_engine.dispose()


def open_database(path: Path) -> Database:
    """Open (creating if needed) and migrate the registry database."""
    db = Database(path)
    if db.current_revision() != HEAD_REVISION:
        db.migrate()
    return db
