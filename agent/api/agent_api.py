"""The agent's own API under /agent/v1: device, registry, selection, load/unload, ps."""

from __future__ import annotations

import asyncio

from aiohttp import web

from agent.api.access import SECURITY, SUBJECT
from agent.api.errors import APIError
from agent.api.openai import parse_keep_alive, read_json
from agent.api.routes import PUBLIC, RouteSpec
from agent.security.authz import held_bindings
from agent.server import peer_credentials
from agent.state import STATE


async def whoami(request: web.Request) -> web.Response:
    """Who the policy sees: the subject every other route would authorize, its roles and
    how it was established, plus the connection's kernel credentials.

    A bearer token replaces the uid identity (access.py verifies it for this route too),
    so a token caller is told `token:NAME` and the token's role, not its uid's bindings."""
    cred = peer_credentials(request)
    subject = request.get(SUBJECT)
    body: dict[str, object] = {"transport": "tcp" if cred is None else "unix"}
    if subject is None:  # TCP without a token: nobody the policy knows
        body.update(authentication="none", roles=[], bindings=[])
        return web.json_response(body)
    held = held_bindings(request.app[SECURITY].policy.policy, subject)
    body["subject"] = subject.display
    body["authentication"] = "token" if subject.kind == "token" else "peer_credentials"
    if subject.kind == "token":
        body["token"] = subject.token
        body["token_role"] = subject.role
    else:
        body["groups"] = sorted(subject.groups)
    body["roles"] = sorted({h.role for h in held})
    body["bindings"] = [{"binding": h.binding, "role": h.role,
                         "models": sorted(h.models) if h.models is not None else None}
                        for h in held]
    if cred is not None:  # the kernel's view of the connection (audited with a token too)
        body.update(pid=cred.pid, uid=cred.uid, gid=cred.gid)
    return web.json_response(body)


async def device(request: web.Request) -> web.Response:
    state = request.app[STATE]
    profile = await asyncio.to_thread(state.resolver.profile)
    return web.json_response(profile.model_dump(mode="json"))


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    rows = await asyncio.to_thread(state.registry.list_models)
    return web.json_response({"models": [m.model_dump(mode="json") for m in rows]})


async def model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    alias = request.match_info["alias"]
    info = await asyncio.to_thread(state.registry.get, alias)
    body = info.model_dump(mode="json")
    try:
        sel = await asyncio.to_thread(state.resolver.selection, alias)
        body["selection"] = sel.model_dump(mode="json")
    except Exception as exc:
        body["selection"] = {"error": str(exc)}
    return web.json_response(body)


async def load(request: web.Request) -> web.Response:
    state = request.app[STATE]
    alias = request.match_info["alias"]
    body = await read_json(request) if request.can_read_body else {}
    if not isinstance(body, dict):
        raise APIError(400, "body must be a JSON object")
    try:
        keep_alive = parse_keep_alive(body.get("keep_alive"))
    except ValueError as exc:
        raise APIError(400, str(exc), param="keep_alive") from exc
    loaded = await state.scheduler.load(alias, keep_alive)
    return web.json_response(loaded.model_dump(mode="json"))


async def unload(request: web.Request) -> web.Response:
    state = request.app[STATE]
    alias = request.match_info["alias"]
    done = await state.scheduler.unload(alias)
    return web.json_response({"model": alias, "unloaded": done})


async def loaded(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(
        {"models": [m.model_dump(mode="json") for m in state.scheduler.loaded()]}
    )


async def audit_tail(request: web.Request) -> web.Response:
    """The newest audit records, after flushing what is pending (so a client sees its own)."""
    from agent.security import audit as auditlog

    state = request.app[STATE]
    try:
        n = int(request.query.get("n", "50"))
    except ValueError:
        n = -1
    if not 1 <= n <= 1000:
        raise APIError(400, "n must be an integer from 1 to 1000", param="n")
    await asyncio.to_thread(state.audit.flush, 10.0)
    records = await asyncio.to_thread(auditlog.tail, state.db, n)
    return web.json_response({"records": [r.to_dict() for r in records]})


async def sync_status(request: web.Request) -> web.Response:
    """The fleet link: enrollment, connection state and why, backlog, drops, alarms."""
    state = request.app[STATE]
    return web.json_response(await asyncio.to_thread(state.sync.status))


async def jobs(request: web.Request) -> web.Response:
    """The scheduled jobs: period, runs, failures, last and next run."""
    state = request.app[STATE]
    return web.json_response({"jobs": [j.as_json() for j in state.sync.jobs.info()]})


ROUTES = [
    RouteSpec("GET", "/agent/v1/whoami", whoami, PUBLIC, identifies=True),
    RouteSpec("GET", "/agent/v1/device", device, "device:read"),
    RouteSpec("GET", "/agent/v1/models", models, "models:read"),
    RouteSpec("GET", "/agent/v1/models/{alias}", model, "models:read", model_scoped=True),
    RouteSpec("POST", "/agent/v1/models/{alias}/load", load, "models:load", model_scoped=True),
    RouteSpec("POST", "/agent/v1/models/{alias}/unload", unload, "models:load", model_scoped=True),
    RouteSpec("GET", "/agent/v1/loaded", loaded, "models:read"),
    RouteSpec("GET", "/agent/v1/audit", audit_tail, "audit:read"),
    RouteSpec("GET", "/agent/v1/sync", sync_status, "device:read"),
    RouteSpec("GET", "/agent/v1/jobs", jobs, "device:read"),
]
