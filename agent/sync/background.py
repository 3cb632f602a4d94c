"""The thread that does a deployment's bulk work, at a lower CPU priority than serving.

Why: llama.cpp's CPU backend runs each decode step as a team of threads that spin at
barriers, one per core on a small device. Anything else that takes a core for a while
(the TLS decryption, writes and hashing of a 250 MB download, which ran on the event loop
and four helper threads) leaves one team thread waiting at every barrier for the other:
on 2 cores, a 4-token completion that takes 0.1 s took 2-3 s while a deployment
downloaded (tests/test_deploy.py's switch without a gap; one CI run failed on a 3.3 s
gap). Serving comes first on a device, so the download, its verification and the chunk
checks run on one thread whose nice value is raised (`sync.background_nice`, default 10:
about a tenth of a core against a busy serving thread, all of it when serving is idle).

One thread, also so that two attempts at the same artifact (a deployment superseded
mid-download) never write the same partial file at once: the second waits for the first,
which stops at its next chunk once cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Concatenate, ParamSpec, TypeVar

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")


class Stopped(Exception):
    """The awaiting task was cancelled: the job stops at its next check."""


def lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value by `nice` (Linux: per thread); never fails
    the job: an unprivileged process may always lower its own priority, but a sandbox may
    forbid the call."""
    if nice <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:
        log.warning("could not lower the deployment thread's priority: %s", exc)


class Background:
    """One low-priority worker thread; `run` awaits a job on it, cancellable."""

    def __init__(self, nice: int) -> None:
        self.nice = nice
        self._pool: ThreadPoolExecutor | None = None  # started by the first job

    def _worker(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deploy-io",
                                            initializer=lower_priority, initargs=(self.nice,))
        return self._pool

    async def run(self, fn: Callable[Concatenate[threading.Event, P], T], /,
                  *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn(stop, *args, **kwargs)` on the worker. `stop` is set when the awaiting task
        is cancelled; `fn` checks it between pieces of work (or raises `Stopped` from
        `check`) and the cancellation waits for it to return, so nothing outlives it."""
        stop = threading.Event()
        fut = asyncio.get_running_loop().run_in_executor(
            self._worker(), lambda: fn(stop, *args, **kwargs))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            stop.set()
            # Stopped, or the job's own failure: the cancellation is what the caller sees
            with contextlib.suppress(Exception):
                await fut
            raise

    def close(self) -> None:
        """Let the thread go (the link stopped); a later job starts another."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def check(stop: threading.Event) -> None:
    """Raise `Stopped` once the job's task was cancelled."""
    if stop.is_set():
        raise Stopped
