"""Continuous batching for one llama.cpp model: many sequences, one decode per step.

llama-cpp-python's high-level `Llama` runs one sequence at a time, so an agent built on it
serialises every caller. This engine drives llama.cpp's low-level API the way llama.cpp's
own server does: one context with `parallel` sequence slots over a unified KV cache; each
`step()` puts every generating sequence's next token and at most one chunk of pending
prompt into one `llama_batch`, decodes it once, and samples each sequence from its own
row of logits with its own sampler chain (C-side: no Python work over the vocabulary).
New requests join at the next step and finished ones leave (continuous batching); a long
prompt arriving mid-stream is evaluated a chunk per step, so it delays the others by at
most one chunk.

Each slot is a llama.cpp sequence with a KV stream of the whole window (not one unified
cache: see `agent.runtime.llama._sequences`), so a request may use the full context and its
logits do not depend on what runs beside it.

Prompt-prefix cache: a slot keeps the tokens it evaluated after its request ends. A new
request takes the free slot whose cache shares the longest prefix with its prompt and
evaluates only the rest (the same system prompt, or a chat that continues). The cache lives
in the slots' KV streams, allocated at load and counted in the model's memory estimate; a
request that reuses nothing takes the least recently used slot.

`n` choices share one prompt evaluation: the first sequence evaluates it, the others copy
its KV cells (`llama_memory_seq_cp`) and sample from the same logits with their own chains.

Threading: `step()` and everything that touches the context run in one thread at a time
(the process's compute thread, `agent.runtime.compute`); `submit` and `Ticket.cancel` may
be called from any thread.
"""

from __future__ import annotations

import codecs
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.errors import InvalidSampling, Stopping
from agent.metrics import Metrics
from agent.runtime.stops import find_stop, held_back
from agent.runtime.types import Chunk, Sampling

log = logging.getLogger(__name__)

RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: draw a fresh seed
PENALTY_LAST_N = 64  # tokens the repetition penalties look back over (llama.cpp's default)

Emit = Callable[[Chunk], None]  # called in the compute thread with each chunk


@dataclass(eq=False)
class Job:
    """One request as the engine runs it: its prompt tokens, `n` choices and where their
    chunks go. Built by the backend (tokenised, checked) before it is submitted."""

    tokens: list[int]
    sampling: Sampling
    limit: int  # most tokens per choice
    stops: list[str]
    stop_ids: set[int]
    emit: Emit
    fail: Callable[[BaseException], None]
    cancel: threading.Event
    end: Callable[[], None] = lambda: None  # once, when every choice is over (any reason)
    n: int = 1
    cache: bool = True  # may reuse a slot's cached prefix
    grammar: Any = None  # a llama_cpp LlamaGrammar, or None
    logprobs: Callable[[int, int, int], dict[str, Any]] | None = None  # (idx, token, top)
    submitted: float = field(default_factory=time.perf_counter)
    reused: int = 0  # prompt tokens taken from a slot's cache
    live: int = 0  # choices not yet finished
    failed: bool = False


@dataclass(eq=False)
class _Slot:
    seq: int  # llama.cpp sequence id
    cached: list[int] = field(default_factory=list)  # tokens in this sequence's KV cells
    used: float = 0.0  # when it last served (LRU among idle slots)
    busy: bool = False


@dataclass(eq=False)
class _Choice:
    """One generated sequence: a slot, its sampler chain and its text state."""

    job: Job
    index: int
    slot: _Slot
    sampler: Any
    leader: bool  # evaluates the prompt; followers copy its cells
    fed: int = 0  # prompt tokens in the slot's cells
    last: int = -1  # the token sampled last (evaluated at the next step)
    n_out: int = 0
    pending: str = ""
    probs: list[dict[str, Any]] = field(default_factory=list)
    decoder: Any = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    idx: int = -1  # this step's logits row, or -1
    done: bool = False
    t_last: float = 0.0


