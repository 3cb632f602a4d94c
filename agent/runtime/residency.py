"""Which models are loaded: load on demand (once per alias), memory budget, LRU, keep-alive.

`Residency` owns the set of loaded models (`Resident`s). Each resident has one executor
that every call into it goes through: llama.cpp's OpenMP build keeps a worker team per
calling thread, so a second caller doubles the teams and slows every token by ~40% on a
small device (bench/serve.py). GGUF models (after loading in a thread of their own) share
the process's one compute thread (`agent.runtime.compute`: teams of two models fought
too); other backends keep a thread each. What uses a resident (`Lane`) is written by
the scheduler; residency reads it only to know what it may evict. Counts that decide
eviction and expiry change only on the event loop, between awaits, so they need no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from agent.errors import ModelLoadFailed, Stopping
from agent.metrics import Metrics
from agent.runtime.backend import Backend, Loader
from agent.runtime.types import LoadedModel, ResolvedModel
from registry.errors import RegistryError

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0  # how often idle models are checked against their keep-alive
Lease = Callable[[str], contextlib.AbstractContextManager[Any]]


@dataclass(eq=False)
class Lane:
    """Who is using a resident model: its FIFO generation slot and the running call."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # FIFO: one call at a time
    users: int = 0  # requests holding the lane (waiting or running)
    worker: asyncio.Future[Any] | None = None  # the running call's thread
    cancel: threading.Event | None = None  # stops the running generation
    cancels: set[threading.Event] = field(default_factory=set)  # batched generations

    def running(self) -> bool:
        return self.worker is not None and not self.worker.done()

    def serving(self) -> bool:
        return self.users > 0 or self.running()


@dataclass(eq=False)
class Resident:
    """A loaded model, its one thread, its registry lease and its keep-alive."""

    alias: str
    resolved: ResolvedModel
    backend: Backend
    lease: contextlib.AbstractContextManager[Any] | None
    executor: Executor  # its own thread, or the shared compute thread (GGUF)
    loaded_at: float  # wall clock, for display
    last_used: float  # residency clock
    keep_alive: float  # seconds; negative: forever
    lane: Lane = field(default_factory=Lane)
    draining: bool = False  # unload() waits for its requests; new ones wait for a reload


