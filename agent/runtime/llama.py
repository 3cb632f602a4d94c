"""The GGUF backend: one llama.cpp model and context, prompt formatting and token streaming.

`llama_cpp` is imported inside functions so an agent with nothing loaded stays small and
starts fast. A `LlamaBackend` implements `agent.runtime.backend.Backend`; it is not
thread-safe: the scheduler runs one call at a time per backend, always in the model's own
thread, and passes a `threading.Event` to stop a generation.
"""

from __future__ import annotations

import codecs
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from agent.errors import (
    ChatNotSupported,
    InvalidSampling,
    ModelLoadFailed,
    PromptTooLong,
    TaskNotSupported,
)
from agent.metrics import Metrics
from agent.runtime.stops import find_stop as _find_stop
from agent.runtime.stops import held_back as _held_back
from agent.runtime.templates import ChatFormat, FormattedPrompt, JinjaFormat, chat_format_for
from agent.runtime.types import Chunk, Embeddings, GenerationRequest, ResolvedModel, Sampling
from agent.settings import RuntimeSettings

log = logging.getLogger(__name__)

GPU_TARGETS = ("gpu", "cuda", "rocm", "hip", "vulkan", "metal", "sycl", "opencl")
RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: draw a fresh seed


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
    ) -> None:
        import llama_cpp

        self.resolved = resolved
        self.alias = resolved.alias
        self._llm = llm
        self._metrics = metrics
        self._vocab = llm._model.vocab  # the public API offers no is-end-of-generation test
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self.threads = threads
        self.n_gpu_layers = n_gpu_layers
        self.n_ctx: int = int(llm.n_ctx())
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

    @classmethod
    def load(
        cls,
        resolved: ResolvedModel,
        *,
        threads: int | None = None,
        n_ctx: int = 4096,
        n_gpu_layers: int | None = None,
        metrics: Metrics | None = None,
    ) -> LlamaBackend:
        """Load `resolved.path`; `n_gpu_layers=None` offloads everything when the variant
        targets a GPU this build of llama.cpp can use, else nothing."""
        import llama_cpp

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
            return llama_cpp.Llama(
                model_path=resolved.path,
                n_ctx=ctx,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=n_gpu_layers,
                use_mmap=True,
                seed=RANDOM_SEED,
                verbose=False,
                # An embedding model pools over each text (the GGUF's pooling type, else
                # mean); its batches hold whole texts.
                embedding=embedding,
                n_batch=ctx if embedding else 512,
                n_ubatch=ctx if embedding else 512,
                pooling_type=pooling,
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
            return cls(resolved, llm, threads=threads, n_gpu_layers=n_gpu_layers, metrics=metrics)
        except Exception as exc:  # llama.cpp: ValueError("Failed to load model from file: ...")
            if llm is not None:
                llm.close()
            raise ModelLoadFailed(
                f"model {resolved.alias}: cannot load {resolved.path}: {exc}"
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
        }

    def format_prompt(self, request: GenerationRequest) -> FormattedPrompt:
        """The text the model sees: the prompt as given, or the chat rendered by its template."""
        if request.messages is None:
            return FormattedPrompt(request.prompt or "", source="raw")
        if self._chat is None:
            raise ChatNotSupported(
                f"model {self.alias} has no chat template and none is known for architecture "
                f"{self.architecture or 'unknown'}; use /v1/completions"
            )
        return self._chat(request.messages)

    def tokenize(self, text: str) -> list[int]:
        """Tokens of `text` as a raw prompt (special tokens parsed, BOS as the model wants)."""
        return self.prompt_tokens(FormattedPrompt(text, source="raw"))

    def embed(self, texts: Sequence[str]) -> Embeddings:
        """L2-normalised vectors of `texts`, pooled as the model says (mean by default);
        llama.cpp fills each batch with as many whole texts as fit."""
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
        fresh evaluation of `tokens` (at most n_batch of them) with logits for every one."""
        import llama_cpp
        import numpy as np

        if self.embedding:
            raise TaskNotSupported(f"model {self.alias} is an embedding model")
        llm = self._llm
        n = len(tokens)
        if not 1 < n <= min(llm.n_batch, self.n_ctx):
            raise PromptTooLong(f"score takes 2 to {min(llm.n_batch, self.n_ctx)} tokens")
        llm.reset()
        llm._ctx.kv_cache_clear()
        batch = llm._batch
        batch.set_batch(list(tokens), n_past=0, logits_all=True)
        llm._ctx.decode(batch)
        n_vocab = llm.n_vocab()
        ptr = llama_cpp.llama_get_logits(llm._ctx.ctx)
        logits = np.ctypeslib.as_array(ptr, shape=(n, n_vocab)).astype(np.float64)
        llm._ctx.kv_cache_clear()
        llm.n_tokens = 0
        top = logits[:-1].max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(logits[:-1] - top).sum(axis=1))
        picked = logits[np.arange(n - 1), np.asarray(tokens[1:])]
        return list((picked - lse).tolist())

    def memory_bytes(self) -> int:
        return self.resolved.estimated_memory

    def prompt_tokens(self, formatted: FormattedPrompt) -> list[int]:
        """Tokens of a formatted prompt; a template that writes BOS gets no second one."""
        text = formatted.text
        # A template that writes BOS itself must not get a second one from the tokenizer.
        add_bos = not (self._bos_text and text.startswith(self._bos_text))
        tokens: list[int] = list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos,
                                                    special=True))
        if not tokens:  # an empty prompt: start from BOS so there is something to evaluate
            bos = int(self._llm.token_bos())
            tokens = [bos if bos >= 0 else int(self._llm.token_eos())]
        return tokens

    def generate(self, request: GenerationRequest, cancel: threading.Event) -> Iterator[Chunk]:
        """Stream the completion as text chunks; the last chunk has finish_reason and usage.

        Returns without a final chunk when `cancel` is set (checked before every token)."""
        if self.embedding:
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
        room = self.n_ctx - n_prompt
        limit = min(s.max_tokens, room) if s.max_tokens else room
        stops = [x for x in (*s.stop, *formatted.stop) if x]
        stop_ids = self._stop_token_ids(formatted.stop)
        yield from self._stream(tokens, s, limit, stops, stop_ids, cancel)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._llm.close()

    # -- internals ------------------------------------------------------------------------

    def _grammar(self, s: Sampling) -> Any:
        """llama.cpp's grammar for JSON mode or a JSON Schema (converted by llama.cpp's own
        schema-to-grammar code), or None."""
        if s.json_schema is None and not s.json_object:
            return None
        from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

        if s.json_schema is None:
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        try:
            return LlamaGrammar.from_json_schema(s.json_schema, verbose=False)
        except Exception as exc:  # the converter raises bare ValueErrors and RuntimeErrors
            raise InvalidSampling(f"this JSON schema cannot be turned into a grammar: {exc}",
                                  "response_format.json_schema.schema") from exc

    def _logit_bias(self, bias: dict[int, float]) -> Any:
        """A logits processor adding `bias` (OpenAI's semantics: -100 bans, 100 forces)."""
        if not bias:
            return None
        import numpy as np
        from llama_cpp import LogitsProcessorList

        n_vocab = int(self._llm.n_vocab())
        bad = sorted(t for t in bias if not 0 <= t < n_vocab)
        if bad:
            raise InvalidSampling(f"logit_bias names token ids outside this model's "
                                  f"vocabulary (0..{n_vocab - 1}): {bad[:5]}", "logit_bias")
        ids = np.fromiter(bias, dtype=np.int64, count=len(bias))
        values = np.array([-np.inf if v <= -100 else v for v in bias.values()],
                          dtype=np.float32)

        def apply(_input_ids: Any, scores: Any) -> Any:
            scores[ids] += values
            return scores

        return LogitsProcessorList([apply])

    def _stop_token_ids(self, stop: Sequence[str]) -> set[int]:
        """Template stop strings that are single special tokens (they detokenize to '')."""
        ids: set[int] = set()
        for s in stop:
            toks = self._llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)
            if len(toks) == 1:
                ids.add(int(toks[0]))
        return ids

    def _stream(
        self,
        tokens: list[int],
        s: Sampling,
        limit: int,
        stops: list[str],
        stop_ids: set[int],
        cancel: threading.Event,
    ) -> Iterator[Chunk]:
        llm = self._llm
        grammar = self._grammar(s)
        processors = self._logit_bias(s.logit_bias)
        if s.seed is not None or s.temperature == 0:
            # Reusing a cached prompt prefix evaluates in a different batch shape, which can
            # change float rounding; a seeded or greedy request evaluates from scratch, so
            # the same request gives the same text every time.
            llm.reset()
        llm.set_seed(RANDOM_SEED if s.seed is None else s.seed & 0xFFFFFFFF)
        m = self._metrics
        if m is not None:
            m.prompt_tokens.labels(model=self.alias).inc(len(tokens))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        probs: list[dict[str, Any]] = []  # logprobs of tokens whose text is not yet sent
        n_out = 0
        finish: str | None = None
        by_sequence = False
        last = time.perf_counter()
        gen = llm.generate(
            tokens,
            top_k=s.top_k,
            top_p=s.top_p,
            min_p=s.min_p,
            temp=s.temperature,
            repeat_penalty=s.repeat_penalty,
            frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty,
            grammar=grammar,
            logits_processor=processors,
        )
        try:
            while True:
                if cancel.is_set():
                    return
                token = int(next(gen))
                now = time.perf_counter()
                if self._is_eog(self._vocab, token) or token in stop_ids:
                    finish = "stop"
                    break
                n_out += 1
                if s.logprobs is not None:
                    probs.append(self._token_logprob(token, s.logprobs))
                if m is not None:
                    m.tokens_generated.labels(model=self.alias).inc()
                    if n_out > 1:
                        m.inter_token.labels(model=self.alias).observe(now - last)
                last = now
                pending += decoder.decode(llm.detokenize([token]))
                cut = _find_stop(pending, stops)
                if cut is not None:
                    pending = pending[:cut]
                    finish, by_sequence = "stop", True
                    break
                keep = _held_back(pending, stops)
                emit, pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
                if n_out >= limit:
                    finish = "length"
                    pending = emit + pending
                    break
                if emit:
                    yield Chunk(text=emit, logprobs=probs or None)
                    probs = []
        finally:
            gen.close()
        if not by_sequence:  # bytes after a stop sequence are dropped with it
            pending += decoder.decode(b"", final=True)
        yield Chunk(
            text=pending,
            finish_reason="stop" if finish == "stop" else "length",
            prompt_tokens=len(tokens),
            completion_tokens=n_out,
            logprobs=probs or None,
        )

    def _token_logprob(self, token: int, top: int) -> dict[str, Any]:
        """The sampled token's log-probability under the model (log-softmax of the logits
        it was sampled from, before penalties and grammar) and the `top` likeliest."""
        import numpy as np

        llm = self._llm
        # The context's logits of the last position decoded: the ones `token` was sampled
        # from (llama-cpp-python keeps no copy unless every position's are kept).
        row = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(int(llm.n_vocab()),))
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
    return LlamaBackend.load(
        resolved, threads=settings.threads, n_ctx=settings.context_length, metrics=metrics
    )


def _token_text(llm: Any, token: int) -> str:
    return str(llm._model.token_get_text(token)) if token >= 0 else ""
