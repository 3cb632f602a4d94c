"""The one enforcement path: authenticate, authorize and audit every API request.

`access_middleware` runs after routing, so it knows the matched route's `RouteSpec`:
unmatched requests (404/405) pass through to the error handler, PUBLIC routes are open,
every other route needs a subject the policy grants the route's permission to. Handlers
never check access themselves; they find the caller in `request[SUBJECT]`.

Identity: a bearer token when the request carries one (over the Unix socket it replaces
the uid identity, since containers share uids), else the connection's SO_PEERCRED. Over
TCP a valid token is required.

Audit: denials, failed token checks, every allowed non-GET request and every inference
call (model, token usage, latency; never prompt or completion text), and audit reads.
Repeated denials of a (peer, route, reason) are counted into summary records
(`Security.deny`), and work that must be audited is refused with 503 while the audit log
cannot take it (`Security.admit`: backlog full, writer failing, disk below its watermark).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from agent.api import bodies
from agent.api.errors import APIError, to_api_error
from agent.api.routes import PUBLIC, RouteSpec, add_routes, route_spec
from agent.errors import ExpiredToken, RevokedToken, TokenAttemptsExceeded, TokenError
from agent.security.authz import Decision, authorize
from agent.security.identity import Subject, token_subject
from agent.security.service import Security
from agent.security.tokens import TOKEN_PREFIX
from agent.server import peer_credentials, peer_name
from agent.terminal import printable
from registry.service import ALIAS_RE, ALIAS_RULE

__all__ = [
    "DECISION",
    "END_USER",
    "MODEL",
    "POLICY_ROUTES",
    "SECURITY",
    "SUBJECT",
    "USAGE",
    "access_middleware",
    "install_access",
    "reload_policy",
]

log = logging.getLogger(__name__)
PATH_RECORDED = 256

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


SECURITY = web.AppKey("security", Security)
SUBJECT = web.RequestKey("subject", Subject)  # who is calling, for handlers
DECISION = web.RequestKey("decision", Decision)  # why they may
# Set by inference handlers for the audit record (plain "model"/"usage" keys are read too).
MODEL = web.RequestKey("model", str)
USAGE = web.RequestKey("usage", dict[str, int])
# The app's own end-user id (OpenAI's `user` / `safety_identifier`): kept in the audit record.
END_USER = web.RequestKey("end_user", str)
_UNAUTHENTICATED = {"WWW-Authenticate": 'Bearer realm="edge-agent"'}


def _auth_error(message: str, code: str) -> APIError:
    return APIError(401, message, type="authentication_error", code=code,
                    headers=_UNAUTHENTICATED)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise _auth_error("Authorization must be 'Bearer <token>'", "invalid_authorization")
    return value.strip()


async def _requested_model(request: web.Request) -> str:
    """The model alias a model-scoped request is about; "" if it names none."""
    alias = request.match_info.get("alias")
    if alias is not None:
        return alias
    if not request.can_read_body:
        return ""
    body = await request.read()  # cached by aiohttp: the handler reads it again
    try:
        data = bodies.loads(body)
    except APIError:  # the handler refuses it with the reason (if access allows it that far)
        return ""
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else ""


def _checked_alias(value: str | None) -> str | None:
    """`value` if it can be a model alias; else a 400 before anything is recorded: a newline
    or ESC in an alias used to reach `audit tail` raw and forge lines there, and 900 KB
    names made 2 MB records ([hardening] findings 1 and 4)."""
    if value and not ALIAS_RE.fullmatch(value):
        raise APIError(400, f"the model is not a valid alias: {ALIAS_RULE}",
                       code="invalid_value", param="model")
    return value


def _bounded_path(path: str) -> str:
    """The request path as the audit records it: at most PATH_RECORDED characters, control
    characters escaped (an 8,000-character path was stored whole, per request)."""
    cut = path[:PATH_RECORDED] + ("…" if len(path) > PATH_RECORDED else "")
    return printable(cut)


def _outcome(status: int) -> str:
    if status >= 500:
        return "server_error"
    return "client_error" if status >= 400 else "ok"


def access_middleware(security: Security) -> Middleware:
    """The access-control middleware; place it after `error_middleware` (inside it).

    `security.tokens` None disables bearer tokens (a request that sends one gets 401).
    """
    ids = security.identities
    tokens = security.tokens
    record = security.record
    admit = security.admit
    deny = security.deny

    async def authenticate(request: web.Request, spec: RouteSpec) -> Subject:
        cred = peer_credentials(request)
        token = _bearer(request)
        if token is not None and cred is not None and not token.startswith(TOKEN_PREFIX):
            # OpenAI clients always send some api_key; on the socket the kernel-verified
            # uid is the identity, so a value that is not one of our tokens is ignored.
            token = None
        if token is None:
            if cred is None:
                raise _auth_error("a bearer token is required over TCP", "missing_token")
            return ids.subject(cred)
        if tokens is None:
            raise _auth_error("API tokens are not enabled", "invalid_token")
        peer = peer_name(request)
        try:
            info = await tokens.averify(token, peer)
        except TokenError as exc:
            code = ("token_expired" if isinstance(exc, ExpiredToken)
                    else "token_revoked" if isinstance(exc, RevokedToken)
                    else "too_many_attempts" if isinstance(exc, TokenAttemptsExceeded)
                    else "invalid_token")
            limited = isinstance(exc, TokenAttemptsExceeded)
            who = ids.subject(cred) if cred is not None else None
            admit()  # a denial the log cannot take is a 503, not an unrecorded 401
            deny(peer, f"{request.method} {spec.path}", who, spec.permission,
                 _bounded_path(request.path), "unauthenticated",
                 {"method": request.method, "reason": str(exc), "code": code,
                  "status": 429 if limited else 401})
            if limited:
                raise to_api_error(exc) or _auth_error(str(exc), code) from exc
            raise _auth_error(str(exc), code) from exc
        return token_subject(info.name, info.role, cred)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        spec = route_spec(request)
        if spec is None:
            if request.match_info.http_exception is not None:
                return await handler(request)  # 404/405: the error handler answers
            # A route added without a RouteSpec has no permission: deny by default.
            log.error("route %s %s has no permission entry: denied", request.method,
                      request.match_info.route.resource and
                      request.match_info.route.resource.canonical)
            raise APIError(403, "this route declares no permission", type="permission_error",
                           code="forbidden")
        if spec.permission == PUBLIC:
            cred = peer_credentials(request)
            if spec.identifies and (cred is not None or "Authorization" in request.headers):
                # The identity every other route would see (a token replaces the uid).
                request[SUBJECT] = await authenticate(request, spec)
            elif cred is not None:
                request[SUBJECT] = ids.subject(cred)
            return await handler(request)
        subject = await authenticate(request, spec)
        policy = security.policy.policy
        decision = authorize(policy, subject, spec.permission)
        model: str | None = None
        if spec.model_scoped and decision.allowed and decision.models is not None:
            # Only a model-scoped grant depends on the model: read it only then.
            model = _checked_alias(await _requested_model(request))
            decision = authorize(policy, subject, spec.permission, model)
        elif spec.model_scoped:
            model = _checked_alias(request.match_info.get("alias"))
        resource = f"model:{model}" if model else _bounded_path(request.path)
        if not decision.allowed:
            admit()  # a denial the log cannot take is a 503, not an unrecorded 403
            deny(peer_name(request), f"{request.method} {spec.path}", subject, spec.permission,
                 resource, "denied",
                 {"method": request.method, "path": _bounded_path(request.path),
                  "reason": decision.reason, "status": 403})
            raise APIError(403, decision.reason, type="permission_error", code="forbidden")
        request[SUBJECT] = subject
        request[DECISION] = decision
        inference = spec.permission == "inference:invoke"
        if request.method in ("GET", "HEAD") and spec.permission != "audit:read":
            return await handler(request)
        admit()  # nothing is done that cannot be recorded
        t0 = time.perf_counter()
        status, outcome = 500, "server_error"
        try:
            resp = await handler(request)
            status, outcome = resp.status, _outcome(resp.status)
            return resp
        except asyncio.CancelledError:
            status, outcome = 499, "cancelled"  # the client went away
            raise
        except Exception as exc:
            err = to_api_error(exc)
            status = err.status if err is not None else 500
            outcome = _outcome(status)
            raise
        finally:
            details: dict[str, Any] = {
                "method": request.method, "path": _bounded_path(request.path), "status": status,
                "binding": decision.binding, "role": decision.role,
                "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
            }
            if inference:
                details["model"] = request.get(MODEL) or request.get("model") or model
                details["usage"] = request.get(USAGE) or request.get("usage")
                if (end_user := request.get(END_USER)) is not None:
                    details["end_user"] = end_user
                resource = f"model:{details['model']}" if details["model"] else resource
            record(subject, spec.permission, resource, "allow", outcome, details)

    return middleware


async def reload_policy(request: web.Request) -> web.Response:
    """POST /agent/v1/policy/reload: re-read the RBAC file; 400 if invalid (old one kept)."""
    security = request.app[SECURITY]
    ok, message = await asyncio.to_thread(security.reload_policy, request[SUBJECT])
    if not ok:
        raise APIError(400, message, code="invalid_policy")
    return web.json_response(
        {"reloaded": True, "message": message, "sha256": security.policy.digest}
    )


POLICY_ROUTES = [
    RouteSpec("POST", "/agent/v1/policy/reload", reload_policy, "policy:write"),
]


def install_access(app: web.Application, security: Security) -> None:
    """Add the middleware (innermost, after error/stopping), the policy routes, the app key."""
    app[SECURITY] = security
    app.middlewares.append(access_middleware(security))
    add_routes(app, POLICY_ROUTES)
