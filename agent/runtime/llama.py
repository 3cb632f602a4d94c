"""The GGUF backend: one llama.cpp model and context, prompt formatting, and requests
turned into jobs for its batching engine (`agent.runtime.batching`).

`llama_cpp` is imported inside functions so an agent with nothing loaded stays small and
starts fast. A `LlamaBackend` implements `agent.runtime.backend.Backend` and, beyond it,
`start` (a request joins the running batch; chunks come back through callbacks), which
the scheduler uses for concurrent requests. Everything that touches the context runs on
one thread at a time: the process's compute thread once `attach`ed (what the agent does),
else the caller's (tests and tools drive `generate`, which steps the engine itself).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.errors import (
    InvalidSampling,
    ModelLoadFailed,
    PromptTooLong,
    Stopping,
    TaskNotSupported,
)
from agent.metrics import Metrics
from agent.runtime.batching import BatchEngine, Job, put_token
from agent.runtime.compute import ComputeThread, shared_compute
from agent.runtime.templates import (
    ChatFormat,
    FormattedPrompt,
    JinjaFormat,
    chat_format_for,
    render_request,
)
from agent.runtime.types import Chunk, Embeddings, GenerationRequest, ResolvedModel, Sampling
from agent.settings import FlashAttention, RuntimeSettings

log = logging.getLogger(__name__)

_PARAMS_LOCK = threading.Lock()


@functools.cache
def build_cpu_features() -> tuple[str, ...]:
    """The CPU features this process's llama.cpp was compiled for (its system info, read
    once), as CpuInfo.features names them."""
    import llama_cpp

    from agent.hardware.runtimes import llama_cpu_features

    return llama_cpu_features(llama_cpp.llama_print_system_info().decode("utf-8", "replace"))


def extra_buffers_are_safe() -> bool:
    """Whether llama.cpp may repack weights into its extra CPU buffer types. Not where the
    build uses Intel AMX: its matrix kernel (`ggml_backend_amx_mul_mat`) segfaults on the
    first batch holding several sequences (seen here on a Sapphire Rapids Xeon with the
    vendored llama.cpp of llama-cpp-python 0.3.36; upstream ggml-org/llama.cpp#20824, closed
    unfixed). The daemon would die on the first concurrent request; the AVX-512 kernels it
    falls back to serve the same GGUF correctly."""
    return "amx_int8" not in build_cpu_features()


@functools.cache
def cpu_features_missing() -> tuple[str, ...]:
    """CPU features this process's llama.cpp was compiled for that the CPU it runs on
    lacks. A wheel built with -march=native on a newer machine (a wheelhouse's build
    host) loads, then stops the daemon with SIGILL in its first matrix kernel; checked
    before every load instead, against the live CPU (never a hardware tree under test)."""
    from agent.hardware.cpu import detect_cpu, read_cpuinfo
    from agent.hardware.devroot import DeviceRoot
    from registry.profile import RuntimeInfo, llama_features_missing

    live = DeviceRoot(Path("/"))
    cpu = detect_cpu(live, read_cpuinfo(live))
    return llama_features_missing(cpu, RuntimeInfo(llama_cpu_features=build_cpu_features()))


@contextmanager
def model_params(**fields: Any) -> Iterator[None]:
    """`Llama()` builds its `llama_model_params` from the library's defaults and loads the
    model at once, with no argument for some fields (`use_extra_bufts`): while this is
    entered, the defaults it reads carry `fields`. Serialised, as it swaps a module
    attribute that every load in the process reads."""
    import llama_cpp.llama_cpp as lc

    original = lc.llama_model_default_params

    def defaults() -> Any:
        params = original()
        for name, value in fields.items():
            setattr(params, name, value)
        return params

    with _PARAMS_LOCK:
        lc.llama_model_default_params = defaults
        try:
            yield
        finally:
            lc.llama_model_default_params = original

GRAMMAR_MAX_DEPTH = 1000
"""Nesting of a constrained-output grammar (llama.cpp returns no sampler from about 2000)."""
GRAMMAR_MAX_BYTES = 1 << 20
_GRAMMAR_LITERALS = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]')


def grammar_depth(text: str) -> int:
    """How deeply the groups of a GBNF grammar nest (quoted literals and [classes] skipped)."""
    depth = deepest = 0
    for paren in re.findall(r"[()]", _GRAMMAR_LITERALS.sub("", text)):
        depth += 1 if paren == "(" else -1
        deepest = max(deepest, depth)
    return deepest


GPU_TARGETS = ("gpu", "cuda", "rocm", "hip", "vulkan", "metal", "sycl", "opencl")

# llama.cpp's own log lines, as debug records of the agent's log (see route_llama_logs).
cpp_log = logging.getLogger("agent.runtime.llama.cpp")
_log_callback: Any = None  # the ctypes callback llama.cpp holds: it must never be freed
_log_lock = threading.Lock()
_log_partial: list[str] = []  # text of a line llama.cpp has not finished yet


def route_llama_logs() -> None:
    """Send llama.cpp's log (ggml's too) to the `agent.runtime.llama.cpp` logger at debug
    level, instead of llama-cpp-python's callback, which prints to stderr: with
    verbose=False it still printed some lines (a Gemma 3 load wrote "llama_kv_cache_iswa:
    using full-size SWA cache (ref: https://github.com/ggml-org/llama.cpp/pull/...)" twice,
    an embedding load a pooling note), unformatted, in the middle of the daemon's log.
    They are diagnostics for whoever debugs llama.cpp: `logging.level = debug` shows
    them, in the agent's format. Idempotent; the callback is kept referenced for the
    life of the process (llama.cpp calls it from any thread, until exit)."""
    global _log_callback
    with _log_lock:
        if _log_callback is not None:
            return
        import ctypes

        import llama_cpp

        @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
        def callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
            _llama_log_text(text)

        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        _log_callback = callback


def _llama_log_text(text: bytes | None) -> None:
    """One piece of llama.cpp's log: pieces are joined into lines (llama.cpp writes some
    lines in several calls, and progress dots without a newline), each logged once."""
    if not text or not cpp_log.isEnabledFor(logging.DEBUG):
        return
    with _log_lock:
        _log_partial.append(text.decode("utf-8", "replace"))
        if "\n" not in _log_partial[-1]:
            return
        *lines, rest = "".join(_log_partial).split("\n")
        _log_partial[:] = [rest] if rest else []
    for line in lines:
        if line.strip():
            cpp_log.debug("%s", line.rstrip())


def default_threads() -> int:
    """Physical cores: hyper-threads slow llama.cpp's matrix kernels down."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def wants_gpu(target: str) -> bool:
    return target.lower().startswith(GPU_TARGETS)


