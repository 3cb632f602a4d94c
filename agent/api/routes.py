"""Route declarations: every route names the permission it needs, in one table.

The authorization layer reads `permission` from the matched route, so no handler checks
access itself. `PUBLIC` marks the few routes anyone connected may call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC = "public"


@dataclass(frozen=True, slots=True)
class RouteSpec:
    method: str
    path: str
    handler: Handler
    permission: str
    model_scoped: bool = False  # the permission is checked against the requested model too
    # PUBLIC, yet a bearer token sent is verified (401/429 like anywhere) and becomes the
    # subject: whoami must report the identity the policy would use, not the uid.
    identifies: bool = False


ROUTE_TABLE = web.AppKey("route_table", dict[str, RouteSpec])


def add_routes(app: web.Application, specs: list[RouteSpec]) -> None:
    """Register handlers and remember each route's spec, keyed by method and path."""
    table = app.setdefault(ROUTE_TABLE, {})
    for spec in specs:
        app.router.add_route(spec.method, spec.path, spec.handler)
        table[f"{spec.method} {spec.path}"] = spec


def route_spec(request: web.Request) -> RouteSpec | None:
    """The spec of the route this request matched (None for 404/405)."""
    info = request.match_info.route.resource
    if info is None:
        return None
    return request.app[ROUTE_TABLE].get(f"{request.match_info.route.method} {info.canonical}")
