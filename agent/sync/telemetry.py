"""The telemetry snapshot: per-model requests, tokens and time to first token (p50/p95
from the histogram buckets), errors by status, queue depths, the process's RSS and CPU,
disk, the hottest readable thermal zone, and the outbox backlog. Built from what the
daemon already counts (its Prometheus registry), so taking one costs no request anything.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent.metrics import Metrics

THERMAL = Path("/sys/class/thermal")


def _samples(metrics: Metrics, name: str) -> Iterable[tuple[str, dict[str, str], float]]:
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name == name:
                yield s.name, s.labels, s.value


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Linear interpolation inside the cumulative bucket that crosses q (Prometheus'
    histogram_quantile); None without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            width = count - prev_count
            frac = (rank - prev_count) / width if width else 0.0
            return prev_bound + (bound - prev_bound) * frac
        prev_bound, prev_count = bound, count
    return prev_bound


def temperature(root: Path = THERMAL) -> float | None:
    """The hottest thermal zone in °C, or None where none is readable."""
    best: float | None = None
    for zone in sorted(root.glob("thermal_zone*")):
        try:
            milli = int((zone / "temp").read_text().strip())
        except (OSError, ValueError):
            continue
        c = milli / 1000
        if -50 < c < 200 and (best is None or c > best):
            best = c
    return best


def snapshot(
    metrics: Metrics,
    *,
    boot: str,
    started: float,
    loaded: dict[str, int],
    home: Path,
    backlog: dict[str, int],
) -> dict[str, Any]:
    """A `fleet.messages.TelemetrySnapshot` as a dict. `loaded` maps loaded aliases to their
    queue depth."""
    import psutil

    models: dict[str, dict[str, Any]] = {}

    def model(alias: str) -> dict[str, Any]:
        return models.setdefault(alias, {"requests": 0, "prompt_tokens": 0,
                                         "tokens_generated": 0, "queue_depth": 0,
                                         "loaded": False})

    for _, labels, value in _samples(metrics, "edge_agent_tokens_generated_total"):
        model(labels["model"])["tokens_generated"] = int(value)
    for _, labels, value in _samples(metrics, "edge_agent_prompt_tokens_total"):
        model(labels["model"])["prompt_tokens"] = int(value)
    buckets: dict[str, list[tuple[float, float]]] = {}
    for _, labels, value in _samples(metrics, "edge_agent_time_to_first_token_seconds_bucket"):
        buckets.setdefault(labels["model"], []).append((float(labels["le"]), value))
    for alias, b in buckets.items():
        b.sort()
        m = model(alias)
        m["requests"] = int(b[-1][1])
        p50, p95 = _quantile(b, 0.5), _quantile(b, 0.95)
        m["ttft_p50_ms"] = None if p50 is None else round(p50 * 1000, 2)
        m["ttft_p95_ms"] = None if p95 is None else round(p95 * 1000, 2)
    for alias, depth in loaded.items():
        m = model(alias)
        m["loaded"] = True
        m["queue_depth"] = depth
    # Residency keys that are no alias (a deployment's smoke test loads its candidate as
    # "ALIAS#deploy") are the device's own business: the protocol's model names cannot
    # hold them, and one such key made the controller reject the whole batch.
    models = {alias: m for alias, m in models.items() if "#" not in alias}
    errors: dict[str, int] = {}
    for _, labels, value in _samples(metrics, "edge_agent_errors_total"):
        errors[labels["code"]] = errors.get(labels["code"], 0) + int(value)
    proc = psutil.Process()
    disk = shutil.disk_usage(home)
    return {
        "boot": boot,
        "uptime_s": round(time.time() - started, 1),
        "models": models,
        "errors": errors,
        "rss_bytes": proc.memory_info().rss,
        "cpu_percent": proc.cpu_percent(None),
        "disk_free_bytes": disk.free,
        "disk_total_bytes": disk.total,
        "temperature_c": temperature(),
        "backlog": backlog,
    }