class LlamaBackend:
    """A loaded GGUF model that formats prompts and streams completions."""

    def __init__(
        self,
        resolved: ResolvedModel,
        llm: Any,
        *,
        threads: int,
        n_gpu_layers: int,
        metrics: Metrics | None = None,
        parallel: int = 1,
        chunk: int = 256,
    ) -> None:
        self.resolved = resolved
        self.alias = resolved.alias
        self._llm = llm
        self._metrics = metrics
        self.threads = threads
        self.n_gpu_layers = n_gpu_layers
        self.n_ctx: int = int(llm.n_ctx()) // max(1, int(llm.context_params.n_seq_max))
        self.embedding = resolved.task == "embedding"
        meta: dict[str, str] = dict(llm.metadata or {})
        self.architecture = resolved.architecture or meta.get("general.architecture")
        template = resolved.chat_template or meta.get("tokenizer.chat_template")
        self._bos_text = _token_text(llm, llm.token_bos())
        self._chat: ChatFormat | None = chat_format_for(
            template,
            self.architecture,
            bos_token=self._bos_text,
            eos_token=_token_text(llm, llm.token_eos()),
        )
        self.chat_source: str | None = None
        if isinstance(self._chat, JinjaFormat):
            self.chat_source = "gguf"
        elif self._chat is not None:
            self.chat_source = f"fallback:{getattr(self._chat, '__name__', 'unknown')}"
        self._closed = False
        self.engine: BatchEngine | None = None
        if not self.embedding:
            self.engine = BatchEngine(llm, alias=self.alias, parallel=parallel, chunk=chunk,
                                      metrics=metrics)
        self.executor: ComputeThread | None = None  # set by attach()
        self._scorer: Any = None  # score()'s own small context

    @classmethod
    def load(
        cls,
        resolved: ResolvedModel,
        *,
        threads: int | None = None,
        n_ctx: int = 4096,
        n_gpu_layers: int | None = None,
        metrics: Metrics | None = None,
        parallel: int = 4,
        chunk: int = 256,
        flash_attention: FlashAttention = "auto",
    ) -> LlamaBackend:
        """Load `resolved.path`; `n_gpu_layers=None` offloads everything when the variant
        targets a GPU this build of llama.cpp can use, else nothing. A generating model
        gets `parallel` sequences, each with its own KV window of `n_ctx` cells
        (`_sequences`); scoring uses a small context of its own, made when first asked."""
        import llama_cpp

        if missing := cpu_features_missing():
            from registry.selection_devices import llama_build_mismatch

            raise ModelLoadFailed(f"model {resolved.alias}: cannot load variant "
                                  f"{resolved.variant}: {llama_build_mismatch(missing)}")
        route_llama_logs()
        threads = threads or default_threads()
        if n_gpu_layers is None:
            n_gpu_layers = -1 if wants_gpu(resolved.target) else 0
        if n_gpu_layers != 0 and not llama_cpp.llama_supports_gpu_offload():
            log.info("%s targets %s but this llama.cpp has no GPU offload; using the CPU",
                     resolved.alias, resolved.target)
            n_gpu_layers = 0
        if resolved.context_length:
            n_ctx = min(n_ctx, resolved.context_length)

        embedding = resolved.task == "embedding"
        pooling = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED  # the GGUF's own

        def open_model(ctx: int) -> Any:
            with model_params(use_extra_bufts=extra_buffers_are_safe()):
                return open_llama(ctx)

        def open_llama(ctx: int) -> Any:
            return llama_cpp.Llama(
                model_path=resolved.path,
                n_ctx=ctx,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=n_gpu_layers,
                use_mmap=True,
                seed=0xFFFFFFFF,  # LLAMA_DEFAULT_SEED: each sampler chain seeds itself
                verbose=False,
                # An embedding model pools over each text (the GGUF's pooling type, else
                # mean); its batches hold whole texts.
                embedding=embedding,
                n_batch=ctx if embedding else 512,
                n_ubatch=ctx if embedding else 512,
                pooling_type=pooling,
                # Sliding-window layers keep every cell, so a cached prefix stays usable
                # (Gemma 3: ~18 KB a token more; without it the prefix cache misses).
                swa_full=None if embedding else True,
            )

        llm: Any = None
        try:
            llm = open_model(n_ctx)
            if embedding and llm.pooling_type() == llama_cpp.LLAMA_POOLING_TYPE_NONE:
                llm.close()  # a model that names no pooling: mean, as sentence embedders do
                pooling = llama_cpp.LLAMA_POOLING_TYPE_MEAN
                llm = open_model(n_ctx)
            trained = int(llm._model.n_ctx_train())
            if 0 < trained < n_ctx:  # the registry did not know the model's window
                llm.close()
                llm = open_model(trained)
            if not embedding:
                _sequences(llm, parallel, flash_attention)
            return cls(resolved, llm, threads=threads, n_gpu_layers=n_gpu_layers,
                       metrics=metrics, parallel=parallel, chunk=chunk)
        except Exception as exc:  # llama.cpp: ValueError("Failed to load model from file: ...")
            if llm is not None:
                llm.close()
            # The path stays in the agent's log: a 503 tells a local app which variant
            # failed, not where the store keeps its blobs ([hardening] review).
            log.warning("model %s: cannot load %s: %s", resolved.alias, resolved.path, exc)
            why = str(exc).replace(str(resolved.path), "its file")
            raise ModelLoadFailed(
                f"model {resolved.alias}: cannot load variant {resolved.variant}: {why}"
            ) from exc

    @property
    def chat_supported(self) -> bool:
        return self._chat is not None

    def details(self) -> dict[str, Any]:
        """What `edge-agent ps` shows about this backend."""
        return {
            "backend": "llama.cpp",
            "architecture": self.architecture,
            "n_ctx": self.n_ctx,
            "threads": self.threads,
            "n_gpu_layers": self.n_gpu_layers,
            "chat_format": self.chat_source,
            "parallel": self.engine.parallel if self.engine else 1,
            "prompt_chunk": self.engine.chunk if self.engine else None,
        }

    def attach(self, compute: ComputeThread) -> None:
        """Hand the engine to `compute`, which steps it from now on (and runs every other
        call on this model: the residency uses it as the model's executor)."""
        self.executor = compute
        if self.engine is not None:
            self.engine.wake = compute.wake
            compute.attach(self.engine)

    def format_prompt(self, request: GenerationRequest) -> FormattedPrompt:
        """The text the model sees: the prompt as given, or the chat rendered by its template."""
        return render_request(self._chat, request, alias=self.alias,
                              architecture=self.architecture)

    def tokenize(self, text: str) -> list[int]:
        """Tokens of `text` as a raw prompt (special tokens parsed, BOS as the model wants)."""
        return self.prompt_tokens(FormattedPrompt(text, source="raw"))

    def embed(self, texts: Sequence[str]) -> Embeddings:
        """L2-normalised vectors of `texts`, pooled as the model says (mean by default);
        llama.cpp fills each batch with as many whole texts as fit."""
        self._check_open()
        import numpy as np

        if not self.embedding:
            raise TaskNotSupported(
                f"model {self.alias} is a {self.resolved.task} model; import an embedding "
                "model (or this file with --task embedding) for /v1/embeddings"
            )
        vectors, count = self._llm.embed(list(texts), normalize=True, truncate=True,
                                         return_count=True)
        return Embeddings(np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1),
                          int(count))

    def score(self, tokens: Sequence[int]) -> list[float]:
        """Log-probability of each token after the first given those before it, from one
        fresh evaluation of `tokens` (at most n_batch of them) with logits for every one,
        in a small context of its own (the running generations and their caches stay)."""
        self._check_open()
        import llama_cpp
        import numpy as np

        if self.engine is None:
            raise TaskNotSupported(f"model {self.alias} is an embedding model")
        llm = self._llm
        n = len(tokens)
        if not 1 < n <= min(llm.n_batch, self.n_ctx):
            raise PromptTooLong(f"score takes 2 to {min(llm.n_batch, self.n_ctx)} tokens")

        ctx = self._scoring_context()
        b = llm._batch.batch
        for i, t in enumerate(tokens):
            put_token(b, i, t, i, 0, True)
        b.n_tokens = n
        try:
            if llama_cpp.llama_decode(ctx.ctx, b) != 0:
                raise PromptTooLong(f"model {self.alias}: cannot score {n} tokens")
            ptr = llama_cpp.llama_get_logits(ctx.ctx)
            logits = np.ctypeslib.as_array(ptr, shape=(n, int(llm.n_vocab()))).astype(np.float64)
        finally:
            ctx.kv_cache_clear()
        top = logits[:-1].max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(logits[:-1] - top).sum(axis=1))
        picked = logits[np.arange(n - 1), np.asarray(tokens[1:])]
        return list((picked - lse).tolist())

    def _scoring_context(self) -> Any:
        """A one-sequence context of n_batch cells for `score`, made on first use (the
        benchmarks score; serving never does) and kept: a few MB on the models here."""
        if self._scorer is None:
            from llama_cpp import _internals

            p = self._llm.context_params
            params = type(p).from_buffer_copy(p)
            params.n_ctx = params.n_seq_max = 0
            params.n_ctx, params.n_seq_max = int(self._llm.n_batch), 1
            self._scorer = _internals.LlamaContext(model=self._llm._model, params=params,
                                                   verbose=False)
        return self._scorer

    def memory_bytes(self) -> int:
        return self.resolved.estimated_memory

    def prompt_tokens(self, formatted: FormattedPrompt) -> list[int]:
        """Tokens of a formatted prompt; a template that writes BOS gets no second one."""
        self._check_open()
        text = formatted.text
        # A template that writes BOS itself must not get a second one from the tokenizer.
        add_bos = not (self._bos_text and text.startswith(self._bos_text))
        tokens: list[int] = list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos,
                                                    special=True))
        if not tokens:  # an empty prompt: start from BOS so there is something to evaluate
            bos = int(self._llm.token_bos())
            tokens = [bos if bos >= 0 else int(self._llm.token_eos())]
        return tokens

    def start(
        self,
        request: GenerationRequest,
        cancel: threading.Event,
        emit: Callable[[Chunk], None],
        fail: Callable[[BaseException], None],
        end: Callable[[], None],
    ) -> None:
        """Check and tokenise `request`, then add it to the running batch: `emit` gets
        its chunks (with `index` per choice; each choice's last has finish_reason), `fail`
        an error met while generating, `end` is called once when all is over. Request
        errors (prompt too long, bad token ids, no chat template) raise here."""
        job = self._job(request, cancel, emit, fail, end)
        assert self.engine is not None
        self.engine.submit(job)

    def generate(self, request: GenerationRequest, cancel: threading.Event) -> Iterator[Chunk]:
        """Stream the completion as text chunks; the last chunk has finish_reason and usage.

        Returns without a final chunk when `cancel` is set (checked before every token).
        Outside the compute thread of an attached model, waits for that thread to step;
        otherwise steps the engine itself (with any other sequences it holds)."""
        out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        over = object()
        job = self._job(request, cancel, out.put, out.put, lambda: out.put(over))
        engine = self.engine
        assert engine is not None
        engine.submit(job)
        inline = self.executor is None or self.executor.in_thread()
        try:
            while True:
                if inline:
                    while out.empty():
                        engine.step()
                item = out.get()
                if item is over:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()  # a caller that stops reading ends its sequence
            if inline:
                while not engine.closed and job.live and out.empty():
                    engine.step()
            else:
                engine.wake()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.engine is not None:
                if self.executor is not None:
                    self.executor.detach(self.engine)
                self.engine.close()
            if self._scorer is not None:
                self._scorer.close()
            self._llm.close()

    # -- internals ------------------------------------------------------------------------

    def _check_open(self) -> None:
        """After close() the llama.cpp model is freed: any call into it would crash the
        process, so a call that arrives late (a request racing an unload) is refused."""
        if self._closed:
            raise Stopping(f"model {self.alias} was unloaded")

    def _job(
        self,
        request: GenerationRequest,
        cancel: threading.Event,
        emit: Callable[[Chunk], None],
        fail: Callable[[BaseException], None],
        end: Callable[[], None],
    ) -> Job:
        self._check_open()
        if self.engine is None:
            raise TaskNotSupported(f"model {self.alias} is an embedding model; use "
                                   "/v1/embeddings")
        if request.prompt_ids is not None:  # token ids: no template, no tokenizer
            formatted = FormattedPrompt("", source="raw")
            tokens = list(request.prompt_ids)
            n_vocab = int(self._llm.n_vocab())
            bad = [t for t in tokens if not 0 <= t < n_vocab]
            if bad or not tokens:
                raise InvalidSampling(f"prompt token ids must be 0..{n_vocab - 1} (got "
                                      f"{bad[:5] or 'none'})", "prompt")
        else:
            formatted = self.format_prompt(request)
            tokens = self.prompt_tokens(formatted)
        s = request.sampling
        n_prompt = len(tokens)
        if n_prompt >= self.n_ctx:
            raise PromptTooLong(
                f"prompt is {n_prompt} tokens, context window is {self.n_ctx}"
            )
        if request.n > self.engine.parallel:
            raise InvalidSampling(f"n is at most {self.engine.parallel} on this device "
                                  "(runtime.parallel)", "n")
        self._check_bias(s.logit_bias)
        room = self.n_ctx - n_prompt
        return Job(
            tokens=tokens,
            sampling=s,
            limit=min(s.max_tokens, room) if s.max_tokens else room,
            stops=[x for x in (*s.stop, *formatted.stop) if x],
            stop_ids=self._stop_token_ids(formatted.stop),
            emit=emit,
            fail=fail,
            end=end,
            cancel=cancel,
            n=request.n,
            cache=(request.cache_prompt if request.cache_prompt is not None
                   else s.seed is None and s.temperature > 0),
            grammar=self._grammar(s),
            logprobs=self._token_logprob if s.logprobs is not None else None,
        )

    def _grammar(self, s: Sampling) -> Any:
        """llama.cpp's grammar for JSON mode or a JSON Schema, or None. The schema is
        converted by llama-cpp-python's converter with integer bounds added
        (`agent.runtime.json_grammar`: its own ignores them, and `maximum: 120` let a
        model write 1653). With `strict`, a schema holding a keyword the grammar cannot
        enforce (a number's bounds, multipleOf, an unknown format, ...) is refused,
        naming the keyword and where it is: the client asked for replies that validate,
        and a best-effort grammar could not promise that."""
        if s.json_schema is None and not s.json_object:
            return None
        from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

        from agent.runtime.json_grammar import schema_to_gbnf, unenforced

        if s.json_schema is None:
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        param = "response_format.json_schema.schema"
        try:
            text = schema_to_gbnf(s.json_schema)
        except (Exception, MemoryError, RecursionError) as exc:  # bare ValueErrors and more
            raise InvalidSampling(f"this JSON schema cannot be turned into a grammar: {exc}",
                                  param) from exc
        if s.json_schema_strict and (loose := unenforced(json.loads(s.json_schema))):
            where = ", ".join(f'"{k}" at {p or "/"}' for p, k in loose[:5])
            more = f" and {len(loose) - 5} more" if len(loose) > 5 else ""
            raise InvalidSampling(
                f"strict: the grammar cannot enforce {where}{more}; remove "
                f"{'it' if len(loose) == 1 else 'them'}, or send strict: false for best "
                "effort (such keywords are then not enforced)", param)
        self._check_grammar(text, param)
        return LlamaGrammar.from_string(text, verbose=False)

    def _check_grammar(self, text: str, param: str) -> None:
        """Refuse a grammar llama.cpp would crash on or refuse. The converter writes a
        string's maxLength (an array's maxItems) N as N nested optional groups; llama.cpp
        parses groups recursively, so a schema with maxLength 100000 overflowed the stack
        and killed the daemon (SIGSEGV), and one of 2000 made llama.cpp return no sampler,
        which a chain then used. Bounded here, then checked by llama.cpp itself."""
        import llama_cpp

        if len(text) > GRAMMAR_MAX_BYTES:
            raise InvalidSampling(
                f"the grammar for this JSON schema would be {len(text):,} bytes (at most "
                f"{GRAMMAR_MAX_BYTES:,}); use fewer or smaller properties", param)
        depth = grammar_depth(text)
        if depth > GRAMMAR_MAX_DEPTH:
            raise InvalidSampling(
                f"this JSON schema nests {depth} levels deep as a grammar (at most "
                f"{GRAMMAR_MAX_DEPTH}): maxLength, maxItems and their minimums may be at "
                f"most {GRAMMAR_MAX_DEPTH}", param)
        vocab = llama_cpp.llama_model_get_vocab(self._llm._model.model)
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, text.encode(), b"root")
        if not sampler:
            raise InvalidSampling("llama.cpp cannot use the grammar built from this JSON "
                                  "schema", param)
        llama_cpp.llama_sampler_free(sampler)

    def _check_bias(self, bias: dict[int, float]) -> None:
        """logit_bias may name only this model's token ids (OpenAI: -100 bans, 100 forces;
        the engine's sampler chain applies it)."""
        n_vocab = int(self._llm.n_vocab())
        bad = sorted(t for t in bias if not 0 <= t < n_vocab)
        if bad:
            raise InvalidSampling(f"logit_bias names token ids outside this model's "
                                  f"vocabulary (0..{n_vocab - 1}): {bad[:5]}", "logit_bias")

    def _stop_token_ids(self, stop: Sequence[str]) -> set[int]:
        """Template stop strings that are single special tokens (they detokenize to '')."""
        ids: set[int] = set()
        for s in stop:
            toks = self._llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)
            if len(toks) == 1:
                ids.add(int(toks[0]))
        return ids

    def _token_logprob(self, idx: int, token: int, top: int) -> dict[str, Any]:
        """The sampled token's log-probability under the model (log-softmax of the logits
        it was sampled from, before penalties and grammar) and the `top` likeliest; `idx`
        is the token's row of logits in the step that produced it."""
        import llama_cpp
        import numpy as np

        llm = self._llm
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, idx),
                                    shape=(int(llm.n_vocab()),))
        logits = row.astype(np.float64)
        peak = float(logits.max())
        norm = peak + float(np.log(np.exp(logits - peak).sum()))

        def entry(t: int) -> dict[str, Any]:
            raw = bytes(llm.detokenize([t]))
            return {"token": raw.decode("utf-8", "replace"),
                    "logprob": round(float(logits[t]) - norm, 6), "bytes": list(raw)}

        out = entry(token)
        best: list[int] = []
        if top:
            part = np.argpartition(-logits, top - 1)[:top]
            best = [int(t) for t in part[np.argsort(-logits[part])]]
        out["top_logprobs"] = [entry(t) for t in best]
        return out


