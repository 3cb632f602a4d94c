"""Continuous batching and the prompt-prefix cache, on the real SmolLM2 and Gemma 3 models
through the scheduler as the daemon builds it (the production loader: the shared compute
thread, `runtime.parallel` slots per model).

Greedy (temperature 0) texts generated together are compared with the texts the same
requests get alone: batched matrix kernels may sum in another order, so a near-tie can
flip; the first 32 tokens must be identical, and how many agree throughout is reported.
With one KV stream per sequence, SmolLM2 (Q4_1) gives bit-identical logits alone or
batched; Gemma 3 (Q4_K_M) does not (llama.cpp's repacked K-quant kernels take rows four at a
time, so a row's sums depend on the batch), so its prompts are ones whose greedy
continuation has no near-tie early on (a base model asked an open question has many:
"a cat named Lucy" vs "Kitty" at token 5, 3.7 nats down, flipped).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest

from agent.metrics import Metrics
from agent.runtime.scheduler import Scheduler
from agent.runtime.types import ChatMessage, Chunk, GenerationRequest, ResolvedModel, Sampling
from agent.settings import RuntimeSettings

T = TypeVar("T")
MB = 1 << 20
QUESTIONS = [
    "Tell me about cats.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a battery does.",
]
SEQUENCES = [  # Gemma 3 is a base model: continuations it is sure of
    "1, 2, 3, 4, 5, 6,",
    "2, 4, 6, 8, 10, 12,",
    "100, 101, 102, 103, 104,",
    "10, 20, 30, 40, 50,",
]


class Bench:
    """A scheduler over the real models with the production loader."""

    def __init__(self, paths: dict[str, Path], **settings: Any) -> None:
        self.paths = paths
        self.metrics = Metrics()
        defaults: dict[str, Any] = {"threads": 2, "context_length": 4096, "parallel": 4}
        self.settings = RuntimeSettings(**{**defaults, **settings})
        self.scheduler = Scheduler(self.settings, self.resolve, self.metrics, budget=8 << 30)

    def resolve(self, alias: str) -> ResolvedModel:
        gemma = alias == "gemma"
        return ResolvedModel(
            alias=alias, variant="v", format="gguf", quantization="Q4",
            target="cpu", sha256=f"sha-{alias}", path=str(self.paths[alias]),
            task="completion" if gemma else "chat",
            architecture="gemma3" if gemma else "llama", estimated_memory=400 * MB,
        )

    def sample(self, name: str, model: str) -> float:
        return self.metrics.registry.get_sample_value(name, {"model": model}) or 0.0


def run(paths: dict[str, Path], body: Callable[[Bench], Awaitable[T]], **settings: Any) -> T:
    bench = Bench(paths, **settings)

    async def main() -> T:
        await bench.scheduler.start()
        try:
            return await body(bench)
        finally:
            await bench.scheduler.close()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def paths(smollm2_gguf: Path, gemma3_gguf: Path) -> dict[str, Path]:
    return {"smol": smollm2_gguf, "gemma": gemma3_gguf}


def ask(model: str, text: str, max_tokens: int = 48, system: str | None = None,
        **sampling: Any) -> GenerationRequest:
    """A greedy request (with log-probabilities, which carry each token's bytes)."""
    if model == "gemma":  # a base model: completion prompts
        prompt = (system + "\n\n" if system else "") + text
        return GenerationRequest(model=model, prompt=prompt, sampling=Sampling(
            temperature=0, max_tokens=max_tokens, logprobs=0, **sampling))
    messages = ([ChatMessage(role="system", content=system)] if system else []) + [
        ChatMessage(role="user", content=text)]
    return GenerationRequest(model=model, messages=messages, sampling=Sampling(
        temperature=0, max_tokens=max_tokens, logprobs=0, **sampling))


class Stream:
    """One streamed generation: its tokens (from logprobs), text and arrival times."""

    def __init__(self) -> None:
        self.tokens: list[tuple[int, ...]] = []
        self.text = ""
        self.times: list[float] = []
        self.finish: str | None = None
        self.last: Chunk | None = None

    async def read(self, chunks: AsyncIterator[Chunk], stop_after: int | None = None) -> Stream:
        async for c in chunks:
            self.times.append(time.perf_counter())
            self.tokens += [tuple(p["bytes"]) for p in c.logprobs or []]
            self.text += c.text
            self.last = c
            if c.finish_reason:
                self.finish = c.finish_reason
            if stop_after is not None and len(self.tokens) >= stop_after:
                await chunks.aclose()  # type: ignore[attr-defined]
                break
        return self


def agreement(together: list[Stream], alone: list[Stream]) -> int:
    """Asserts the first 32 tokens agree; returns how many agree throughout."""
    for i, (t, a) in enumerate(zip(together, alone, strict=True)):
        assert len(a.tokens) >= 32, f"stream {i}: only {len(a.tokens)} tokens alone"
        assert t.tokens[:32] == a.tokens[:32], (
            f"stream {i} differs within 32 tokens:\n together {t.text!r}\n alone    {a.text!r}")
    return sum(t.tokens == a.tokens for t, a in zip(together, alone, strict=True))


@pytest.mark.parametrize("model", ["smol", "gemma"])
def test_four_concurrent_streams_complete_and_agree_with_each_alone(
    paths: dict[str, Path], model: str, record_property: Any
) -> None:
    prompts = SEQUENCES if model == "gemma" else QUESTIONS

    async def body(b: Bench) -> tuple[list[Stream], list[Stream]]:
        s = b.scheduler
        alone = [await Stream().read(s.generate(ask(model, q, ignore_eos=True)))
                 for q in prompts]
        together = await asyncio.gather(*(
            Stream().read(s.generate(ask(model, q, ignore_eos=True))) for q in prompts))
        # Really batched: decode steps that advanced several sequences at once.
        hist = b.metrics.registry.get_sample_value(
            "edge_agent_batch_sequences_bucket", {"model": model, "le": "3.0"}) or 0
        total = b.metrics.registry.get_sample_value(
            "edge_agent_batch_sequences_count", {"model": model}) or 0
        assert total - hist > 0, "no decode step advanced 4 sequences together"
        return list(together), alone

    together, alone = run(paths, body)
    assert all(t.finish == "length" and len(t.tokens) == 48 for t in together)
    same = agreement(together, alone)
    record_property("identical_throughout", f"{same}/4")
    print(f"{model}: {same} of 4 streams identical throughout to their solo text")


def test_cancelling_one_stream_leaves_the_others_unchanged(
    paths: dict[str, Path], record_property: Any
) -> None:
    async def body(b: Bench) -> tuple[list[Stream], list[Stream], int]:
        s = b.scheduler
        alone = [await Stream().read(s.generate(ask("smol", q, ignore_eos=True)))
                 for q in QUESTIONS[1:]]
        cut = Stream()
        results = await asyncio.gather(
            cut.read(s.generate(ask("smol", QUESTIONS[0], ignore_eos=True)), stop_after=8),
            *(Stream().read(s.generate(ask("smol", q, ignore_eos=True)))
              for q in QUESTIONS[1:]))
        # The cancelled sequence left the batch: its slot is free for the next request.
        after = await Stream().read(s.generate(ask("smol", QUESTIONS[0], max_tokens=4)))
        assert after.finish == "length"
        return list(results[1:]), alone, len(cut.tokens)

    others, alone, n_cut = run(paths, body)
    assert n_cut == 8
    assert all(o.finish == "length" and len(o.tokens) == 48 for o in others)
    same = agreement(others, alone)
    record_property("identical_throughout", f"{same}/3")


def test_a_long_prompt_mid_stream_delays_the_others_by_one_chunk_at_most(
    paths: dict[str, Path], record_property: Any
) -> None:
    long_text = " ".join(f"Item {i} is on shelf {i % 7} in aisle {i % 13}." for i in range(105))

    async def body(b: Bench) -> tuple[float, float, int, float]:
        s = b.scheduler
        streams = [Stream(), Stream()]
        readers = [asyncio.ensure_future(st.read(s.generate(ask("smol", q, max_tokens=200,
                                                                 ignore_eos=True))))
                   for st, q in zip(streams, QUESTIONS, strict=False)]
        while min(len(st.tokens) for st in streams) < 10:  # both streaming
            await asyncio.sleep(0)
            await asyncio.wait(readers, timeout=0.01)
        long = Stream()
        sent = time.perf_counter()
        await long.read(s.generate(ask("smol", "Which aisle holds item 99? " + long_text,
                                       max_tokens=1)))
        first = long.times[0]
        assert long.last is not None and long.last.prompt_tokens is not None
        n_prompt = long.last.prompt_tokens
        await asyncio.gather(*readers)
        gaps = [b2 - a2 for st in streams for a2, b2 in zip(st.times, st.times[1:], strict=False)
                if sent <= b2 and a2 <= first]
        before = [b2 - a2 for st in streams for a2, b2 in zip(st.times, st.times[1:], strict=False)
                  if b2 < sent]
        return max(gaps), first - sent, n_prompt, sorted(before)[len(before) // 2]

    gap, prompt_time, n_prompt, typical = run(paths, body, prompt_chunk=256)
    chunks = -(-n_prompt // 256)
    record_property("largest_gap_s", round(gap, 3))
    record_property("long_prompt_s", round(prompt_time, 3))
    print(f"prompt {n_prompt} tokens in {chunks} chunks took {prompt_time:.3f}s; largest "
          f"inter-token gap meanwhile {gap:.3f}s (typical {typical:.3f}s, one chunk "
          f"≈ {prompt_time / chunks:.3f}s)")
    assert n_prompt >= 1500
    # Unchunked, the others would stall for the whole prompt; chunked, for about one chunk
    # (plus the step's own decode): well under half of it with 6+ chunks.
    assert gap < prompt_time / 2, (gap, prompt_time)


@pytest.mark.parametrize("model", ["smol", "gemma"])
def test_a_repeated_system_prompt_hits_the_cache_and_answers_sooner(
    paths: dict[str, Path], model: str, record_property: Any
) -> None:
    system = " ".join(f"Rule {i}: answer politely and mention the number {i}." for i in range(45))

    async def ttft(s: Scheduler, q: str) -> tuple[float, Chunk]:
        t0 = time.perf_counter()
        first: float | None = None
        request = ask(model, q, max_tokens=2, system=system)
        request.cache_prompt = True  # greedy requests evaluate from scratch unless asked
        async for c in s.generate(request):
            first = first or time.perf_counter()
            last = c
        assert first is not None
        return first - t0, last

    async def body(b: Bench) -> tuple[float, float, Chunk, float]:
        s = b.scheduler
        await s.load(model)
        hits = b.sample("edge_agent_prompt_cache_hits_total", model)
        cold, _ = await ttft(s, "What is rule 3?")
        warm, last = await ttft(s, "What is rule 7?")
        return cold, warm, last, b.sample("edge_agent_prompt_cache_hits_total", model) - hits

    cold, warm, last, hits = run(paths, body)
    assert last.prompt_tokens is not None and last.prompt_tokens >= 500
    assert last.cached_tokens is not None and last.cached_tokens >= 500
    assert hits >= 1
    record_property("ttft_cold_s", round(cold, 3))
    record_property("ttft_cached_s", round(warm, 3))
    print(f"{model}: {last.prompt_tokens}-token prompt, {last.cached_tokens} cached: "
          f"TTFT {cold:.3f}s cold, {warm:.3f}s cached ({cold / warm:.1f}x)")
    assert warm * 3 < cold, (cold, warm)


def test_the_cache_is_on_for_sampled_requests_and_off_for_greedy_or_seeded_unless_asked(
    paths: dict[str, Path]
) -> None:
    def chat(**sampling: Any) -> GenerationRequest:
        return GenerationRequest(model="smol", messages=[
            ChatMessage(role="user", content="Name three rivers.")],
            sampling=Sampling(max_tokens=2, **sampling))

    async def body(b: Bench) -> list[float]:
        s = b.scheduler
        cached = []
        for request in (chat(temperature=0.8), chat(temperature=0.8),  # sampled: reused
                        chat(temperature=0), chat(temperature=0.8, seed=3),  # from scratch
                        chat(temperature=0)):
            if len(cached) == 4:
                request.cache_prompt = True  # greedy, but asks for the cache
            last = [c async for c in s.generate(request)][-1]
            cached.append(last.cached_tokens or 0)
        return cached

    cached = run(paths, body)
    assert cached[0] == 0 and cached[1] > 10, cached
    assert cached[2] == 0 and cached[3] == 0, cached
    assert cached[4] > 10, cached


def test_a_request_reaching_an_unloaded_engine_is_refused_not_left_waiting(
    smollm2_gguf: Path,
) -> None:
    # A request checked off the compute thread can reach the engine just after the model was
    # unloaded; queued there, no step would ever run it and its caller would wait forever.
    from agent.errors import Stopping
    from agent.runtime.llama import LlamaBackend

    bench = Bench({"smol": smollm2_gguf})
    backend = LlamaBackend.load(bench.resolve("smol"), threads=2, n_ctx=512, parallel=2)
    backend.close()
    events: list[object] = []
    with pytest.raises(Stopping, match="unloaded"):  # it used to crash the process
        backend.start(ask("smol", "Hello"), threading.Event(), events.append, events.append,
                      lambda: events.append("end"))
    for late in (lambda: backend.tokenize("Hello"), lambda: backend.score([1, 2, 3])):
        with pytest.raises(Stopping, match="unloaded"):
            late()
    assert events == []
    engine = backend.engine
    assert engine is not None  # and the engine itself refuses a job once closed
    with pytest.raises(Stopping, match="unloaded"):
        engine.submit(SimpleNamespace(n=1))  # type: ignore[arg-type]


def test_a_step_puts_its_sequences_in_sequence_id_order(paths: dict[str, Path]) -> None:
    """With a KV stream per sequence, llama.cpp decodes a batch as one graph only when its
    sequences come in consecutive id order (split_equal, sequential); otherwise it cuts
    the step into several ubatches (four streams put in as 3, 2, 1, 0: four graphs, ~40%
    slower a step). The second round's requests arrive in reverse and each takes the slot
    holding its own cached prompt, so the engine's admission order is the slots' reverse:
    every decode step must still list its sequences by id."""
    from agent.runtime.llama import LlamaBackend

    steps: list[list[int]] = []

    async def body(b: Bench) -> None:
        s = b.scheduler

        def together(order: list[str]) -> Awaitable[list[Stream]]:
            return asyncio.gather(*(Stream().read(s.generate(
                ask("smol", q, max_tokens=8, ignore_eos=True).model_copy(
                    update={"cache_prompt": True}))) for q in order))

        await together(QUESTIONS)
        resident = s.residency.get("smol")
        assert resident is not None and isinstance(resident.backend, LlamaBackend)
        engine = resident.backend.engine
        assert engine is not None
        decode = engine._decode

        def spy(n: int) -> int:
            batch = engine._batch
            steps.append([batch.seq_id[i][0] for i in range(n)])
            return decode(n)

        engine._decode = spy  # type: ignore[method-assign]
        await together(QUESTIONS[::-1])

    run({"smol": paths["smol"]}, body)
    assert any(len(set(ids)) == 4 for ids in steps), f"never four sequences a step: {steps}"
    assert all(ids == sorted(ids) for ids in steps), steps  # prompt runs included
