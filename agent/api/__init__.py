"""HTTP API: OpenAI-compatible /v1, the agent's /agent/v1, health and metrics."""