def open_backend(
    resolved: ResolvedModel, settings: RuntimeSettings, metrics: Metrics | None = None
) -> LlamaBackend:
    """The backend registry's factory for GGUF variants (agent.runtime.backend)."""
    backend = LlamaBackend.load(
        resolved, threads=settings.threads, n_ctx=settings.context_length, metrics=metrics,
        parallel=settings.parallel, chunk=settings.prompt_chunk,
        flash_attention=settings.flash_attention,
    )
    backend.attach(shared_compute())
    return backend


def _sequences(llm: Any, n_seq: int, flash_attention: FlashAttention = "auto") -> None:
    """Give `llm` a context of `n_seq` sequences, each with a KV stream of the full window,
    and flash attention as `flash_attention` says (the high-level constructor makes one
    sequence without it); the old context is freed first.

    Separate streams, not one unified cache: in a unified cache a sequence's cells sit
    wherever free cells were, and attention over them rounds differently, so a greedy
    text generated beside others drifted from the one it gets alone (measured: token 13 of
    a SmolLM2 answer flipped). With a stream each, a sequence's logits are bit-identical
    alone or batched. The cost is memory: `n_seq` full windows of KV (selection counts
    them in the model's estimate: agent.runtime.resolver `task_policy`).

    Flash attention "auto" is llama-server's default, and the [throughput] benchmark's
    baseline runs with it: on this 2-core CPU it decoded 15-25% faster (SmolLM2, 1 and 4
    streams). Its logits differ from llama-cpp-python's own `Llama()` (which leaves it off)
    in the last digits, so comparisons with that must turn it on too."""
    import llama_cpp
    from llama_cpp import _internals

    params = llm.context_params
    params.n_ctx = int(params.n_ctx) * n_seq
    params.n_seq_max = n_seq
    params.kv_unified = False
    params.flash_attn_type = {
        "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
        "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
        "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
    }[flash_attention]
    llm._ctx.close()
    llm._ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)


def _token_text(llm: Any, token: int) -> str:
    return str(llm._model.token_get_text(token)) if token >= 0 else ""