def put_token(batch: Any, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
    """Entry `i` of a llama_batch: `token` at position `pos` of sequence `seq`, with its
    logits kept or not."""
    batch.token[i] = token
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq
    batch.logits[i] = logits


class BatchEngine:
    """The sequences of one loaded model and the steps that advance them together."""

    def __init__(
        self,
        llm: Any,
        *,
        alias: str,
        parallel: int,
        chunk: int,
        metrics: Metrics | None,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        import llama_cpp

        self._lc = llama_cpp
        self._llm = llm
        self._ctx = llm._ctx.ctx
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._vocab = llm._model.vocab
        self.alias = alias
        self.parallel = parallel
        self.n_ctx = int(llm.n_ctx()) // parallel  # each sequence's own window
        self.chunk = max(1, min(chunk, int(llm.n_batch)))
        self._cap = self.chunk + parallel  # tokens one step may put in the batch
        self._batch = llama_cpp.llama_batch_init(self._cap, 0, parallel)
        self._slots = [_Slot(seq=i) for i in range(parallel)]
        self._waiting: deque[Job] = deque()  # submitted, not yet given slots
        self._lock = threading.Lock()  # guards _waiting (submit may come from any thread)
        self._choices: list[_Choice] = []
        self._undo: list[tuple[_Choice, int, int]] = []  # this step's additions
        self._eog: list[int] | None = None
        self._metrics = metrics
        # The per-token series, looked up once (a labels() call per token adds up).
        self._m_tokens = self._m_gap = self._m_batch = None
        if metrics is not None:
            self._m_tokens = metrics.tokens_generated.labels(model=alias)
            self._m_gap = metrics.inter_token.labels(model=alias)
            self._m_batch = metrics.batch_sequences.labels(model=alias)
        self._pieces: dict[int, bytes] = {}  # token -> its text's bytes, filled as met
        self.wake = wake
        self.closed = False

    # -- any thread ----------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        if job.n > self.parallel:
            raise InvalidSampling(f"n is at most {self.parallel} here (runtime.parallel)", "n")
        with self._lock:
            if self.closed:  # unloaded meanwhile: nobody would ever step this job
                raise Stopping(f"model {self.alias} was unloaded")
            self._waiting.append(job)
        self.wake()

    def has_work(self) -> bool:
        return bool(self._choices) or bool(self._waiting)

    def active(self) -> int:
        """Sequences generating now (the batch size of the next step)."""
        return len(self._choices)

    # -- the compute thread --------------------------------------------------------------

    def step(self) -> None:
        """Admit waiting jobs into free slots, then advance every sequence by one decode."""
        if self.closed:
            return
        self._drop_cancelled()
        self._admit()
        if not self._choices:
            return
        batch = self._fill()
        if batch == 0:
            return
        rc = self._decode(batch)
        if rc != 0:
            self._decode_failed(rc)
            return
        self._sample()

    def close(self) -> None:
        """Fail what is still running, free the batch and the samplers (compute thread)."""
        if self.closed:
            return
        with self._lock:  # under the lock: a submit either lands before or sees `closed`
            self.closed = True
            waiting, self._waiting = list(self._waiting), deque()
        for job in waiting:
            job.fail(Stopping(f"model {self.alias} was unloaded"))
            job.end()
        for c in list(self._choices):
            self._finish(c, None, error=Stopping(f"model {self.alias} was unloaded"))
        self._lc.llama_batch_free(self._batch)

    # -- admission -----------------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        for c in [c for c in self._choices if c.job.cancel.is_set()]:
            self._finish(c, None)
        with self._lock:
            gone = [j for j in self._waiting if j.cancel.is_set()]
            for j in gone:
                self._waiting.remove(j)
        for j in gone:
            j.end()

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._waiting:
                    return
                job = self._waiting[0]
                free = [s for s in self._slots if not s.busy]
                if len(free) < job.n:
                    return  # FIFO: the head waits for slots; nothing overtakes it
                self._waiting.popleft()
            try:
                self._start(job, free)
            except Exception as exc:
                job.fail(exc)
                job.end()

    def _start(self, job: Job, free: list[_Slot]) -> None:
        lc = self._lc
        tokens = job.tokens
        # The free slot sharing the longest prefix leads; followers take the least useful.
        free.sort(key=lambda s: (_common(s.cached, tokens), -s.used), reverse=True)
        if not job.cache:
            free.sort(key=lambda s: s.used)  # the least recently used cache goes
        lead = free[0]
        common = min(_common(lead.cached, tokens), len(tokens) - 1)  # re-evaluate the last
        if not job.cache:
            common = 0
        if common < len(lead.cached):
            if not lc.llama_memory_seq_rm(self._mem, lead.seq, common, -1):
                common = 0  # a memory that cannot cut mid-sequence: start over
                self._clear(lead)
            del lead.cached[common:]
        job.reused = common
        job.live = job.n
        m = self._metrics
        if m is not None:
            m.prompt_tokens.labels(model=self.alias).inc(len(tokens))
            if common:
                m.prompt_cache_hits.labels(model=self.alias).inc()
                m.prompt_cache_tokens.labels(model=self.alias).inc(common)
        slots = [lead, *free[::-1][: job.n - 1]] if job.n > 1 else [lead]
        for i, slot in enumerate(slots):
            if i:
                self._clear(slot)
            slot.busy = True
            c = _Choice(job=job, index=i, slot=slot, sampler=self._sampler(job, i),
                        leader=i == 0, fed=common if i == 0 else 0)
            self._choices.append(c)

    def _sampler(self, job: Job, index: int) -> Any:
        from llama_cpp._internals import LlamaSampler

        s = job.sampling
        n_vocab = int(self._llm.n_vocab())
        chain = LlamaSampler()  # type: ignore[no-untyped-call]
        bias = {t: (float("-inf") if b <= -100 else b) for t, b in s.logit_bias.items()}
        if s.ignore_eos:
            bias.update(dict.fromkeys(self._eog_tokens(), float("-inf")))
        if bias:
            chain.add_logit_bias(n_vocab, bias)
        if s.repeat_penalty != 1.0 or s.frequency_penalty or s.presence_penalty:
            chain.add_penalties(n_vocab, PENALTY_LAST_N, s.repeat_penalty,
                                s.frequency_penalty, s.presence_penalty)
        if job.grammar is not None:
            chain.add_grammar(self._llm._model, job.grammar)
        if s.temperature == 0:
            chain.add_greedy()  # type: ignore[no-untyped-call]
        else:
            chain.add_top_k(s.top_k)
            chain.add_top_p(s.top_p, 1)
            chain.add_min_p(s.min_p, 1)
            chain.add_temp(s.temperature)
            seed = RANDOM_SEED if s.seed is None else (s.seed + index) & 0xFFFFFFFF
            chain.add_dist(seed)
        return chain

    # -- one step ------------------------------------------------------------------------

    def _fill(self) -> int:
        """Put this step's tokens in the batch: one per generating sequence, and prompt
        tokens up to one chunk (the oldest request's first). Returns the batch size.

        Sequences go in in sequence-id order: with a KV stream per sequence llama.cpp cuts
        a batch into ubatches of consecutive sequence ids (split_equal, sequential), so
        four streams put in as 2, 0, 3, 1 were decoded as two graphs a step, 40% slower
        (measured: 38 ms a step instead of 27 for SmolLM2, once slots were reused out of
        order)."""
        b = self._batch
        n = 0
        self._undo = [(c, len(c.slot.cached), c.fed) for c in self._choices]
        feed: dict[int, int] = {}  # id(choice) -> prompt tokens it feeds this step
        budget = self.chunk
        for c in self._choices:  # admission order: the oldest prompt first
            c.idx = -1
            if c.last >= 0 or not c.leader or budget == 0:
                continue
            feed[id(c)] = take = min(budget, len(c.job.tokens) - c.fed)
            budget -= take
        for c in sorted(self._choices, key=lambda c: c.slot.seq):
            if c.last >= 0:
                self._put(n, c.last, len(c.slot.cached), c.slot.seq, True)
                c.slot.cached.append(c.last)
                c.idx = n
                n += 1
                continue
            take = feed.get(id(c), 0)
            toks = c.job.tokens
            for k in range(take):
                pos = c.fed + k
                last = pos == len(toks) - 1
                self._put(n, toks[pos], pos, c.slot.seq, last)
                if last:
                    c.idx = n
                n += 1
            c.slot.cached.extend(toks[c.fed:c.fed + take])
            c.fed += take
        b.n_tokens = n
        return n

    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        put_token(self._batch, i, token, pos, seq, logits)

    def _decode(self, n: int) -> int:
        if self._m_batch is not None:
            self._m_batch.observe(
                sum(1 for c in self._choices if c.idx >= 0 or c.fed < len(c.job.tokens)))
        return int(self._lc.llama_decode(self._ctx, self._batch))

    def _decode_failed(self, rc: int) -> None:
        """No room in the KV cells (1) or a failure. llama.cpp restores its cells when a
        decode fails, so this step's additions are taken back from the slots' lists;
        then idle caches are dropped or, with none left, the longest sequence ends
        ('length': its share of the context is used up). Any other code fails them all."""
        from agent.errors import GenerationFailed

        for c, cached, fed in self._undo:
            del c.slot.cached[cached:]
            c.fed = fed
        if rc == 1:  # cannot happen with a window per sequence; ends the longest if it does
            longest = max(self._choices, key=lambda c: len(c.slot.cached))
            self._finish(longest, "length")
            return
        for c in list(self._choices):
            self._finish(c, None, error=GenerationFailed(
                f"model {self.alias}: llama_decode failed ({rc})"))

    def _sample(self) -> None:
        lc = self._lc
        now = time.perf_counter()
        for c in list(self._choices):
            if c.idx < 0:
                continue
            if c.last < 0 and not c.leader:
                continue
            if c.leader and c.last < 0:
                # The prompt is in: followers copy its cells and sample the same row.
                for f in self._choices:
                    if f.job is c.job and not f.leader and f.last < 0:
                        lc.llama_memory_seq_cp(self._mem, c.slot.seq, f.slot.seq, -1, -1)
                        f.slot.cached = list(c.slot.cached)
                        f.fed = c.fed
                        f.idx = c.idx
                        self._advance(f, now)
                        f.idx = -1  # sampled: not again in this loop
            self._advance(c, now)

    def _advance(self, c: _Choice, now: float) -> None:
        job = c.job
        token = int(self._lc.llama_sampler_sample(c.sampler.sampler, self._ctx, c.idx))
        if self._lc.llama_vocab_is_eog(self._vocab, token) or token in job.stop_ids:
            self._finish(c, "stop")
            return
        c.n_out += 1
        if job.logprobs is not None and job.sampling.logprobs is not None:
            c.probs.append(job.logprobs(c.idx, token, job.sampling.logprobs))
        if self._m_tokens is not None and self._m_gap is not None:
            self._m_tokens.inc()
            if c.n_out > 1:
                self._m_gap.observe(now - c.t_last)
        c.t_last = now
        c.pending += c.decoder.decode(self._piece(token))
        cut = find_stop(c.pending, job.stops)
        if cut is not None:
            c.pending = c.pending[:cut]
            self._finish(c, "stop", by_sequence=True)
            return
        if c.n_out >= job.limit or len(c.slot.cached) + 1 >= self.n_ctx:
            self._finish(c, "length")
            return
        keep = held_back(c.pending, job.stops)
        emit, c.pending = c.pending[: len(c.pending) - keep], c.pending[len(c.pending) - keep:]
        c.last = token
        if emit:
            # model_construct: these fields are built here, not read from anyone (no
            # validation on the per-token path).
            job.emit(Chunk.model_construct(text=emit, index=c.index, logprobs=c.probs or None))
            c.probs = []

    def _finish(self, c: _Choice, reason: str | None, *, by_sequence: bool = False,
                error: BaseException | None = None) -> None:
        """End a choice: its final chunk (reason None: cancelled, nothing more is sent),
        its slot back to the pool with its cache kept."""
        if c.done:
            return
        c.done = True
        self._choices.remove(c)
        c.slot.busy = False
        c.slot.used = time.monotonic()
        if not c.leader and c.last < 0:
            self._clear(c.slot)  # a follower that never got the prompt's cells
        c.sampler.close()
        job = c.job
        job.live -= 1
        if error is not None:
            if not job.failed:
                job.failed = True
                job.fail(error)
        elif reason is not None:
            if not by_sequence:
                c.pending += c.decoder.decode(b"", final=True)
            job.emit(Chunk(
                text=c.pending, index=c.index,
                finish_reason="stop" if reason == "stop" else "length",
                prompt_tokens=len(job.tokens), completion_tokens=c.n_out,
                cached_tokens=job.reused, logprobs=c.probs or None,
            ))
        if job.live == 0:
            job.end()

    # -- helpers -------------------------------------------------------------------------

    def _clear(self, slot: _Slot) -> None:
        self._lc.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
        slot.cached = []

    def _eog_tokens(self) -> list[int]:
        """Every end-of-generation token of the vocabulary (found once, on first use)."""
        if self._eog is None:
            is_eog, vocab = self._lc.llama_vocab_is_eog, self._vocab
            self._eog = [t for t in range(int(self._llm.n_vocab())) if is_eog(vocab, t)]
        return self._eog

    def _piece(self, token: int) -> bytes:
        """The bytes of `token`'s text (cached: a vocabulary's pieces never change)."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = bytes(self._llm.detokenize([token]))
        return piece


def _common(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i

