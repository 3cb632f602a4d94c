"""The device database: one engine, one migration chain for every owner's tables, old
files upgrade keeping their data, and a home written by the previous release still works."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

import agent.security.tables
import agent.sync.tables
import registry.tables
from agent.security import audit as auditlog
from agent.security import audit_verify
from agent.security.keys import load_device_public_key
from agent.security.tokens import TokenStore
from localdb import HEAD_REVISION, Base, StateDir, head_revision, open_database
from registry.service import open_registry

FIXTURES = Path(__file__).parent / "fixtures" / "db"


def test_every_owner_declares_its_tables_on_the_one_base() -> None:
    owners = {t.name: t for t in Base.metadata.sorted_tables}
    assert set(owners) == {
        "models", "variants", "artifacts", "model_events",  # registry
        "variant_files", "bench_results",  # registry (side files, benchmarks)
        "audit_records", "audit_checkpoints", "api_tokens",  # agent.security
        "sync_outbox", "sync_state", "sync_quarantine", "sync_deployments",  # agent.sync
    }
    assert registry.tables.Model.metadata is Base.metadata
    assert agent.security.tables.AuditRecord.metadata is Base.metadata
    assert agent.sync.tables.OutboxRecord.metadata is Base.metadata


def test_migrations_from_empty_db_yield_exactly_the_declared_tables(tmp_path: Path) -> None:
    db = open_database(tmp_path / "registry.db")
    with db.read_connection() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    db.close()
    assert diff == []


def test_db_uses_wal_and_foreign_keys(tmp_path: Path) -> None:
    db = open_database(tmp_path / "registry.db")
    with db.write_connection() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    db.close()
    assert (tmp_path / "registry.db").stat().st_mode & 0o777 == 0o640


def test_a_reader_does_not_wait_for_a_writer(tmp_path: Path) -> None:
    db = open_database(tmp_path / "registry.db")
    try:
        with db.write() as w:
            w.add(registry.tables.ModelEvent(alias="x", kind="imported", details={}))
            w.flush()
            # The write lock is held and the row is not committed: a reader sees the
            # snapshot before it, at once.
            with db.read_connection() as r:
                n = r.exec_driver_sql("SELECT count(*) FROM model_events").scalar()
            assert n == 0
        with db.read_connection() as r:
            assert r.exec_driver_sql("SELECT count(*) FROM model_events").scalar() == 1
    finally:
        db.close()


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


def test_a_home_written_by_the_previous_release_opens_and_verifies(tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(FIXTURES / "home-0002", home)
    state = StateDir(home)
    db = open_database(state.db)
    try:
        assert db.current_revision() == HEAD_REVISION
        result = audit_verify.verify(db, load_device_public_key(home))
        assert result.ok, result.line()
        assert result.records == 20 and result.checkpoints >= 2
        assert [r.details["i"] for r in auditlog.tail(db, 3)] == [17, 18, 19]
        assert [t.name for t in TokenStore(db).list_tokens()] == ["legacy-app"]
        reg = open_registry(state, db)
        assert [m.alias for m in reg.list_models()] == ["tiny"]
    finally:
        db.close()


def test_reopening_is_a_no_op(tmp_path: Path) -> None:
    db = open_database(tmp_path / "registry.db")
    db.close()
    db = open_database(tmp_path / "registry.db")
    assert db.current_revision() == head_revision()
    db.close()


def test_head_revision_constant_matches_the_migration_scripts() -> None:
    assert head_revision() == HEAD_REVISION


def test_state_dir_is_the_one_place_paths_are_derived(tmp_path: Path) -> None:
    from agent.settings import load_settings

    settings = load_settings(environ={"EDGE_AGENT_HOME": str(tmp_path)})
    assert settings.state == StateDir(tmp_path)
    assert settings.state.db == tmp_path / "registry.db"
    assert open_registry(settings.state).store.root == settings.state.store
