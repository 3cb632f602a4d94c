"""Prometheus metrics of one agent instance (its own registry: no module-level state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class Metrics:
    """Counters, gauges and histograms the API and runtime update."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "edge_agent_requests",
            "HTTP requests by route and status code.",
            ["route", "code"],
            registry=r,
        )
        self.errors = Counter(
            "edge_agent_errors",
            "HTTP error responses by route and status code.",
            ["route", "code"],
            registry=r,
        )
        self.write_timeouts = Counter(
            "edge_agent_write_timeouts",
            "Responses aborted because the client did not read within "
            "server.write_timeout_seconds, by route.",
            ["route"],
            registry=r,
        )
        self.peer_limited = Counter(
            "edge_agent_peer_limited",
            "Requests refused (429) because their client had server.max_requests_per_peer "
            "in progress.",
            registry=r,
        )
        self.tokens_generated = Counter(
            "edge_agent_tokens_generated", "Tokens generated, by model.", ["model"], registry=r
        )
        self.prompt_tokens = Counter(
            "edge_agent_prompt_tokens", "Prompt tokens processed, by model.", ["model"], registry=r
        )
        self.ttft = Histogram(
            "edge_agent_time_to_first_token_seconds",
            "Request start to first token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "edge_agent_inter_token_latency_seconds",
            "Time between generated tokens.",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_sequences = Histogram(
            "edge_agent_batch_sequences",
            "Sequences advanced together by one decode step (continuous batching).",
            ["model"],
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=r,
        )
        self.prompt_cache_hits = Counter(
            "edge_agent_prompt_cache_hits",
            "Requests whose prompt began with tokens already in a sequence's cache.",
            ["model"],
            registry=r,
        )
        self.prompt_cache_tokens = Counter(
            "edge_agent_prompt_cache_tokens",
            "Prompt tokens taken from the prefix cache instead of evaluated.",
            ["model"],
            registry=r,
        )
        self.loaded_models = Gauge(
            "edge_agent_loaded_models", "Models currently loaded.", registry=r
        )
        self.queue_depth = Gauge(
            "edge_agent_queue_depth",
            "Requests waiting or running, by model.",
            ["model"],
            registry=r,
        )
        self.load_seconds = Histogram(
            "edge_agent_model_load_seconds",
            "Time to load a model.",
            ["model"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.load_failures = Counter(
            "edge_agent_model_load_failures", "Model loads that failed.", ["model"], registry=r
        )
        self.sync_connected = Gauge(
            "edge_agent_sync_connected", "1 while the fleet link is connected.", registry=r
        )
        self.sync_backlog = Gauge(
            "edge_agent_sync_backlog", "Records waiting for the controller, by class.",
            ["cls"], registry=r,
        )
        self.sync_sent = Counter(
            "edge_agent_sync_records_sent", "Records the broker acknowledged, by class.",
            ["cls"], registry=r,
        )
        self.sync_dropped = Gauge(
            "edge_agent_sync_dropped", "Records dropped over quota, not yet reported, by class.",
            ["cls"], registry=r,
        )
        self.sync_alarm = Gauge(
            "edge_agent_sync_alarm", "1 while a never-dropped class is past its alarm size.",
            ["cls"], registry=r,
        )
        self.sync_quarantined = Counter(
            "edge_agent_sync_quarantined", "Outbox records that failed their check.", registry=r
        )
        self.sync_failures = Counter(
            "edge_agent_sync_link_failures", "Connections refused for good (certificate, "
            "authorization).", registry=r,
        )
        self.home_free_bytes = Gauge(
            "edge_agent_home_free_bytes",
            "Free bytes on the home's filesystem (the audit log's).",
            registry=r,
        )
        self.audit_pending = Gauge(
            "edge_agent_audit_pending",
            "Audit records appended but not yet written.",
            registry=r,
        )
        self.audit_refusing = Gauge(
            "edge_agent_audit_refusing",
            "1 while requests that must be audited are refused (disk below "
            "security.audit_min_free_bytes, audit backlog full, or the writer failing).",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
