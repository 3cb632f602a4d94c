"""The deployment thread: lower priority than serving, and cancellable without leaving a
writer behind (agent.sync.background)."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from agent.sync.background import Background, Stopped, check


def _nice_here(stop: threading.Event) -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_jobs_run_at_the_configured_nice_increment_and_the_loop_keeps_its_own() -> None:
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if base > 9:
        pytest.skip(f"this process already runs at nice {base}")

    async def main() -> int:
        bg = Background(10)
        try:
            return await bg.run(_nice_here)
        finally:
            bg.close()

    assert asyncio.run(main()) == base + 10
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base


def test_a_cancelled_job_stops_at_its_next_check_before_the_cancellation_returns() -> None:
    began, finished = threading.Event(), threading.Event()
    steps: list[int] = []

    def job(stop: threading.Event) -> None:
        began.set()
        try:
            for i in range(10_000):
                check(stop)
                steps.append(i)
                stop.wait(0.01)  # a piece of work between checks
        finally:
            finished.set()

    async def main() -> None:
        bg = Background(0)
        task = asyncio.create_task(bg.run(job))
        await asyncio.to_thread(began.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the job was over when the cancellation came back: no writer outlives its task
        assert finished.is_set()
        n = len(steps)
        assert 0 < n < 10_000
        # the one worker is free for the next job
        assert await bg.run(lambda stop: "next") == "next"
        assert len(steps) == n
        bg.close()
        # the link stopped and came back: the deployment thread starts again
        assert await bg.run(lambda stop: "again") == "again"
        bg.close()

    asyncio.run(main())


def test_a_job_failure_reaches_the_caller() -> None:
    def job(stop: threading.Event) -> None:
        raise OSError(28, "No space left on device")

    async def main() -> None:
        bg = Background(0)
        with pytest.raises(OSError, match="No space"):
            await bg.run(job)
        with pytest.raises(Stopped):
            stop = threading.Event()
            stop.set()
            check(stop)
        bg.close()

    asyncio.run(main())
