"""One OS thread for every llama.cpp call in the process: loads, unloads, batched decode
steps of every loaded GGUF model, embeddings and scoring.

Why one: this llama.cpp build parallelises with OpenMP, which keeps a team of worker
threads per *calling* thread. Two models driven from two threads brought two teams that
fought over the cores: on 2 cores a SmolLM2 completion took 2-4x as long once Gemma 3 had
been loaded and used beside it (the [throughput] issue's measurement; bench/concurrency.py
row (f) keeps the figure). A small device gains nothing from running two models' matrix
kernels at once, so they take turns: the thread runs queued jobs in FIFO order and, between
jobs, one decode step of each engine that has work (round-robin), so a model's stream is
never held up by another model for more than one step.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class Steppable(Protocol):
    """What the compute thread drives between jobs (a model's batching engine)."""

    def has_work(self) -> bool:
        """Whether a step would do anything (read under the thread's lock)."""
        ...

    def step(self) -> None:
        """One decode step: every running sequence advances by a token or a prompt chunk."""
        ...


class ComputeThread(Executor):
    """A single worker thread that runs jobs (`submit`) and steps engines (`attach`)."""

    def __init__(self, name: str = "llama-compute") -> None:
        self._cond = threading.Condition()
        self._jobs: deque[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = deque()
        self._engines: list[Steppable] = []
        self._next = 0  # round-robin position among engines
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self.ident = self._thread.ident

    # -- Executor ------------------------------------------------------------------------

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        fut: Future[T] = Future()
        call = (lambda: fn(*args, **kwargs)) if kwargs else fn
        with self._cond:
            self._jobs.append((fut, call, () if kwargs else args))
            self._cond.notify()
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Shared by every model: a model's unload does not stop it (it runs until exit)."""

    # -- engines -------------------------------------------------------------------------

    def attach(self, engine: Steppable) -> None:
        with self._cond:
            if engine not in self._engines:
                self._engines.append(engine)
            self._cond.notify()

    def detach(self, engine: Steppable) -> None:
        with self._cond, contextlib.suppress(ValueError):
            self._engines.remove(engine)

    def wake(self) -> None:
        """An engine got work (a new sequence, a cancellation): look again."""
        with self._cond:
            self._cond.notify()

    def in_thread(self) -> bool:
        return threading.get_ident() == self.ident

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        _local.pending = []  # this thread hands results over in batches (`deliver`)
        while True:
            with self._cond:
                job = self._jobs.popleft() if self._jobs else None
                engines = [e for e in self._engines if e.has_work()]
                if job is None and not engines:
                    flush()  # nothing runs next: hand over what is pending, then sleep
                    self._cond.wait()
                    continue
            if job is not None:
                flush()
                fut, fn, args = job
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(*args))
                    except BaseException as exc:  # handed to the caller, never lost here
                        fut.set_exception(exc)
                del fut, fn, args, job
            if engines:
                engine = engines[self._next % len(engines)]
                self._next += 1
                try:
                    engine.step()
                except Exception:  # an engine fails its own sequences; never the thread
                    log.exception("decode step failed")
                flush()  # one hand-over to the event loop for all of the step's streams


_local = threading.local()


def deliver(fn: Callable[[], None]) -> None:
    """Run `fn` now or, on the compute thread, at its next `flush`: what hands a step's
    tokens to the event loop does it once for all the streams of the step."""
    pending: list[Callable[[], None]] | None = getattr(_local, "pending", None)
    if pending is None:
        fn()
    else:
        pending.append(fn)


def flush() -> None:
    """Run what `deliver` deferred on this thread: after each decode step, and before the
    thread runs a job or sleeps. (Flushing just before the next llama_decode instead, so
    that the loop would write while llama.cpp computes, measured no different.)"""
    pending: list[Callable[[], None]] | None = getattr(_local, "pending", None)
    if not pending:
        return
    _local.pending = []
    for fn in pending:
        try:
            fn()
        except Exception:  # a listener's fault; the thread carries on
            log.exception("handing a step's results over failed")


_shared: ComputeThread | None = None
_shared_lock = threading.Lock()


def shared_compute() -> ComputeThread:
    """The process's compute thread, started on first use (an agent with no GGUF model
    loaded has none)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ComputeThread()
        return _shared
