"""Admission and execution: the per-model queue (429 beyond it), one call at a time per
model in its own thread, cancellation, and the close protocol. The API's entry point:
`generate` streams a completion, `run` makes any other call (embeddings, scoring) on the
model's thread, through the same admission, queue and lane.

A GGUF model batches: up to `runtime.parallel` requests generate together on the shared
compute thread (`agent.runtime.batching`), more wait in its engine's FIFO. Any other
backend runs one call at a time in its resident thread, the rest waiting in a FIFO lane.
Beyond running + `queue_size` requests, a model answers 429. `Residency` decides what is
loaded; this module decides who runs.

A request holds its place (admission, the lane) until its generation ends, not until its
caller has read the last chunk: the chunks are produced by then, and a client that stops
reading used to keep a model's slot for as long as its socket stayed open ([hardening]
finding 3; the API bounds that wait with `server.write_timeout_seconds`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import threading
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from agent.errors import (
    ChatNotSupported,
    InvalidSampling,
    PromptTooLong,
    QueueFull,
    Stopping,
    TaskNotSupported,
)
from agent.metrics import Metrics
from agent.runtime.backend import Backend, Loader, load_backend
from agent.runtime.compute import deliver
from agent.runtime.residency import Lane, Lease, Residency, Resident
from agent.runtime.types import Chunk, GenerationRequest, LoadedModel, ResolvedModel
from agent.settings import RuntimeSettings

_DONE = object()  # the worker's end-of-stream marker
# Errors of the request or the moment, not of the model: they never count against it.
_NOT_THE_MODELS_FAULT = (QueueFull, Stopping, PromptTooLong, ChatNotSupported,
                         TaskNotSupported, InvalidSampling)
T = TypeVar("T")


@dataclass(eq=False)
class _Call:
    """One admitted request on a model: its resident, its running thread, its stop flag."""

    alias: str
    resident: Resident | None = None
    worker: asyncio.Future[Any] | None = None
    cancel: threading.Event | None = None
    ended: bool = False  # its admission and lane use are given back


class _Chunks(asyncio.Queue[Any]):
    """A generation's chunks on their way to its caller; `ended` runs as the end-of-stream
    marker arrives, whether or not the caller has read what came before it."""

    def __init__(self, ended: Callable[[], None]) -> None:
        super().__init__()
        self._ended = ended

    def put_nowait(self, item: Any) -> None:
        super().put_nowait(item)
        if item is _DONE:
            self._ended()


class Scheduler:
    """Loads (through `Residency`), admits and runs requests for the API."""

    def __init__(
        self,
        settings: RuntimeSettings,
        resolve: Callable[[str], ResolvedModel],
        metrics: Metrics,
        *,
        budget: int | Callable[[], int],
        lease: Lease | None = None,
        clock: Callable[[], float] = time.monotonic,
        loader: Loader | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._admitted: dict[str, int] = {}  # requests per alias not yet finished
        # Aliases that resolved to an installed model: only these get metric series, so a
        # request for a misspelt name does not create one forever (Prometheus keeps a
        # label set once made).
        self._known: set[str] = set()
        self.residency = Residency(
            loader or functools.partial(load_backend, settings=settings, metrics=metrics),
            resolve,
            metrics,
            budget=budget,
            max_loaded=settings.max_loaded_models,
            default_keep_alive=settings.keep_alive_seconds,
            pending=self.queue_depth,
            lease=lease,
            clock=clock,
        )
        self._closed: asyncio.Event | None = None
        # Told of every failure that is the model's (load, generation), e.g. a deployment
        # watching a newly switched variant.
        self.failures: list[Callable[[str, BaseException], None]] = []

    @property
    def budget(self) -> int:
        return self.residency.budget()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the keep-alive task."""
        self.residency.start()

    async def close(self, grace: float = 0) -> None:
        """Refuse new requests, give running ones `grace` seconds, stop the rest, unload all."""
        if self._closed is not None:
            await self._closed.wait()
            return
        self._closed = asyncio.Event()
        res = self.residency
        res.closing = True
        try:
            await res.stop_ticker()
            deadline = time.monotonic() + grace
            while any(r.lane.serving() for r in res.residents()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                await res.wait_activity(left)
            for r in res.residents():
                if r.lane.cancel is not None:
                    r.lane.cancel.set()
                for cancel in r.lane.cancels:
                    cancel.set()
            await res.close_all()
        finally:
            self._closed.set()

    # -- reading -----------------------------------------------------------------------

    def loaded(self) -> list[LoadedModel]:
        return [self.residency.describe(r, self.queue_depth(r.alias))
                for r in self.residency.residents()]

    def busy(self) -> bool:
        """Whether any request is waiting or running (background work yields to it)."""
        return bool(self._admitted)

    def queue_depth(self, alias: str) -> int:
        """Requests for `alias` waiting or running (as the queue-depth gauge counts them)."""
        return self._admitted.get(alias, 0)

    # -- control -----------------------------------------------------------------------

    async def load(self, alias: str, keep_alive: float | None = None) -> LoadedModel:
        """Load `alias` now (if it is not loaded) and set its keep-alive (None: default)."""
        self.residency.check_open()
        self._admit(alias, limit=False)
        try:
            r = await self.residency.ensure(alias, keep_alive)
            self._loaded_once(alias)
            r.last_used = self.residency.clock()
            return self.residency.describe(r, self.queue_depth(alias))
        finally:
            self._release(alias)

    async def unload(self, alias: str) -> bool:
        """Unload `alias` once its requests are done; False if it was not loaded."""
        return await self.residency.unload(alias)

    async def load_candidate(self, key: str, resolved: ResolvedModel) -> LoadedModel:
        """Load a variant beside the one serving its alias, under `key` (a deployment's
        smoke test); it stays until `promote` or `unload(key)`."""
        self.residency.check_open()
        self._admit(key, limit=False)
        try:
            r = await self.residency.ensure(key, -1, resolved)
            return self.residency.describe(r, self.queue_depth(key))
        finally:
            self._release(key)

    async def promote(self, key: str, alias: str) -> None:
        """Switch `alias` to the candidate loaded under `key`, with no gap in service."""
        await self.residency.promote(key, alias)

    async def expire_idle(self) -> list[str]:
        return await self.residency.expire_idle()

    # -- requests ----------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        """Stream `request`'s chunks, loading the model first if needed.

        Raises QueueFull, ModelLoadFailed, Stopping (and the registry's ModelNotFound)
        before the first chunk. Closing the iterator early stops the generation."""
        alias = request.model
        request = self._bounded(request)
        started = time.perf_counter()
        async with self._call(alias, request.keep_alive) as call:
            call.cancel = cancel = threading.Event()
            loop = asyncio.get_running_loop()
            # The generation's end gives its place back, even while its caller is still
            # writing (or failing to write) the chunks to a client.
            queue = _Chunks(functools.partial(self._end, call))
            r = call.resident
            assert r is not None
            batching = getattr(r.backend, "start", None)
            if batching is None and request.n > 1:
                raise InvalidSampling(f"model {alias} runs one sequence at a time: n above 1 "
                                      "needs a GGUF model", "n")
            if batching is not None:  # joins the model's running batch
                put = _putter(loop, queue, cancel)
                r.lane.cancels.add(cancel)
                try:
                    await loop.run_in_executor(r.executor, batching, request, cancel, put, put,
                                               functools.partial(put, _DONE))
                except BaseException:
                    r.lane.cancels.discard(cancel)
                    raise
            else:
                await self._start(call, _work, r.backend, request, cancel, loop, queue)
            first = True
            left = request.n if batching is not None else 1  # choices not yet finished
            try:
                while True:
                    item = await queue.get()
                    if item is _DONE:
                        break
                    if isinstance(item, BaseException):
                        raise item
                    if first:
                        first = False
                        self._metrics.ttft.labels(model=alias).observe(
                            time.perf_counter() - started)
                    yield item
                    if item.finish_reason is not None:
                        left -= 1
                        if left == 0:
                            break
            finally:
                r.lane.cancels.discard(cancel)
            if cancel.is_set() and left:
                raise Stopping("the agent is shutting down")

    def _bounded(self, request: GenerationRequest) -> GenerationRequest:
        """`request` with max_tokens at most `runtime.max_tokens_ceiling`: a request that
        sets none (OpenAI's "up to the context") or more is cut there with finish_reason
        length, as the context window cuts it, so no request generates for minutes by
        default. Enforced here, where every generating route passes."""
        ceiling = self._settings.max_tokens_ceiling
        asked = request.sampling.max_tokens
        if not ceiling or (asked is not None and asked <= ceiling):
            return request
        sampling = request.sampling.model_copy(update={"max_tokens": ceiling})
        return request.model_copy(update={"sampling": sampling})

    async def run(
        self, alias: str, fn: Callable[..., T], *args: Any, keep_alive: float | None = None
    ) -> T:
        """`fn(backend, *args)` on `alias`'s own thread, through the same queue as a
        generation (QueueFull past queue_size), loading the model first if needed: how
        embeddings, scoring and benchmarks reach a model."""
        async with self._call(alias, keep_alive) as call:
            r = call.resident
            assert r is not None
            if getattr(r.backend, "start", None) is not None:
                # The shared compute thread runs it between decode steps: no lane to take.
                loop = asyncio.get_running_loop()
                result: T = await asyncio.shield(
                    loop.run_in_executor(r.executor, fn, r.backend, *args))
                return result
            worker = await self._start(call, fn, r.backend, *args)
            result = await asyncio.shield(worker)
            return result

    @contextlib.asynccontextmanager
    async def _call(self, alias: str, keep_alive: float | None) -> AsyncIterator[_Call]:
        """One admitted call on `alias`: admission, load, the lane's user count; on exit
        its worker is stopped (`cancel`) and waited for, so the lane is free when the
        caller moves on, and a keep_alive of 0 unloads the model."""
        res = self.residency
        res.check_open()
        self._admit(alias, limit=True)
        call = _Call(alias)
        try:
            call.resident = r = await res.ensure(alias, keep_alive)
            self._loaded_once(alias)
            r.lane.users += 1
            yield call
        except Exception as exc:
            if not isinstance(exc, _NOT_THE_MODELS_FAULT):
                for listener in self.failures:
                    listener(alias, exc)
            raise
        finally:
            if call.cancel is not None:
                call.cancel.set()  # no-op when the generation finished; stops it otherwise
            interrupted = False
            if call.worker is not None and not call.worker.done():
                # Wait (within a token step) so the lane is free when the caller moves on;
                # if cancelled meanwhile, the done-callback still frees it.
                try:
                    await asyncio.shield(call.worker)
                except asyncio.CancelledError:
                    interrupted = True
                except Exception:  # noqa: S110 - the caller already has the worker's error
                    pass
            self._end(call)
            used = call.resident
            if interrupted:
                raise asyncio.CancelledError
            if used is not None and used.keep_alive == 0 and not res.closing:
                # keep_alive 0: unloaded before the caller's loop ends (Ollama's semantics).
                await res.unload_if_idle(used)

    def _end(self, call: _Call) -> None:
        """Give back `call`'s admission and its use of the lane (once): when its generation
        ends, or when its caller leaves, whichever comes first."""
        if call.ended:
            return
        call.ended = True
        used = call.resident
        if used is not None:
            used.lane.users -= 1
            used.last_used = self.residency.clock()
        self._release(call.alias)
        self.residency.notify()

    async def _start(self, call: _Call, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Take the lane (FIFO) and start `fn(*args)` in the model's thread; the lane is
        released when that thread is done, whatever the caller does meanwhile."""
        r = call.resident
        assert r is not None
        lane = r.lane
        await lane.lock.acquire()
        worker: asyncio.Future[Any] | None = None
        try:
            self.residency.check_open()
            loop = asyncio.get_running_loop()
            worker = loop.run_in_executor(r.executor, fn, *args)
            lane.worker, lane.cancel = worker, call.cancel
        finally:
            if worker is None:
                lane.lock.release()
            else:
                worker.add_done_callback(functools.partial(self._worker_done, lane))
        call.worker = worker
        return worker

    def _admit(self, alias: str, *, limit: bool) -> None:
        n = self._admitted.get(alias, 0)
        running = self._capacity(alias)
        if limit and n >= running + self._settings.queue_size:
            raise QueueFull(
                f"model {alias} has {n} requests in progress and its queue is full "
                f"({running} generating, queue_size {self._settings.queue_size}); retry later",
                retry_after=max(1, math.ceil(n / (2 * running))),
            )
        self._admitted[alias] = n + 1
        if alias in self._known:
            self._metrics.queue_depth.labels(model=alias).set(n + 1)

    def label_models(self, aliases: list[str]) -> None:
        """Models installed at start: their queue depth is a series from their first
        request (others become one once they resolve, see `_loaded_once`)."""
        self._known.update(aliases)

    def _loaded_once(self, alias: str) -> None:
        """`alias` resolved and loaded: an installed model, whose queue depth is a series
        from now on (set to what it is, since its admission was not counted)."""
        if alias not in self._known:
            self._known.add(alias)
            self._metrics.queue_depth.labels(model=alias).set(self.queue_depth(alias))

    def _capacity(self, alias: str) -> int:
        """Requests `alias` runs at once: its engine's slots when it is loaded and batches,
        else one."""
        r = self.residency.get(alias)
        engine = getattr(r.backend, "engine", None) if r is not None else None
        return int(getattr(engine, "parallel", 1)) if engine is not None else 1

    def _release(self, alias: str) -> None:
        n = self._admitted.get(alias, 1) - 1
        if n:
            self._admitted[alias] = n
        else:
            self._admitted.pop(alias, None)
        if alias in self._known:
            self._metrics.queue_depth.labels(model=alias).set(n)

    def _worker_done(self, lane: Lane, _worker: asyncio.Future[None]) -> None:
        lane.lock.release()
        self.residency.notify()


def _work(
    backend: Backend,
    request: GenerationRequest,
    cancel: threading.Event,
    loop: asyncio.AbstractEventLoop,
    queue: asyncio.Queue[Any],
) -> None:
    """Run the backend's generator in the model's thread, handing chunks to the loop."""

    put = _putter(loop, queue, cancel)
    try:
        chunks = backend.generate(request, cancel)
        try:
            for chunk in chunks:
                put(chunk)
                if cancel.is_set():
                    break
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:  # runs the generator's cleanup now, in this thread
                close()
    except BaseException as exc:
        put(exc)
    finally:
        put(_DONE)



def _putter(
    loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any], cancel: threading.Event
) -> Callable[[object], None]:
    """A callable that hands items from a model's thread to a queue on the event loop."""
    box = _mailbox(loop)

    def put(item: object) -> None:
        box.put(queue, item, cancel)

    return put


class _Mailbox:
    """Items from model threads to queues on one event loop, delivered in one hop per batch.

    A decode step yields a token for each running stream; handing each over with its own
    `call_soon_threadsafe` woke the loop (a pipe write, a GIL hand-over) once per stream and
    token, CPU taken from llama.cpp's threads on a 2-core device (bench/concurrency.py row
    (b)). Items are appended here, and the first one of a batch schedules the drain: at
    the end of the decode step when it comes from one (`compute.deliver`), at once
    otherwise."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue[Any], object, threading.Event]] = []
        self._scheduled = False

    def put(self, queue: asyncio.Queue[Any], item: object, cancel: threading.Event) -> None:
        with self._lock:
            self._items.append((queue, item, cancel))
            if self._scheduled:
                return
            self._scheduled = True
        deliver(self._schedule)

    def _schedule(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is gone: nobody is listening any more
            with self._lock:
                items, self._items = self._items, []
            for _queue, _item, cancel in items:
                cancel.set()

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for queue, item, _cancel in items:
            queue.put_nowait(item)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = (
    weakref.WeakKeyDictionary())
_mailboxes_lock = threading.Lock()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    with _mailboxes_lock:
        box = _mailboxes.get(loop)
        if box is None:
            box = _mailboxes[loop] = _Mailbox(loop)
        return box
