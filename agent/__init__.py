"""edge-agent: serves small language models on edge devices and syncs with a fleet.

The daemon's rooms (docs/architecture.md draws them with the path of one request):

- `errors`    the one exception tree; `settings` composed pydantic settings (EDGE_AGENT_*)
- `app`, `daemon`, `server`, `state`, `systemd`: the app factory and lifespan, signals,
  listeners (Unix socket, inherited socket, TCP) with peer credentials, sd_notify
- `api/`      HTTP routes (one table with permissions), the access middleware, OpenAI and
  agent endpoints, health and metrics, the one error-to-status mapping
- `cli/`      the `edge-agent` command, one module per command group
- `hardware/` detecting this device (CPU, memory, GPUs, NPUs, board, runtimes)
- `runtime/`  backends by format (llama.cpp today), residency (loaded set, budget, LRU,
  keep-alive), scheduler (queue, 429, one thread per model), resolver (alias → variant)
- `security/` identity, tokens, RBAC, the hash-chained audit log, device keys
- `sync/`     the fleet link over MQTT (outbox, telemetry, jobs) — [sync]

The allowed imports between them are import-linter contracts in pyproject.toml.
"""

__version__ = "0.1.0"
