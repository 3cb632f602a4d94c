"""Which routes a model's task serves, checked before a request reaches the scheduler.

A model's task (the registry's `chat`, `completion` or `embedding`) decides what it can
do. A request on a route its model cannot serve is a 400 (`unsupported_task`) that names
the routes the model does serve, answered before anything is loaded: loading an embedding
model to find out it cannot chat could evict another model or fail for memory, a 503 that
looked like an outage. A base model (`completion`) can be chatted with through its
template, but it continues text rather than answering: that request is served with an
`Edge-Agent-Warning` header, and the agent logs it once per model.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from aiohttp import web

from agent.api.access import MODEL
from agent.api.errors import APIError
from agent.state import STATE

log = logging.getLogger(__name__)

Route = Literal["chat", "completions", "responses", "embeddings"]

PATHS: dict[Route, str] = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "responses": "/v1/responses",
    "embeddings": "/v1/embeddings",
}
GENERATING: tuple[Route, ...] = ("chat", "completions", "responses")
SERVES: dict[str, tuple[Route, ...]] = {
    "chat": GENERATING,
    "completion": GENERATING,
    "embedding": ("embeddings",),
}
WARNING_HEADER = "Edge-Agent-Warning"
# Aliases whose base-model warning was logged (one line per model and daemon run).
WARNED: web.AppKey[set[str]] = web.AppKey("base_model_warned", set)
WARNING = web.RequestKey("task_warning", str)  # sent as WARNING_HEADER


def install(app: web.Application) -> None:
    """Give `app` the warned-once set and the hook that puts a request's warning in its
    response's headers (streams included: the hook runs as the headers are sent)."""
    app[WARNED] = set()
    app.on_response_prepare.append(_add_warning)


async def _add_warning(request: web.Request, response: web.StreamResponse) -> None:
    warning = request.get(WARNING)
    if warning is not None:
        response.headers[WARNING_HEADER] = warning


async def model_task(request: web.Request, alias: str) -> str:
    """The task of `alias`: from the loaded model when it is loaded (no database read on
    the hot path), else from the registry (ModelNotFound: 404)."""
    state = request.app[STATE]
    resident = state.scheduler.residency.get(alias)
    if resident is not None:
        return resident.resolved.task
    info = await asyncio.to_thread(state.registry.get, alias)
    return info.task


def routes_of(task: str) -> str:
    """The routes a model of `task` serves, as a person reads them."""
    paths = [PATHS[r] for r in SERVES.get(task, ())]
    return " and ".join([", ".join(paths[:-1]), paths[-1]]) if len(paths) > 1 else paths[0]


async def check_route(request: web.Request, alias: str, route: Route) -> None:
    """Refuse a request whose model cannot serve `route` (400 naming what it can serve);
    a base model asked to chat is served with a warning (logged once per model)."""
    request[MODEL] = alias  # the audit record names the model, refused or not
    task = await model_task(request, alias)
    if route not in SERVES.get(task, GENERATING):
        hint = ("; import an embedding model (or this file with --task embedding) for "
                "/v1/embeddings") if route == "embeddings" else ""
        raise APIError(400, f"model {alias} is {_a(task)} model: it serves "
                       f"{routes_of(task)}, not {PATHS[route]}{hint}",
                       param="model", code="unsupported_task")
    if task != "completion" or route == "completions":
        return
    warning = (f"model {alias} is a base (completion) model, not instruction-tuned: it "
               "continues the conversation's text rather than answering it; use a chat "
               "model for answers, or /v1/completions for raw text")
    warned = request.app[WARNED]
    if alias not in warned:
        warned.add(alias)
        log.warning("%s (said once per model; each response carries an %s header)",
                    warning, WARNING_HEADER)
    request[WARNING] = warning


def _a(task: str) -> str:
    return f"an {task}" if task[:1] in "aeiou" else f"a {task}"
