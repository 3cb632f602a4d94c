"""Alembic environment: runs on the connection `Database.migrate` hands in, never a URL.

The migrations are explicit DDL, so no table metadata is needed here; tests compare the
result with every owner's declared tables (tests/test_localdb.py).
"""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=context.config.attributes.get("metadata"),
    render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies the table
)
with context.begin_transaction():
    context.run_migrations()
