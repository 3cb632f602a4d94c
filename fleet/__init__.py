"""The fleet protocol, shared by the device (`agent.sync`) and the controller
(`controller`) and nothing else: topics, the message models (pydantic, JSON Schemas in
docs/protocol.md), and the audit chain format both sides verify.

Imports only the standard library, pydantic and (lazily) cryptography; never `agent`,
`controller`, `registry` or `localdb`.
"""
