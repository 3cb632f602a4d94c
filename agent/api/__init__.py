"""The HTTP API on the socket: the route table with each route's permission (`routes`),
the access middleware that authenticates, authorizes and audits every request (`access`),
the OpenAI-compatible /v1 endpoints, the agent's /agent/v1, health and metrics, and the
one mapping of errors to statuses (`errors`).

May import `agent.runtime`, `agent.security`, `agent.state`, `agent.server`; never
`agent.cli`.
"""
