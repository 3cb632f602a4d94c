"""Who may do what, and the record of what was done: identity (SO_PEERCRED, tokens), the
RBAC policy and `authorize`, the hash-chained audit log and its verification, device keys,
and their tables. `service.Security` is the one wiring the daemon holds.

May import: `agent.errors`, `agent.settings`, `localdb`, `policies`, `registry.yamlfile`.
Never imports `agent.api`, `agent.cli` or `agent.runtime`: the HTTP layer
(`agent.api.access`) and the CLI guard (`agent.cli.guard`) enforce what this package
decides.
"""
