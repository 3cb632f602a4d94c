"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from agent.api.routes import PUBLIC, RouteSpec
from agent.state import STATE


async def healthz(request: web.Request) -> web.Response:
    """Alive: the event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: registry open and the agent accepting work (not starting, not stopping, and
    able to audit: disk above its watermark, audit writer keeping up)."""
    state = request.app[STATE]
    ok = state.ready and not state.stopping
    status = "ready" if ok else ("stopping" if state.stopping else "starting")
    gate = state.security.gate
    refusal = gate.refusal() if ok and gate is not None else None
    if refusal is not None:
        return web.json_response({"status": "not_ready", "reason": str(refusal)}, status=503,
                                 headers={"Retry-After": str(refusal.retry_after)})
    return web.json_response({"status": status}, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    m = state.metrics
    m.loaded_models.set(len(state.scheduler.loaded()))
    m.audit_pending.set(state.audit.pending)
    gate = state.security.gate
    if gate is not None:
        m.audit_refusing.set(0 if gate.refusal() is None else 1)
        free = gate.free_bytes()
        if free is not None:
            m.home_free_bytes.set(free)
    return web.Response(body=m.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


ROUTES = [
    RouteSpec("GET", "/healthz", healthz, PUBLIC),
    RouteSpec("GET", "/readyz", readyz, PUBLIC),
    RouteSpec("GET", "/metrics", metrics, "metrics:read"),
]
