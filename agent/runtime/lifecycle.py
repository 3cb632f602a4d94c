"""Which models are loaded: load on demand, queue per model, keep-alive, memory budget, LRU.

One `ModelManager` per agent. Every model generates one request at a time (a llama.cpp
context is not thread-safe) in a worker thread; other requests for it wait in a bounded
FIFO queue, while different models generate concurrently. Loads run in threads too, so the
event loop keeps serving. Counts that decide eviction and expiry change only on the event
loop, between awaits, so they need no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.metrics import Metrics
from agent.runtime.types import (
    Chunk,
    GenerationRequest,
    LoadedModel,
    ModelLoadFailed,
    QueueFull,
    ResolvedModel,
    Stopping,
)
from agent.settings import RuntimeSettings
from registry.errors import RegistryError

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0  # how often idle models are checked against their keep-alive
_DONE = object()  # the worker's end-of-stream marker


class Backend(Protocol):
    """A loaded model as the manager drives it (`LlamaBackend` is one)."""

    def generate(self, request: GenerationRequest, cancel: threading.Event) -> Iterator[Chunk]:
        ...

    def details(self) -> dict[str, Any]:
        ...

    def close(self) -> None:
        ...


Loader = Callable[[ResolvedModel], Backend]


@dataclass(eq=False)
class _Slot:
    """A loaded model and who is using it."""

    resolved: ResolvedModel
    backend: Backend
    lease: contextlib.AbstractContextManager[Any] | None
    # The one thread that ever calls into this model. llama.cpp's OpenMP build keeps a
    # worker team per calling thread; a second caller doubles the teams and slows every
    # token by ~40% on a small device (measured in bench/serve.py).
    executor: ThreadPoolExecutor
    loaded_at: float  # wall clock, for display
    last_used: float  # manager clock
    keep_alive: float  # seconds; negative: forever
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # FIFO: the generation slot
    users: int = 0  # requests holding this slot (waiting or running)
    worker: asyncio.Future[None] | None = None  # the running generation's thread
    cancel: threading.Event | None = None  # stops the running generation
    draining: bool = False  # unload() waits for its requests; new ones wait for a reload

    def running(self) -> bool:
        return self.worker is not None and not self.worker.done()

    def serving(self) -> bool:
        return self.users > 0 or self.running()


class ModelManager:
    """Loads, schedules and unloads models for the API."""

    def __init__(
        self,
        settings: RuntimeSettings,
        resolve: Callable[[str], ResolvedModel],
        metrics: Metrics,
        *,
        total_memory: int,
        lease: Callable[[str], contextlib.AbstractContextManager[Any]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        loader: Loader | None = None,
    ) -> None:
        self._settings = settings
        self._resolve = resolve
        self._metrics = metrics
        self._lease = lease
        self._clock = clock
        self._loader = loader or self._load_llama
        if settings.memory_budget_bytes is not None:
            self.budget = settings.memory_budget_bytes
        else:
            self.budget = int(settings.memory_fraction * total_memory)
        self._slots: dict[str, _Slot] = {}
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._admitted: dict[str, int] = {}  # requests per alias not yet finished
        self._reserved: dict[str, int] = {}  # memory of loads in progress
        self._ticker: asyncio.Task[None] | None = None
        self._closing = False
        self._closed: asyncio.Event | None = None
        self._activity: asyncio.Event | None = None  # set when a request or load ends

    # -- public API --------------------------------------------------------------------

    async def start(self) -> None:
        """Start the task that unloads models past their keep-alive."""
        if self._ticker is None and not self._closing:
            self._ticker = asyncio.create_task(self._tick(), name="edge-agent-keepalive")

    async def close(self, grace: float = 0) -> None:
        """Refuse new requests, give running ones `grace` seconds, stop the rest, unload all."""
        if self._closed is not None:
            await self._closed.wait()
            return
        self._closed = asyncio.Event()
        self._closing = True
        try:
            if self._ticker is not None:
                self._ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._ticker
            deadline = time.monotonic() + grace
            while any(s.serving() for s in self._slots.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                await self._wait_activity(left)
            for slot in self._slots.values():
                if slot.cancel is not None:
                    slot.cancel.set()
            while self._reserved:  # loads in flight notice `_closing` and undo themselves
                await self._wait_activity(None)
            await self._close_slots(self._detach(list(self._slots)))
        finally:
            self._closed.set()

    def loaded(self) -> list[LoadedModel]:
        return [self._describe(alias, slot) for alias, slot in self._slots.items()]

    def queue_depth(self, alias: str) -> int:
        """Requests for `alias` waiting or running (as the queue-depth gauge counts them)."""
        return self._admitted.get(alias, 0)

    async def load(self, alias: str, keep_alive: float | None = None) -> LoadedModel:
        """Load `alias` now (if it is not loaded) and set its keep-alive (None: default)."""
        self._check_open()
        self._admit(alias, limit=False)
        try:
            slot = await self._ensure_loaded(alias, keep_alive)
            slot.last_used = self._clock()
            return self._describe(alias, slot)
        finally:
            self._release(alias)

    async def unload(self, alias: str) -> bool:
        """Unload `alias` once its requests are done; False if it was not loaded."""
        async with self._load_lock(alias):
            slot = self._slots.get(alias)
            if slot is None:
                return False
            slot.draining = True
            while slot.serving():
                await self._wait_activity(None)
            await self._close_slots(self._detach([alias]))
            return True

    async def expire_idle(self) -> list[str]:
        """Unload every idle model whose keep-alive has run out; returns their aliases."""
        now = self._clock()
        expired = [
            alias for alias, slot in self._slots.items()
            if self._idle(alias, slot) and slot.keep_alive >= 0
            and now >= slot.last_used + slot.keep_alive
        ]
        for alias in expired:
            log.info("unloading %s: idle past its keep-alive", alias)
        await self._close_slots(self._detach(expired))
        return expired

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        """Stream `request`'s chunks, loading the model first if needed.

        Raises QueueFull, ModelLoadFailed, Stopping (and the registry's ModelNotFound)
        before the first chunk. Closing the iterator early stops the generation."""
        self._check_open()
        alias = request.model
        started = time.perf_counter()
        self._admit(alias, limit=True)
        slot: _Slot | None = None
        cancel = threading.Event()
        worker: asyncio.Future[None] | None = None
        try:
            slot = await self._ensure_loaded(alias, request.keep_alive)
            slot.users += 1
            await slot.lock.acquire()
            try:
                self._check_open()
                loop = asyncio.get_running_loop()
                queue: asyncio.Queue[Any] = asyncio.Queue()
                worker = loop.run_in_executor(
                    slot.executor, self._work, slot.backend, request, cancel, loop, queue
                )
                slot.worker, slot.cancel = worker, cancel
            finally:
                if worker is None:
                    slot.lock.release()
                else:
                    # The slot is free when the thread is done, whatever the consumer does.
                    worker.add_done_callback(functools.partial(self._worker_done, slot))
            first = True
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                if first:
                    first = False
                    self._metrics.ttft.labels(model=alias).observe(time.perf_counter() - started)
                yield item
                if item.finish_reason is not None:
                    break
            if worker is not None and cancel.is_set():
                raise Stopping("the agent is shutting down")
        finally:
            cancel.set()  # no-op when the generation finished; stops it otherwise
            interrupted = False
            if worker is not None and not worker.done():
                # Wait (within a token step) so the slot is free when the caller moves on;
                # if cancelled meanwhile, the done-callback still frees it.
                try:
                    await asyncio.shield(worker)
                except asyncio.CancelledError:
                    interrupted = True
            if slot is not None:
                slot.users -= 1
                slot.last_used = self._clock()
            self._release(alias)
            self._notify()
            if interrupted:
                raise asyncio.CancelledError
            if slot is not None and slot.keep_alive == 0 and not self._closing:
                # keep_alive 0: unloaded before the caller's loop ends (Ollama's semantics).
                await self._unload_if_idle(alias, slot)

    # -- loading -----------------------------------------------------------------------

    def _load_llama(self, resolved: ResolvedModel) -> Backend:
        if resolved.format != "gguf":
            raise ModelLoadFailed(
                f"model {resolved.alias}: variant {resolved.variant} is {resolved.format}; "
                "only GGUF models can generate text"
            )
        from agent.runtime.llama import LlamaBackend

        return LlamaBackend.load(
            resolved,
            threads=self._settings.threads,
            n_ctx=self._settings.context_length,
            metrics=self._metrics,
        )

    def _load_lock(self, alias: str) -> asyncio.Lock:
        return self._load_locks.setdefault(alias, asyncio.Lock())

    async def _ensure_loaded(self, alias: str, keep_alive: float | None) -> _Slot:
        slot = self._slots.get(alias)
        if slot is None or slot.draining:
            # One load per alias: concurrent first requests wait here and share it.
            async with self._load_lock(alias):
                self._check_open()
                slot = self._slots.get(alias)
                if slot is None:
                    slot = await self._load_new(alias)
        # Like Ollama: each request sets the keep-alive; without one it is the default again.
        slot.keep_alive = self._settings.keep_alive_seconds if keep_alive is None else keep_alive
        return slot

    async def _load_new(self, alias: str) -> _Slot:
        resolved = self._resolve(alias)
        need = resolved.estimated_memory
        try:
            victims = self._make_room(alias, need)
        except ModelLoadFailed:
            self._metrics.load_failures.labels(model=alias).inc()
            raise
        for victim in victims:
            log.info("unloading %s (least recently used) to make room for %s", victim, alias)
        # Detached at once, so no request can pick a victim up while the others close.
        detached = self._detach(victims)
        self._reserved[alias] = need
        started = time.perf_counter()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{alias}")
        loop = asyncio.get_running_loop()
        try:
            await self._close_slots(detached)
            backend, lease = await loop.run_in_executor(executor, self._open, resolved)
        except BaseException as exc:
            executor.shutdown(wait=False)
            self._metrics.load_failures.labels(model=alias).inc()
            if isinstance(exc, ModelLoadFailed | RegistryError) or not isinstance(exc, Exception):
                raise
            raise ModelLoadFailed(f"model {alias}: load failed: {exc}") from exc
        finally:
            del self._reserved[alias]
            self._notify()
        if self._closing:  # close() began while this loaded; it is not waiting for us
            await loop.run_in_executor(executor, self._close_backend, backend, lease)
            executor.shutdown(wait=False)
            raise Stopping("the agent is shutting down")
        self._metrics.load_seconds.labels(model=alias).observe(time.perf_counter() - started)
        slot = _Slot(
            resolved=resolved,
            backend=backend,
            lease=lease,
            executor=executor,
            loaded_at=time.time(),
            last_used=self._clock(),
            keep_alive=self._settings.keep_alive_seconds,
        )
        self._slots[alias] = slot
        self._metrics.loaded_models.set(len(self._slots))
        log.info("loaded %s (%s) in %.2fs", alias, resolved.variant, time.perf_counter() - started)
        return slot

    def _open(
        self, resolved: ResolvedModel
    ) -> tuple[Backend, contextlib.AbstractContextManager[Any] | None]:
        """Enter the registry lease, then load; runs in a thread."""
        lease = self._lease(resolved.sha256) if self._lease is not None else None
        if lease is not None:
            lease.__enter__()
        try:
            return self._loader(resolved), lease
        except BaseException:
            if lease is not None:
                lease.__exit__(None, None, None)
            raise

    def _make_room(self, alias: str, need: int) -> list[str]:
        """Pick idle models to evict, least recently used first, so `need` bytes fit.

        Synchronous on purpose: nothing else can start using a victim before it is chosen."""
        if need > self.budget:
            raise ModelLoadFailed(
                f"model {alias} needs {_mb(need)}, more than the whole memory budget "
                f"({_mb(self.budget)})"
            )
        used = sum(s.resolved.estimated_memory for s in self._slots.values())
        used += sum(self._reserved.values())
        count = len(self._slots) + len(self._reserved)
        limit = self._settings.max_loaded_models
        idle = sorted(
            ((a, s) for a, s in self._slots.items() if self._idle(a, s)),
            key=lambda item: item[1].last_used,
        )
        victims: list[str] = []
        for victim, slot in idle:
            if used + need <= self.budget and count < limit:
                break
            victims.append(victim)
            used -= slot.resolved.estimated_memory
            count -= 1
        if used + need > self.budget or count >= limit:
            busy = [a for a, s in self._slots.items() if a not in victims and not self._idle(a, s)]
            busy_mem = sum(self._slots[a].resolved.estimated_memory for a in busy)
            raise ModelLoadFailed(
                f"model {alias} needs {_mb(need)}, budget {_mb(self.budget)}, "
                f"{_mb(busy_mem)} busy ({', '.join(busy) or 'loading'}); "
                f"{count} of at most {limit} models loaded"
            )
        return victims

    # -- unloading ---------------------------------------------------------------------

    def _idle(self, alias: str, slot: _Slot) -> bool:
        return not slot.serving() and self._admitted.get(alias, 0) == 0

    def _detach(self, aliases: list[str]) -> list[tuple[str, _Slot]]:
        """Take models out of service (synchronously); `_close_slots` frees them."""
        out = [(a, self._slots.pop(a)) for a in aliases if a in self._slots]
        self._metrics.loaded_models.set(len(self._slots))
        return out

    async def _close_slots(self, detached: list[tuple[str, _Slot]]) -> None:
        for alias, slot in detached:
            if slot.worker is not None:  # never free a model under a running thread
                with contextlib.suppress(BaseException):
                    await asyncio.shield(slot.worker)
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(
                    slot.executor, self._close_backend, slot.backend, slot.lease
                )
            except Exception:
                log.exception("error while unloading %s", alias)
            else:
                log.info("unloaded %s", alias)
            finally:
                slot.executor.shutdown(wait=False)

    @staticmethod
    def _close_backend(
        backend: Backend, lease: contextlib.AbstractContextManager[Any] | None
    ) -> None:
        try:
            backend.close()
        finally:
            if lease is not None:
                lease.__exit__(None, None, None)

    async def _unload_if_idle(self, alias: str, slot: _Slot) -> None:
        if self._slots.get(alias) is slot and self._idle(alias, slot):
            await self._close_slots(self._detach([alias]))

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                await self.expire_idle()
            except Exception:
                log.exception("keep-alive check failed")

    # -- requests ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing:
            raise Stopping("the agent is shutting down")

    def _admit(self, alias: str, *, limit: bool) -> None:
        n = self._admitted.get(alias, 0)
        if limit and n > self._settings.queue_size:  # one running + queue_size waiting
            raise QueueFull(
                f"model {alias} has {n} requests in progress and its queue is full "
                f"(queue_size {self._settings.queue_size}); retry later",
                retry_after=max(1, math.ceil(n / 2)),
            )
        self._admitted[alias] = n + 1
        self._metrics.queue_depth.labels(model=alias).set(n + 1)

    def _release(self, alias: str) -> None:
        n = self._admitted.get(alias, 1) - 1
        if n:
            self._admitted[alias] = n
        else:
            self._admitted.pop(alias, None)
        self._metrics.queue_depth.labels(model=alias).set(n)

    @staticmethod
    def _work(
        backend: Backend,
        request: GenerationRequest,
        cancel: threading.Event,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[Any],
    ) -> None:
        """Run the sync generator in this worker thread, handing chunks to the loop."""

        def put(item: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone: nobody is listening any more
                cancel.set()

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

    def _worker_done(self, slot: _Slot, _worker: asyncio.Future[None]) -> None:
        slot.lock.release()
        self._notify()

    def _notify(self) -> None:
        """Wake whoever waits for a request, generation or load to end."""
        if self._activity is not None:
            self._activity.set()
            self._activity = None

    async def _wait_activity(self, timeout: float | None) -> None:
        if self._activity is None:
            self._activity = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._activity.wait(), timeout)

    def _describe(self, alias: str, slot: _Slot) -> LoadedModel:
        expires = None
        if slot.keep_alive >= 0 and not slot.serving():  # as wall-clock time
            expires = time.time() + slot.last_used + slot.keep_alive - self._clock()
        return LoadedModel(
            alias=alias,
            variant=slot.resolved.variant,
            sha256=slot.resolved.sha256,
            memory_bytes=slot.resolved.estimated_memory,
            loaded_at=slot.loaded_at,
            expires_at=expires,
            busy=slot.serving(),
            queue_depth=self.queue_depth(alias),
            details=slot.backend.details(),
        )


def _mb(n: int) -> str:
    return f"{n / 1_048_576:.0f} MiB"
