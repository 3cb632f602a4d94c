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
    """Ready: registry open and the agent accepting work (not starting, not stopping)."""
    state = request.app[STATE]
    ok = state.ready and not state.stopping
    status = "ready" if ok else ("stopping" if state.stopping else "starting")
    return web.json_response({"status": status}, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.metrics.loaded_models.set(len(state.scheduler.loaded()))
    return web.Response(body=state.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


ROUTES = [
    RouteSpec("GET", "/healthz", healthz, PUBLIC),
    RouteSpec("GET", "/readyz", readyz, PUBLIC),
    RouteSpec("GET", "/metrics", metrics, "metrics:read"),
]
