"""The fleet link: enrollment and the device's TLS identity, the MQTT client, the outbox
(records for the controller, written in the same transaction as what they report),
telemetry, the scheduled jobs, and the reported state.

May import `agent.errors`, `agent.settings`, `agent.metrics`, `agent.security`,
`agent.runtime` (read-only views), `localdb`, `registry` and the shared message package
`fleet`. Never imports `agent.api` or `agent.cli`; nothing on the request path waits on it.
"""
