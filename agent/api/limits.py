"""What one client may hold: requests in progress per peer, and how long a write waits.

A client that sent a streamed request and never read kept its handler, and with it its
model's queue slot, for as long as its socket stayed open: nine such streams blocked a
model for every caller ([hardening] finding 3). The scheduler now frees the slot when the
generation ends; this module bounds the rest:

- `limits_middleware` counts the requests each peer (`agent.server.peer_name`: the
  kernel-verified uid on the socket, the address over TCP) has in progress and answers 429
  beyond `server.max_requests_per_peer`; health checks are not counted. It also sends a
  handler's finished response itself, within the write deadline.
- `EventStream`, the responses that stream (SSE): a write that has to wait for the client
  waits at most `server.write_timeout_seconds`. Past it the connection is aborted, the
  timeout counted (`edge_agent_write_timeouts_total`) and logged, and `WriteTimeout`
  raised, by that write and any later one; the handler ends, which stops its generation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from agent.api.errors import APIError, error_response
from agent.api.routes import PUBLIC, route_spec
from agent.metrics import Metrics
from agent.server import peer_name
from agent.settings import ServerSettings
from agent.state import STATE

__all__ = ["EventStream", "WriteTimeout", "limits_middleware"]

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Bytes a write may add beyond its data (chunk framing, headers sent with the first chunk)
# for the fast path below to still know it cannot reach the transport's high-water mark.
_FRAMING = 4096


class WriteTimeout(APIError):
    """The client did not read the response in time; its connection is closed (408, in
    the audit record: the response itself could not be sent)."""

    def __init__(self, timeout: float) -> None:
        super().__init__(408, f"the client did not read the response within {timeout:g} s "
                         "(server.write_timeout_seconds); connection closed",
                         code="write_timeout")


def _abort(request: web.Request, metrics: Metrics, timeout: float) -> WriteTimeout:
    """Close the connection of a client that stopped reading; count and log it."""
    spec = route_spec(request)
    route = spec.path if spec is not None else "unmatched"
    peer = peer_name(request)  # before the abort: it reads the socket's credentials
    transport = request.transport
    if transport is not None:
        transport.abort()  # drops what is buffered: the client was not reading it
    metrics.write_timeouts.labels(route=route).inc()
    log.warning("%s %s: %s did not read its response for %g s "
                "(server.write_timeout_seconds): connection closed",
                request.method, route, peer, timeout)
    return WriteTimeout(timeout)


class EventStream(web.StreamResponse):
    """A streamed (server-sent events) response whose writes wait at most
    `server.write_timeout_seconds` for the client to read."""

    def __init__(self, request: web.Request) -> None:
        super().__init__(headers={"Content-Type": "text/event-stream",
                                  "Cache-Control": "no-cache"})
        state = request.app[STATE]
        self._request = request
        self._timeout = state.settings.server.write_timeout_seconds
        self._metrics = state.metrics
        self._failed: WriteTimeout | None = None

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._failed is not None:
            raise self._failed
        if self._cannot_wait(len(data)):
            await super().write(data)
        else:
            await self._within(super().write(data))

    async def write_eof(self, data: bytes = b"") -> None:
        if self._failed is None:  # else the connection is gone: nothing left to finish
            await self._within(super().write_eof(data))

    def _cannot_wait(self, size: int) -> bool:
        """Whether writing `size` bytes leaves the transport's buffer below its high-water
        mark, so that aiohttp's drain returns at once: the usual case, taken without a
        timer (a token's event costs microseconds that the model's threads need)."""
        transport = self._request.transport
        if transport is None or self._request.protocol.writing_paused:
            return False
        high = transport.get_write_buffer_limits()[1]
        return transport.get_write_buffer_size() + size + _FRAMING <= high

    async def _within(self, write: Awaitable[None]) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await write
        except TimeoutError:
            self._failed = _abort(self._request, self._metrics, self._timeout)
            raise self._failed from None


def limits_middleware(settings: ServerSettings, metrics: Metrics) -> Middleware:
    """The per-peer cap and the write deadline of whole responses; place it outside
    `error_middleware`, so error responses are sent within the deadline too."""
    cap = settings.max_requests_per_peer
    timeout = settings.write_timeout_seconds
    in_progress: dict[str, int] = {}  # peer → requests it has in progress

    async def sent(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
        """`resp` sent within the deadline, unless its handler has streamed it already."""
        if resp.prepared:
            return resp
        try:
            async with asyncio.timeout(timeout):
                await resp.prepare(request)
                await resp.write_eof()
        except TimeoutError:
            _abort(request, metrics, timeout)
        except ConnectionError:
            pass  # the client left (or was cut off mid-stream): nobody to send it to
        return resp

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        spec = route_spec(request)
        if spec is not None and spec.permission == PUBLIC:  # health checks always answer
            return await sent(request, await handler(request))
        peer = peer_name(request)
        held = in_progress.get(peer, 0)
        if held >= cap:
            metrics.peer_limited.inc()
            return await sent(request, error_response(APIError(
                429, f"{peer} has {held} requests in progress, the most one client may "
                "have (server.max_requests_per_peer); retry when one has finished",
                type="rate_limit_error", code="too_many_requests_per_peer",
                headers={"Retry-After": "1"})))
        in_progress[peer] = held + 1
        try:
            return await sent(request, await handler(request))
        finally:
            left = in_progress[peer] - 1
            if left:
                in_progress[peer] = left
            else:
                del in_progress[peer]

    return middleware
