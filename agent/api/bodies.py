"""Request bodies as JSON, bounded in nesting as aiohttp bounds them in size.

A 200 KB body of 100,000 nested arrays made `json.loads` raise RecursionError, which
surfaced as a 500 with a traceback ([hardening] finding 9); a body nested just below the
interpreter's limit parses, and then every recursive walk after it (pydantic, the JSON
Schema to grammar conversion, the audit's canonical form) risks the same. No OpenAI
request needs more than a few levels (a deep JSON Schema: a dozen), so anything nested
deeper than `MAX_DEPTH` is refused with a 400 before any of that runs.

`read_within` gives a body `server.body_timeout_seconds` from its headers to arrive: a client
that trickled its body a byte at a time used to hold its connection and its handler for as
long as it liked; now the read waiting for it fails with a 408 and the connection is
closed. A body larger than `server.max_body_bytes` gets a 413 that names the limit, before
a byte of it is read when its Content-Length says so. (A client trickling its headers is
cut off by aiohttp itself: its keep-alive timeout, `server.header_timeout_seconds`, set in
agent.daemon.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from agent.api.errors import APIError, error_response

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_DEPTH = 64


def loads(body: bytes) -> Any:
    """`body` parsed; APIError 400 if it is not JSON or is nested deeper than MAX_DEPTH."""
    import json

    try:
        data = json.loads(body)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise APIError(400, f"request body is not valid JSON: {exc}",
                       code="invalid_json") from exc
    if depth_exceeds(data, MAX_DEPTH):
        raise _too_deep()
    return data


def depth_exceeds(data: Any, limit: int) -> bool:
    """Whether containers in `data` nest deeper than `limit` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if level > limit:
            return True
        stack.extend((c, level + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _too_deep() -> APIError:
    return APIError(400, f"request body is nested deeper than {MAX_DEPTH} levels",
                    code="invalid_json")


class BodyTimeout(APIError):
    """The body was still arriving `server.body_timeout_seconds` after the headers (408)."""

    def __init__(self, timeout: float) -> None:
        super().__init__(408, f"the request body did not arrive within {timeout:g} s of its "
                         "headers (server.body_timeout_seconds); connection closed",
                         code="body_timeout")


def read_within(timeout: float) -> Middleware:
    """Middleware: a body still arriving `timeout` s after the headers fails the read
    waiting for it (or the next one) with 408, and the connection is closed; a body
    larger than the app's `client_max_size` gets a 413 that names the limit."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.can_read_body:
            return await handler(request)
        limit = request.client_max_size
        declared = request.content_length
        if limit and declared is not None and declared > limit:
            raise _too_large(limit, declared)  # before a byte of it is read
        payload = request.content

        def expire() -> None:
            if not payload.is_eof():
                payload.set_exception(BodyTimeout(timeout))

        # A timer, not a read here: handlers and the access check read the body where they
        # need it and go on telling a request with a body by `can_read_body`.
        timer = asyncio.get_running_loop().call_later(timeout, expire)
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(limit, None) from None
        except BodyTimeout as exc:
            return await _cut_off(request, exc)
        finally:
            timer.cancel()

    return middleware


def _too_large(limit: int, declared: int | None) -> APIError:
    size = f" ({declared} bytes)" if declared is not None else ""
    return APIError(413, f"request body too large{size}: the limit is {limit} bytes "
                    "(server.max_body_bytes)", code="body_too_large")


async def _cut_off(request: web.Request, exc: BodyTimeout) -> web.StreamResponse:
    """Answer 408 to a request whose body is still arriving, and close its connection (not
    wait for the rest of the body, as aiohttp would for up to its lingering time)."""
    log.info("%s %s: %s", request.method, request.path[:200], exc.message)
    resp = error_response(exc)
    resp.force_close()
    transport = request.transport
    try:
        async with asyncio.timeout(5):  # the client is slow: it may not be reading either
            await resp.prepare(request)
            await resp.write_eof()
    except TimeoutError:
        if transport is not None:
            transport.abort()  # drop what is buffered
    except ConnectionError:
        pass
    request.protocol.force_close()
    return resp
