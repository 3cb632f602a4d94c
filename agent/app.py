"""App factory and lifespan: opens the registry, builds the runtime, closes in reverse."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from agent.access import AuditFn, install_access
from agent.api import agent_api, health, openai
from agent.api.errors import APIError, error_middleware, error_response
from agent.api.routes import PUBLIC, add_routes, route_spec
from agent.audit import AuditEntry, AuditLog
from agent.authz import PolicyStore, configured_policy_path
from agent.identity import Subject
from agent.keys import open_device_key
from agent.metrics import Metrics
from agent.models import ModelResolver
from agent.runtime.lifecycle import ModelManager
from agent.settings import Settings
from agent.state import STATE, AgentState
from agent.tokens import TokenStore
from registry.service import open_registry

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts requests and errors by route template and status code."""
    state = request.app[STATE]
    spec = route_spec(request)
    route = spec.path if spec else "unmatched"
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        state.metrics.requests.labels(route, str(status)).inc()
        if status >= 400:
            state.metrics.errors.labels(route, str(status)).inc()


@web.middleware
async def stopping_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Once stopping, new work gets 503 while health checks still answer."""
    state = request.app[STATE]
    spec = route_spec(request)
    if state.stopping and (spec is None or spec.permission != PUBLIC):
        return error_response(
            APIError(503, "the agent is stopping", type="server_error", code="stopping")
        )
    return await handler(request)


def create_app(settings: Settings) -> web.Application:
    """Build the app and its parts; the cleanup context starts and closes them."""
    t0 = time.monotonic()
    registry = open_registry(settings.home)
    metrics = Metrics()
    resolver = ModelResolver(settings, registry)
    manager = ModelManager(
        settings.runtime,
        resolver.resolve,
        metrics,
        total_memory=_total_memory(),
        lease=registry.lease,
    )
    sec = settings.security
    audit = AuditLog(
        registry.db,
        open_device_key(settings.home),
        checkpoint_every=sec.audit_checkpoint_every,
        checkpoint_seconds=sec.audit_checkpoint_seconds,
    )
    policy = PolicyStore(configured_policy_path(settings))  # invalid: refuse to start
    tokens = TokenStore(registry.db)
    state = AgentState(
        settings=settings,
        registry=registry,
        manager=manager,
        metrics=metrics,
        resolver=resolver,
        audit=audit,
        policy=policy,
        tokens=tokens,
    )
    app = web.Application(
        client_max_size=settings.server.max_body_bytes,
        middlewares=[metrics_middleware, error_middleware, stopping_middleware],
    )
    app[STATE] = state
    add_routes(app, health.ROUTES + openai.ROUTES + agent_api.ROUTES)
    install_access(app, policy, tokens, audit=audit_recorder(audit))
    app.cleanup_ctx.append(_lifespan(state, t0))
    return app


def _total_memory() -> int:
    """Physical RAM in bytes (sysconf: no extra module in the daemon's footprint)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _lifespan(state: AgentState, t0: float) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifespan(app: web.Application) -> AsyncIterator[None]:
        await state.manager.start()
        state.ready = True
        log.info("ready in %.0f ms (home %s)", (time.monotonic() - t0) * 1000, state.settings.home)
        try:
            yield
        finally:
            await shutdown(state)

    return lifespan


async def shutdown(state: AgentState) -> None:
    """Stop taking work, end generations, close the registry. Safe to call twice."""
    if state.closed:
        return
    state.closed = state.stopping = True
    await state.manager.close(state.settings.server.shutdown_grace_seconds)
    state.tokens.close()
    state.audit.close()  # flushes: every decision made so far is durable
    state.registry.close()


def audit_recorder(audit: AuditLog) -> AuditFn:
    """Adapts the access layer's decisions to audit records (outcome = HTTP status)."""

    def record(
        subject: Subject | None,
        action: str,
        resource: str,
        decision: str,
        outcome: str,
        details: dict[str, Any],
    ) -> None:
        audit.append(
            AuditEntry(
                subject=subject.display if subject is not None else "anonymous",
                uid=subject.uid if subject is not None else None,
                pid=subject.pid if subject is not None else None,
                action=action,
                resource=resource,
                decision=decision,
                outcome=str(details.get("status", outcome)),
                details=details,
            )
        )

    return record