class Residency:
    """Loads and unloads models within a memory budget and a count limit.

    `pending(alias)` (from the scheduler) counts requests admitted for an alias that
    have not finished; a model with any is never evicted or expired.
    """

    def __init__(
        self,
        loader: Loader,
        resolve: Callable[[str], ResolvedModel],
        metrics: Metrics,
        *,
        budget: int | Callable[[], int],
        max_loaded: int,
        default_keep_alive: float,
        pending: Callable[[str], int],
        lease: Lease | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._budget = budget
        self._loader = loader
        self._resolve = resolve
        self._metrics = metrics
        self._max_loaded = max_loaded
        self._default_keep_alive = default_keep_alive
        self._pending = pending
        self._lease = lease
        self.clock = clock
        self._residents: dict[str, Resident] = {}
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._reserved: dict[str, int] = {}  # memory of loads in progress
        self._ticker: asyncio.Task[None] | None = None
        self.closing = False
        self._activity: asyncio.Event | None = None  # set when a request or load ends

    # -- reading -----------------------------------------------------------------------

    def budget(self) -> int:
        """Bytes loaded models may use together (computed on first use, then fixed)."""
        if callable(self._budget):
            self._budget = self._budget()
        return self._budget

    def residents(self) -> list[Resident]:
        return list(self._residents.values())

    def get(self, alias: str) -> Resident | None:
        return self._residents.get(alias)

    def loading(self) -> bool:
        return bool(self._reserved)

    def idle(self, resident: Resident) -> bool:
        return not resident.lane.serving() and self._pending(resident.alias) == 0

    def describe(self, r: Resident, queue_depth: int) -> LoadedModel:
        expires = None
        if r.keep_alive >= 0 and not r.lane.serving():  # as wall-clock time
            expires = time.time() + r.last_used + r.keep_alive - self.clock()
        return LoadedModel(
            alias=r.alias,
            variant=r.resolved.variant,
            sha256=r.resolved.sha256,
            memory_bytes=r.resolved.estimated_memory,
            loaded_at=r.loaded_at,
            expires_at=expires,
            busy=r.lane.serving(),
            queue_depth=queue_depth,
            details=r.backend.details(),
        )

    # -- keep-alive --------------------------------------------------------------------

    def start(self) -> None:
        """Start the task that unloads models past their keep-alive."""
        if self._ticker is None and not self.closing:
            self._ticker = asyncio.create_task(self._tick(), name="edge-agent-keepalive")

    async def stop_ticker(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker

    async def expire_idle(self) -> list[str]:
        """Unload every idle model whose keep-alive has run out; returns their aliases."""
        now = self.clock()
        expired = [
            alias for alias, r in self._residents.items()
            if self.idle(r) and r.keep_alive >= 0 and now >= r.last_used + r.keep_alive
        ]
        for alias in expired:
            log.info("unloading %s: idle past its keep-alive", alias)
        await self.close_residents(self.detach(expired))
        return expired

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                await self.expire_idle()
            except Exception:
                log.exception("keep-alive check failed")

    # -- loading -----------------------------------------------------------------------

    def _load_lock(self, alias: str) -> asyncio.Lock:
        return self._load_locks.setdefault(alias, asyncio.Lock())

    async def ensure(self, alias: str, keep_alive: float | None,
                     resolved: ResolvedModel | None = None) -> Resident:
        """The resident model for `alias`, loading it first if needed (one load per alias:
        concurrent first requests wait for it and share it). `resolved` loads that exact
        variant instead of resolving the alias (a deployment's candidate)."""
        r = self._residents.get(alias)
        if r is None or r.draining:
            async with self._load_lock(alias):
                self.check_open()
                r = self._residents.get(alias)
                if r is None:
                    r = await self._load(alias, resolved)
        # Like Ollama: each request sets the keep-alive; without one it is the default again.
        r.keep_alive = self._default_keep_alive if keep_alive is None else keep_alive
        return r

    async def _load(self, alias: str, resolved: ResolvedModel | None = None) -> Resident:
        resolved = resolved or self._resolve(alias)
        need = resolved.estimated_memory
        try:
            victims = self._make_room(alias, need)
        except ModelLoadFailed:
            self._metrics.load_failures.labels(model=alias).inc()
            raise
        for victim in victims:
            log.info("unloading %s (least recently used) to make room for %s", victim, alias)
        # Detached at once, so no request can pick a victim up while the others close.
        detached = self.detach(victims)
        self._reserved[alias] = need
        started = time.perf_counter()
        executor: Executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{alias}")
        loop = asyncio.get_running_loop()
        try:
            await self.close_residents(detached)
            backend, lease = await loop.run_in_executor(executor, self._open, resolved)
        except BaseException as exc:
            executor.shutdown(wait=False)
            self._metrics.load_failures.labels(model=alias).inc()
            if isinstance(exc, ModelLoadFailed | RegistryError) or not isinstance(exc, Exception):
                raise
            raise ModelLoadFailed(f"model {alias}: load failed: {exc}") from exc
        finally:
            del self._reserved[alias]
            self.notify()
        if self.closing:  # close() began while this loaded; it is not waiting for us
            await loop.run_in_executor(executor, _close_backend, backend, lease)
            executor.shutdown(wait=False)
            raise Stopping("the agent is shutting down")
        shared: Executor | None = getattr(backend, "executor", None)
        if shared is not None:  # a backend on the shared compute thread runs all calls there
            executor.shutdown(wait=False)
            executor = shared
        self._metrics.load_seconds.labels(model=alias).observe(time.perf_counter() - started)
        r = Resident(
            alias=alias,
            resolved=resolved,
            backend=backend,
            lease=lease,
            executor=executor,
            loaded_at=time.time(),
            last_used=self.clock(),
            keep_alive=self._default_keep_alive,
        )
        self._residents[alias] = r
        self._metrics.loaded_models.set(len(self._residents))
        log.info("loaded %s (%s) in %.2fs", alias, resolved.variant, time.perf_counter() - started)
        return r

    def _open(
        self, resolved: ResolvedModel
    ) -> tuple[Backend, contextlib.AbstractContextManager[Any] | None]:
        """Enter the registry lease, then load; runs in the model's thread."""
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
        budget = self.budget()
        if need > budget:
            raise ModelLoadFailed(
                f"model {alias} needs {_mb(need)}, more than the whole memory budget "
                f"({_mb(budget)})"
            )
        used = sum(r.resolved.estimated_memory for r in self._residents.values())
        used += sum(self._reserved.values())
        count = len(self._residents) + len(self._reserved)
        limit = self._max_loaded
        idle = sorted(
            (r for r in self._residents.values() if self.idle(r)), key=lambda r: r.last_used
        )
        victims: list[str] = []
        for r in idle:
            if used + need <= budget and count < limit:
                break
            victims.append(r.alias)
            used -= r.resolved.estimated_memory
            count -= 1
        if used + need > budget or count >= limit:
            busy = [a for a, r in self._residents.items() if a not in victims and not self.idle(r)]
            busy_mem = sum(self._residents[a].resolved.estimated_memory for a in busy)
            raise ModelLoadFailed(
                f"model {alias} needs {_mb(need)}, budget {_mb(budget)}, "
                f"{_mb(busy_mem)} busy ({', '.join(busy) or 'loading'}); "
                f"{count} of at most {limit} models loaded"
            )
        return victims

    # -- unloading ---------------------------------------------------------------------

    async def unload(self, alias: str) -> bool:
        """Unload `alias` once its requests are done; False if it was not loaded."""
        async with self._load_lock(alias):
            r = self._residents.get(alias)
            if r is None:
                return False
            r.draining = True
            while r.lane.serving():
                await self.wait_activity(None)
            await self.close_residents(self.detach([alias]))
            return True

    async def promote(self, key: str, alias: str) -> None:
        """Serve `alias` with the model loaded under `key` from now on, at once: the next
        request gets it, requests already on the old one finish there, then it is freed."""
        cand = self._residents.pop(key)
        old = self._residents.get(alias)
        cand.alias = alias
        self._residents[alias] = cand
        if old is not None and old is not cand:
            old.draining = True
            while old.lane.serving():
                await self.wait_activity(None)
            await self.close_residents([old])

    async def unload_if_idle(self, r: Resident) -> None:
        if self._residents.get(r.alias) is r and self.idle(r):
            await self.close_residents(self.detach([r.alias]))

    def detach(self, aliases: list[str]) -> list[Resident]:
        """Take models out of service (synchronously); `close_residents` frees them."""
        out = [self._residents.pop(a) for a in aliases if a in self._residents]
        self._metrics.loaded_models.set(len(self._residents))
        return out

    async def close_residents(self, detached: list[Resident]) -> None:
        for r in detached:
            if r.lane.worker is not None:  # never free a model under a running thread
                with contextlib.suppress(BaseException):
                    await asyncio.shield(r.lane.worker)
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(r.executor, _close_backend, r.backend, r.lease)
            except Exception:
                log.exception("error while unloading %s", r.alias)
            else:
                log.info("unloaded %s", r.alias)
            finally:
                r.executor.shutdown(wait=False)

    async def close_all(self) -> None:
        """Wait for loads in flight (they notice `closing` and undo themselves), then
        unload everything."""
        while self._reserved:
            await self.wait_activity(None)
        await self.close_residents(self.detach(list(self._residents)))

    def check_open(self) -> None:
        if self.closing:
            raise Stopping("the agent is shutting down")

    # -- waiting -----------------------------------------------------------------------

    def notify(self) -> None:
        """Wake whoever waits for a request, generation or load to end."""
        if self._activity is not None:
            self._activity.set()
            self._activity = None

    async def wait_activity(self, timeout: float | None) -> None:
        if self._activity is None:
            self._activity = asyncio.Event()
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a racing cancellation.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._activity.wait()


def _close_backend(backend: Backend, lease: contextlib.AbstractContextManager[Any] | None) -> None:
    try:
        backend.close()
    finally:
        if lease is not None:
            lease.__exit__(None, None, None)


def _mb(n: int) -> str:
    return f"{n / 1_048_576:.0f} MiB"
