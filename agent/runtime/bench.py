"""Measuring one variant on this device: load time, prompt and generation speed, peak memory,
and quality (perplexity on the shipped corpus for language models; vectors for agreement
for embedding models).

`measure_in_child` runs `measure` in a fresh process per variant (spawned, so the peak RSS
it reports is that variant's alone and one variant's allocations never flatter the next);
the backend is opened with `load_backend`, exactly as the daemon opens it.
`bench_variants` measures some variants of a model and stores the results under this
hardware's fingerprint: `edge-agent bench` and the background job (`autobench`) share
it. The corpus is the public-domain text in `agent/runtime/corpus/` (its README names
source and licence).
"""

from __future__ import annotations

import math
import os
import re
import resource
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import ModelLoadFailed
from agent.runtime.backend import Backend, load_backend
from agent.runtime.types import GenerationRequest, ResolvedModel, Sampling
from agent.settings import BenchSettings, RuntimeSettings

if TYPE_CHECKING:
    from agent.runtime.resolver import ModelResolver

POLL_SECONDS = 0.2  # how often a running measurement checks whether to stop
CORPUS = Path(__file__).with_name("corpus") / "declaration-of-independence.txt"
CORPUS_NAME = "declaration-of-independence (U.S. National Archives transcription, public domain)"


def corpus_text() -> str:
    return CORPUS.read_text(encoding="utf-8")


def corpus_sentences(n: int) -> list[str]:
    """The first `n` sentences of the corpus (cycled if it has fewer)."""
    parts = [p.strip() for p in re.split(r"(?<=[.;:])\s+", corpus_text()) if len(p.strip()) > 20]
    return [parts[i % len(parts)] for i in range(n)]


@dataclass
class Outcome:
    """What one variant measured (the fields of `registry.types.Measured`) and how."""

    load_seconds: float
    peak_rss: int
    prompt_tps: float | None = None
    generation_tps: float | None = None
    perplexity: float | None = None
    embeddings_per_second: float | None = None
    vectors: list[list[float]] | None = None  # embedding models: for agreement
    details: dict[str, Any] = field(default_factory=dict)


def measure(resolved: ResolvedModel, settings: RuntimeSettings, bench: BenchSettings) -> Outcome:
    """Load `resolved` and measure it (in the calling process and thread)."""
    t0 = time.perf_counter()
    backend = load_backend(resolved, settings)
    load_seconds = time.perf_counter() - t0
    try:
        if resolved.task == "embedding":
            out = _measure_embeddings(backend, bench)
        else:
            out = _measure_language(backend, bench)
        out.load_seconds = load_seconds
        out.details["backend"] = backend.details()
    finally:
        backend.close()
    out.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


class Interrupted(Exception):
    """A background measurement was stopped because the agent had work to do."""


def _child(conn: Any, resolved: ResolvedModel, settings: RuntimeSettings, bench: BenchSettings,
           nice: int) -> None:
    if nice:
        os.nice(nice)
    try:
        conn.send(("ok", measure(resolved, settings, bench)))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def measure_in_child(
    resolved: ResolvedModel, settings: RuntimeSettings, bench: BenchSettings, *,
    nice: int = 0, should_stop: Callable[[], bool] | None = None,
) -> Outcome:
    """`measure` in a fresh spawned process, so peak memory is this variant's alone.

    `should_stop` is asked every `POLL_SECONDS`; when it says yes the child is ended and
    `Interrupted` raised (a measurement taken beside other work would be wrong)."""
    ctx = get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, resolved, settings, bench, nice),
                       name=f"bench-{resolved.variant}", daemon=True)
    proc.start()
    child.close()
    try:
        while not parent.poll(POLL_SECONDS):
            if should_stop is not None and should_stop():
                raise Interrupted(f"{resolved.alias} {resolved.variant}: stopped for requests")
            if not proc.is_alive() and not parent.poll(0):
                raise ModelLoadFailed(f"{resolved.alias} {resolved.variant}: the benchmark "
                                      f"process died (exit code {proc.exitcode})")
        status, value = parent.recv()
    finally:
        if proc.is_alive():
            proc.terminate()
        proc.join()
        parent.close()
    if status != "ok":
        raise ModelLoadFailed(f"{resolved.alias} {resolved.variant}: {value}")
    assert isinstance(value, Outcome)
    return value


