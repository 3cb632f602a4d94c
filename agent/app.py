"""App factory and lifespan: opens the registry, builds the runtime, closes in reverse."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from agent.api import agent_api, bodies, embeddings, health, openai, responses, tasks
from agent.api.access import install_access
from agent.api.errors import APIError, error_middleware, error_response
from agent.api.limits import limits_middleware
from agent.api.routes import PUBLIC, add_routes, route_spec
from agent.errors import SettingsError
from agent.metrics import Metrics
from agent.runtime.autobench import AutoBench
from agent.runtime.resolver import ModelResolver, selection_policy_path
from agent.runtime.scheduler import Scheduler
from agent.security.admission import AuditGate
from agent.security.audit import AuditLog, audit_recorder
from agent.security.authz import PolicyStore, configured_policy_path, daemon_uid
from agent.security.denials import DenialSummaries
from agent.security.keys import open_device_key
from agent.security.service import Security
from agent.security.tokens import TokenStore
from agent.settings import Settings
from agent.state import STATE, AgentState
from agent.sync.deploy import DeployManager
from agent.sync.outbox import Outbox, Quarantined
from agent.sync.service import SyncParts, SyncService, file_sha256
from localdb import Database, open_database
from policies import packaged
from registry.service import Registry, open_registry

DEFAULT_SELECTION_POLICY = packaged("selection.yaml")

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
    state_dir = settings.state
    check_home(state_dir.home)
    db = open_database(state_dir.db)
    registry = open_registry(state_dir, db)
    metrics = Metrics()
    resolver = ModelResolver(settings, registry)
    scheduler = Scheduler(
        settings.runtime,
        resolver.resolve,
        metrics,
        budget=lambda: resolver.memory_budget(_total_memory()),  # selection loads lazily
        lease=registry.lease,
    )
    sec = settings.security
    audit = AuditLog(
        db,
        open_device_key(state_dir.home),
        checkpoint_every=sec.audit_checkpoint_every,
        checkpoint_seconds=sec.audit_checkpoint_seconds,
        head_file=state_dir.audit_head,
        max_pending=sec.audit_queue_max,
    )
    policy = PolicyStore(  # invalid: refuse to start
        configured_policy_path(settings), self_uid=daemon_uid(state_dir.home)
    )
    security = Security(policy, TokenStore(db), audit_recorder(audit),
                        gate=AuditGate(audit, state_dir.home, sec.audit_min_free_bytes))
    if sec.audit_denial_window_seconds > 0:
        security.denials = DenialSummaries(security.record, sec.audit_denial_window_seconds)
    sync = _sync_service(settings, db, registry, scheduler, resolver, security, metrics)
    autobench = AutoBench(resolver, busy=scheduler.busy)
    if settings.bench.auto:

        async def bench_job() -> None:
            await asyncio.to_thread(autobench.run_once)

        sync.jobs.add("autobench", "background benchmark of unmeasured variants",
                      settings.bench.auto_interval_seconds, bench_job)
    if security.denials is not None:
        denials = security.denials

        async def denial_summaries() -> None:
            denials.sweep()  # quick: counts in memory, appends to the audit queue

        sync.jobs.add("audit-denials", "summaries of repeated denials",
                      max(1.0, sec.audit_denial_window_seconds / 4), denial_summaries)
    state = AgentState(
        settings=settings,
        db=db,
        registry=registry,
        scheduler=scheduler,
        metrics=metrics,
        resolver=resolver,
        security=security,
        audit=audit,
        sync=sync,
        autobench=autobench,
    )
    app = web.Application(
        client_max_size=settings.server.max_body_bytes,
        # limits outside errors: error responses are sent within the write deadline too
        middlewares=[metrics_middleware, limits_middleware(settings.server, metrics),
                     error_middleware, stopping_middleware,
                     bodies.read_within(settings.server.body_timeout_seconds)],
    )
    app[STATE] = state
    add_routes(app, health.ROUTES + openai.ROUTES + responses.ROUTES + embeddings.ROUTES
               + agent_api.ROUTES)
    install_access(app, security)
    tasks.install(app)
    app.cleanup_ctx.append(_lifespan(state, t0))
    return app


def _sync_service(
    settings: Settings,
    db: Database,
    registry: Registry,
    scheduler: Scheduler,
    resolver: ModelResolver,
    security: Security,
    metrics: Metrics,
) -> SyncService:
    """The fleet link and the jobs, wired to the parts they read (through callables: the
    sync package imports nothing above it)."""
    from agent.security.keys import load_or_create_tls_key, tls_key_path

    if not tls_key_path(settings.home).exists():  # first start: the device gets its TLS key
        load_or_create_tls_key(settings.home)

    def models() -> list[dict[str, Any]]:
        active = {m.alias: m.variant for m in scheduler.loaded()}
        return [{"alias": m.alias, "task": m.task, "active": active.get(m.alias),
                 "pinned": m.active_variant,
                 "variants": [{"name": v.name, "format": v.format,
                               "quantization": v.quantization, "sha256": v.sha256}
                              for v in m.variants]} for m in registry.list_models()]

    def hardware() -> dict[str, Any]:
        p = resolver.profile()
        return {"arch": p.cpu.arch, "cpu": p.cpu.model, "cores": p.cpu.cores_logical,
                "memory_bytes": p.memory.total_bytes, "board": p.board,
                "gpus": [g.name for g in p.gpus], "npus": [n.name for n in p.npus],
                "backends": list(p.runtimes.backends or ())}

    def audit(action: str, resource: str, decision: str, outcome: str,
              details: dict[str, Any]) -> None:
        security.record("agent:sync", action, resource, decision, outcome, details)

    sync_cfg = settings.sync
    service: SyncService | None = None

    def quarantined(found: Sequence[Quarantined]) -> None:
        if service is not None:
            service.on_quarantine(found)

    outbox = Outbox(
        db,
        quotas={"telemetry": sync_cfg.quota_telemetry_bytes},
        alarms={"audit": sync_cfg.alarm_audit_bytes, "deploy": sync_cfg.alarm_deploy_bytes},
        on_quarantine=quarantined,
    )
    parts = SyncParts(
        loaded=lambda: {m.alias: m.queue_depth for m in scheduler.loaded()},
        models=models,
        hardware=hardware,
        policy_hashes=lambda: {"rbac": security.policy.digest,
                               "selection": file_sha256(selection_policy_path(settings)
                                                        or DEFAULT_SELECTION_POLICY)},
        audit=audit,
        gc=registry.gc,
    )
    service = SyncService(settings, outbox, metrics, parts)
    service.deploy = DeployManager(settings, db, registry, resolver, scheduler, security,
                                   outbox, audit)
    return service


def check_home(home: Path) -> None:
    """Refuse a state directory another account owns: `uid: self` in the policy means the
    owner of the home (agent.security.authz.daemon_uid), and another account's files are
    not ours to trust."""
    home.mkdir(parents=True, exist_ok=True, mode=0o750)
    owner = home.stat().st_uid
    if owner != os.geteuid():
        raise SettingsError(
            f"state directory {home} belongs to uid {owner}, not to this process (uid "
            f"{os.geteuid()}); run the agent as its owner or choose another EDGE_AGENT_HOME"
        )


def _total_memory() -> int:
    """Physical RAM in bytes (sysconf: no extra module in the daemon's footprint)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _lifespan(state: AgentState, t0: float) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifespan(app: web.Application) -> AsyncIterator[None]:
        await asyncio.to_thread(warm_up, state)
        await state.scheduler.start()
        await state.sync.start()
        state.ready = True
        log.info("ready in %.0f ms (home %s)", (time.monotonic() - t0) * 1000, state.settings.home)
        try:
            yield
        finally:
            await shutdown(state)

    return lifespan


def warm_up(state: AgentState) -> None:
    """What the first request would otherwise pay for, done before the socket accepts
    (READY=1 follows): the hardware probe and the selection policy with its modules, both
    read once and kept (0.2-0.3 s on a 2-core device, paid inside the first answer when
    they were lazy); and the installed aliases, the only model names metrics label. A
    failure here is logged and left to the first request to meet again."""
    try:
        state.resolver.profile()
        state.resolver.memory_budget(_total_memory())  # the policy and selection's modules
        state.scheduler.label_models(state.registry.aliases())
    except Exception:
        log.warning("warming up failed; the first request will try again", exc_info=True)


async def shutdown(state: AgentState) -> None:
    """Stop taking work, end generations, close the database. Safe to call twice."""
    if state.closed:
        return
    state.closed = state.stopping = True
    state.autobench.stop()  # a measurement in progress ends before the jobs are awaited
    await state.sync.stop()
    await state.scheduler.close(state.settings.server.shutdown_grace_seconds)
    if state.security.denials is not None:
        state.security.denials.flush()  # counted repeats become summary records
    state.audit.close()  # flushes: every decision made so far is durable
    state.registry.close()
    state.db.close()
