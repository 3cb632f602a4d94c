"""The local model registry: SQLite records, content-addressed blobs, catalog, selection.

Never imports `agent`.
"""
