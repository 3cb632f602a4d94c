"""Scheduled work on APScheduler: named jobs, visible in /agent/v1/jobs, stopped with the
daemon.

Every job coalesces missed runs and has no misfire limit: a device that slept for a week
runs each job once when it wakes, not once per missed period. A job never runs twice at
once (`max_instances=1`), and stop() waits for running jobs (cancelling them after a
grace period), so nothing runs against a closed database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)

JobFn = Callable[[], Awaitable[None]]


@dataclass
class JobInfo:
    """What /agent/v1/jobs shows of one job."""

    id: str
    name: str
    every_seconds: float
    runs: int = 0
    failures: int = 0
    last_run: float | None = None
    last_duration_s: float | None = None
    last_error: str | None = None
    running: bool = False
    next_run: float | None = field(default=None)

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Jobs:
    """The daemon's periodic jobs on an AsyncIOScheduler (imported when started)."""

    def __init__(self) -> None:
        self._jobs: dict[str, tuple[JobInfo, JobFn]] = {}
        self._first: dict[str, float | None] = {}
        self._scheduler: Any = None
        self._running: set[asyncio.Task[None]] = set()

    def add(self, job_id: str, name: str, every_seconds: float, fn: JobFn,
            *, first_in: float | None = None) -> None:
        """Register a job (before start); it first runs after `first_in` (default: period)."""
        self._jobs[job_id] = (JobInfo(job_id, name, every_seconds), fn)
        self._first[job_id] = first_in
        if self._scheduler is not None:
            self._schedule(job_id, first_in)

    def start(self) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        self._scheduler = AsyncIOScheduler(timezone=UTC)
        for job_id in self._jobs:
            self._schedule(job_id, self._first[job_id])
        self._scheduler.start()

    def _schedule(self, job_id: str, first_in: float | None) -> None:
        info, _ = self._jobs[job_id]
        delay = info.every_seconds if first_in is None else first_in
        self._scheduler.add_job(
            self._run, "interval", seconds=info.every_seconds, args=[job_id], id=job_id,
            name=info.name, coalesce=True, max_instances=1, misfire_grace_time=None,
            next_run_time=datetime.fromtimestamp(time.time() + delay, UTC),
            replace_existing=True,
        )

    async def _run(self, job_id: str) -> None:
        info, fn = self._jobs[job_id]
        task = asyncio.current_task()
        if task is not None:
            self._running.add(task)
        info.running = True
        t0 = time.monotonic()
        try:
            await fn()
        except asyncio.CancelledError:
            info.last_error = "cancelled at stop"
            raise
        except Exception as exc:
            info.failures += 1
            info.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("job %s failed", job_id)
        else:
            info.last_error = None
        finally:
            info.running = False
            info.runs += 1
            info.last_run = time.time()
            info.last_duration_s = round(time.monotonic() - t0, 4)
            if task is not None:
                self._running.discard(task)

    async def run_now(self, job_id: str) -> None:
        """Run a job at once (tests, commands); still one at a time with its schedule."""
        await self._run(job_id)

    def info(self) -> list[JobInfo]:
        out = []
        for job_id, (info, _) in self._jobs.items():
            job = self._scheduler.get_job(job_id) if self._scheduler is not None else None
            nxt = getattr(job, "next_run_time", None)
            info.next_run = nxt.timestamp() if nxt is not None else None
            out.append(info)
        return out

    async def stop(self, grace: float = 5.0) -> None:
        """No new runs; wait for running ones, cancelling what outlives `grace`."""
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        if self._running:
            _, pending = await asyncio.wait(set(self._running), timeout=grace)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