def bench_variants(
    resolver: ModelResolver, alias: str, names: set[str], *,
    on_start: Callable[[str], object] | None = None,
    nice: int = 0, should_stop: Callable[[], bool] | None = None,
) -> list[str]:
    """Measure `names` of `alias` (highest precision first: embedding agreement is taken
    against it) and store each result under this hardware's fingerprint. Returns the
    variants measured, in order."""
    from registry.bench import record
    from registry.selection import estimate_memory
    from registry.types import Measured, quality_rank

    settings = resolver.settings
    reg = resolver.registry
    hw = resolver.fingerprint()
    info, specs, templates = reg.installed(alias)
    todo = sorted((s for s in specs if s.name in names),
                  key=lambda s: (-quality_rank(s.quantization), s.name))
    policy = resolver.policy_for(info.task)  # its estimate counts the KV windows
    reference: list[list[float]] | None = None
    done = []
    for spec in todo:
        if on_start is not None:
            on_start(spec.name)
        est = estimate_memory(spec, policy)
        resolved = resolver.resolved(info, spec, templates.get(spec.name),
                                     est.total if est else 0)
        out = measure_in_child(resolved, settings.runtime, settings.bench, nice=nice,
                               should_stop=should_stop)
        agree = None
        if out.vectors is not None:
            reference = reference or out.vectors
            agree = agreement(out.vectors, reference)
            out.details["reference"] = todo[0].name
        measured = Measured(
            load_seconds=out.load_seconds, peak_rss=out.peak_rss,
            prompt_tps=out.prompt_tps, generation_tps=out.generation_tps,
            perplexity=out.perplexity, embeddings_per_second=out.embeddings_per_second,
            agreement=agree,
        )
        record(reg, alias, spec.name, hw, measured,
               {**out.details, "threads": settings.runtime.threads})
        done.append(spec.name)
    return done


def _measure_language(backend: Backend, bench: BenchSettings) -> Outcome:
    tokens = backend.tokenize(corpus_text())[: bench.perplexity_max_tokens]
    window = bench.perplexity_window
    total, scored, seconds = 0.0, 0, 0.0
    for start in range(0, len(tokens) - 1, window):
        chunk = tokens[start : start + window]
        if len(chunk) < 2:
            break
        t = time.perf_counter()
        logps = backend.score(chunk)
        seconds += time.perf_counter() - t
        total += sum(logps)
        scored += len(logps)
    ppl = math.exp(-total / scored) if scored else None
    prompt_tps, n_prompt = _prompt_speed(backend, window)
    gen_tps, n_out = _generation_speed(backend, bench.generation_tokens)
    return Outcome(
        load_seconds=0.0, peak_rss=0, prompt_tps=prompt_tps,
        generation_tps=gen_tps, perplexity=ppl,
        details={"corpus": CORPUS_NAME, "perplexity_tokens": scored, "window": window,
                 "scoring_seconds": round(seconds, 3), "prompt_tokens": n_prompt,
                 "generated_tokens": n_out},
    )


def _prompt_speed(backend: Backend, n: int) -> tuple[float | None, int]:
    """Prompt tokens/s: a prompt of about `n` corpus tokens, one token generated (the time
    to it is the prompt's evaluation)."""
    text = backend_text(backend, n)
    request = GenerationRequest(model="bench", prompt=text,
                                sampling=Sampling(max_tokens=1, temperature=0, seed=0))
    t = time.perf_counter()
    usage = 0
    for chunk in backend.generate(request, threading.Event()):
        if chunk.prompt_tokens is not None:
            usage = chunk.prompt_tokens
    seconds = time.perf_counter() - t
    return (usage / seconds if seconds > 0 and usage else None), usage


def backend_text(backend: Backend, n: int) -> str:
    """The longest whole-word opening of the corpus within `n` of the model's tokens."""
    words = corpus_text().split(" ")
    lo, hi = 1, len(words)
    while lo < hi:  # binary search on words: tokenizing is cheap next to evaluating
        mid = (lo + hi + 1) // 2
        if len(backend.tokenize(" ".join(words[:mid]))) <= n:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def _generation_speed(backend: Backend, n: int) -> tuple[float | None, int]:
    """Tokens/s of a greedy continuation of the corpus's opening, after its first token
    (so prompt processing is not counted)."""
    request = GenerationRequest(
        model="bench", prompt=corpus_text()[:200],
        sampling=Sampling(max_tokens=n, temperature=0, seed=0),
    )
    first = last = 0.0
    count = 0
    for chunk in backend.generate(request, threading.Event()):
        now = time.perf_counter()
        if not first:
            first = now
        last = now
        if chunk.completion_tokens is not None:
            count = chunk.completion_tokens
    if count < 2 or last <= first:
        return None, count
    # the first chunk marks the first token; the rate counts the tokens after it
    return (count - 1) / (last - first), count


def _measure_embeddings(backend: Backend, bench: BenchSettings) -> Outcome:
    texts = corpus_sentences(bench.embedding_inputs)
    backend.embed(texts[:2])  # warm-up: first-run allocations are not the steady state
    latencies = []
    for text in texts[:5]:
        t = time.perf_counter()
        backend.embed([text])
        latencies.append(time.perf_counter() - t)
    t = time.perf_counter()
    out = backend.embed(texts)
    seconds = time.perf_counter() - t
    return Outcome(
        load_seconds=0.0, peak_rss=0,
        prompt_tps=out.prompt_tokens / seconds,
        embeddings_per_second=len(texts) / seconds,
        vectors=out.vectors.tolist(),
        details={"corpus": CORPUS_NAME, "inputs": len(texts),
                 "latency_ms": round(statistics.median(latencies) * 1000, 3),
                 "dimensions": int(out.vectors.shape[1])},
    )


def agreement(vectors: list[list[float]], reference: list[list[float]]) -> float:
    """Mean cosine between matching rows of two sets of unit vectors."""
    import numpy as np

    a, b = np.asarray(vectors, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        return float("nan")
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.mean())
