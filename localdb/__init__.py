"""The device's one local SQLite database: engine, sessions, table base, migrations, layout.

Owns: opening the database file (WAL, foreign keys, one writer at a time in
`BEGIN IMMEDIATE`, deferred readers that never wait for it), the single Alembic chain
for every table in it, the declarative `Base` every owner's tables derive from, and the
layout of the state directory (`StateDir`: where the database, store, keys and locks
live, computed once).

Tables are declared next to the code that owns them (`registry.tables` for models,
variants, artifacts and events; `agent.security.tables` for audit and tokens; the sync
outbox with `agent.sync`), all on `localdb.Base`, so one metadata describes the file.

May import: the standard library, SQLAlchemy, Alembic (lazily). Never imports `agent`,
`registry` or `controller`: they all build on it.
"""

from __future__ import annotations

from localdb.base import Base, utcnow
from localdb.engine import HEAD_REVISION, Database, head_revision, open_database
from localdb.layout import StateDir

__all__ = [
    "HEAD_REVISION",
    "Base",
    "Database",
    "StateDir",
    "head_revision",
    "open_database",
    "utcnow",
]
