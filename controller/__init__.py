"""The fleet controller: the fleet's keys and approvals (`pki`), its state in a database
any SQLAlchemy URL names (SQLite by default, PostgreSQL to scale out: `db`, `tables`),
the ingest workers on MQTT 5 shared subscriptions (`ingest`, idempotent storage in
`store`), the audit chain check per device (`audit`), and `edge-agent-controller` (`cli`).

Shares only the protocol package `fleet` with the device; never imports `agent`,
`registry` or `localdb`.
"""
