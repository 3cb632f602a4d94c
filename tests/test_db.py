"""Registry database: migrations match the ORM, old files upgrade keeping their data."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from registry.db import head_revision, open_database
from registry.schema import Base

FIXTURES = Path(__file__).parent / "fixtures" / "db"


def test_migrations_from_empty_db_yield_exactly_the_orm_schema(tmp_path: Path) -> None:
    db = open_database(tmp_path / "registry.db")
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    db.close()
    assert diff == []


def test_db_uses_wal_and_foreign_keys(tmp_path: Path) -> None:
    db = open_database(tmp_path / "registry.db")
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    db.close()
    assert (tmp_path / "registry.db").stat().st_mode & 0o777 == 0o640


def test_every_committed_old_db_upgrades_to_head_keeping_its_data(tmp_path: Path) -> None:
    olds = sorted(FIXTURES.glob("registry-*.db"))
    assert olds, "each released schema revision must have a committed sample DB"
    for old in olds:
        path = tmp_path / old.name
        shutil.copy(old, path)
        db = open_database(path)
        assert db.current_revision() == head_revision()
        db.close()
        with sqlite3.connect(path) as raw:
            alias, task = raw.execute("SELECT alias, task FROM models").fetchone()
            variant = raw.execute("SELECT name, sha256 FROM variants").fetchone()
            events = raw.execute("SELECT count(*) FROM model_events").fetchone()[0]
        assert (alias, task) == ("smollm2-135m", "chat")
        assert variant[0] == "gguf-q4_1-cpu" and len(variant[1]) == 64
        assert events == 1


def test_reopening_is_a_no_op(tmp_path: Path) -> None:
    db = open_database(tmp_path / "registry.db")
    db.close()
    db = open_database(tmp_path / "registry.db")
    assert db.current_revision() == head_revision()
    db.close()


def test_head_revision_constant_matches_the_migration_scripts() -> None:
    from registry.db import HEAD_REVISION

    assert head_revision() == HEAD_REVISION
