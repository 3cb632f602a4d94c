"""ONNX generation: a language model built for onnxruntime-genai (the way Foundry Local
serves ONNX models), driven like the GGUF backend.

The variant is a folder (`genai_config.json`, `model.onnx` + weights, `tokenizer.json`),
materialized by the registry. Prompts are formatted by the agent's own chat templates
(`agent.runtime.templates`, from the template the variant carries), so a chat renders the
same on both backends; stop sequences and cancellation behave as in `agent.runtime.llama`.
The execution provider comes from `agent.runtime.onnx.choose_provider`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from agent.errors import ModelLoadFailed, PromptTooLong, TaskNotSupported
from agent.metrics import Metrics
from agent.runtime.onnx import CPU, ProviderChoice, choose_provider, read_genai_config
from agent.runtime.stops import find_stop, held_back
from agent.runtime.templates import (
    ChatFormat,
    FormattedPrompt,
    JinjaFormat,
    chat_format_for,
    render_request,
)
from agent.runtime.types import Chunk, Embeddings, GenerationRequest, ResolvedModel
from agent.settings import RuntimeSettings

log = logging.getLogger(__name__)

# onnxruntime-genai's names for the execution providers it can append.
GENAI_PROVIDERS = {
    "CUDAExecutionProvider": "cuda",
    "TensorrtExecutionProvider": "NvTensorRtRtx",
    "DmlExecutionProvider": "dml",
    "QNNExecutionProvider": "QNN",
    "OpenVINOExecutionProvider": "OpenVINO",
    "ROCMExecutionProvider": "rocm",
    "MIGraphXExecutionProvider": "MIGraphX",
    "CoreMLExecutionProvider": "CoreML",
    "VitisAIExecutionProvider": "VitisAI",
}


class GenAIBackend:
    """A loaded onnxruntime-genai model that formats prompts and streams completions."""

    def __init__(
        self, resolved: ResolvedModel, model: Any, choice: ProviderChoice, n_ctx: int,
        metrics: Metrics | None,
    ) -> None:
        import onnxruntime_genai as og

        self.resolved = resolved
        self.alias = resolved.alias
        self._model = model
        self._tok = og.Tokenizer(model)
        self.choice = choice
        self.n_ctx = n_ctx
        self._metrics = metrics
        self.architecture = resolved.architecture
        special = _special_tokens(Path(resolved.path).with_name("tokenizer.json"))
        config = read_genai_config(resolved)["model"]
        bos = special.get(int(config.get("bos_token_id", -1)), "")
        eos_ids = config.get("eos_token_id", [])
        eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
        self._eos = {int(i) for i in eos_ids}
        eos = special.get(next(iter(self._eos), -1), "")
        self._chat: ChatFormat | None = chat_format_for(
            resolved.chat_template, self.architecture, bos_token=bos, eos_token=eos
        )
        self.chat_source = ("variant" if isinstance(self._chat, JinjaFormat)
                            else f"fallback:{getattr(self._chat, '__name__', 'unknown')}"
                            if self._chat is not None else None)
        self._closed = False

    @classmethod
    def load(
        cls, resolved: ResolvedModel, settings: RuntimeSettings, metrics: Metrics | None = None
    ) -> GenAIBackend:
        import onnxruntime_genai as og

        folder = str(Path(resolved.path).parent)
        threads = settings.onnx.intra_op_threads or settings.threads

        def open_with(provider: str) -> Any:
            config = og.Config(folder)
            config.clear_providers()
            if provider != CPU:
                config.append_provider(GENAI_PROVIDERS.get(provider, provider))
            if threads:
                config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                    "intra_op_num_threads": threads}}}}))
            return og.Model(config)

        try:
            model, choice = choose_provider(resolved, settings.onnx, open_with)
        except ModelLoadFailed:
            raise
        except Exception as exc:
            log.warning("model %s: cannot load %s: %s", resolved.alias, folder, exc)
            why = str(exc).replace(str(folder), "its folder")
            raise ModelLoadFailed(f"model {resolved.alias}: cannot load variant "
                                  f"{resolved.variant}: {why}") from exc
        own = int(read_genai_config(resolved)["model"].get("context_length") or 0)
        n_ctx = min(x for x in (settings.context_length, own or None,
                                resolved.context_length) if x)
        return cls(resolved, model, choice, n_ctx, metrics)

    # -- the Backend protocol -------------------------------------------------------------

    def details(self) -> dict[str, Any]:
        return {
            "backend": "onnxruntime-genai",
            "provider": self.choice.provider,
            "provider_fallback": self.choice.fallback,
            "architecture": self.architecture,
            "n_ctx": self.n_ctx,
            "chat_format": self.chat_source,
        }

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in self._tok.encode(text)]

    def embed(self, texts: Sequence[str]) -> Embeddings:
        raise TaskNotSupported(f"model {self.alias} generates text; it has no embeddings")

    def memory_bytes(self) -> int:
        return self.resolved.estimated_memory

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._tok = None
            self._model = None

    def format_prompt(self, request: GenerationRequest) -> FormattedPrompt:
        """The text the model sees: the prompt as given, or the chat rendered by its template."""
        return render_request(self._chat, request, alias=self.alias,
                              architecture=self.architecture)

    def generate(self, request: GenerationRequest, cancel: threading.Event) -> Iterator[Chunk]:
        """Stream the completion; the last chunk has finish_reason and usage."""
        import onnxruntime_genai as og

        s = request.sampling
        if s.json_object or s.json_schema is not None:
            raise TaskNotSupported(
                f"model {self.alias}: JSON mode needs a grammar, which the ONNX backend lacks"
            )
        if s.logit_bias or s.logprobs is not None:
            raise TaskNotSupported(
                f"model {self.alias}: logit_bias and logprobs are not supported by the ONNX "
                "backend"
            )
        formatted = self.format_prompt(request)
        tokens = (list(request.prompt_ids) if request.prompt_ids is not None
                  else self.tokenize(formatted.text) or [next(iter(self._eos), 0)])
        n_prompt = len(tokens)
        if n_prompt >= self.n_ctx:
            raise PromptTooLong(f"prompt is {n_prompt} tokens, context window is {self.n_ctx}")
        room = self.n_ctx - n_prompt
        limit = min(s.max_tokens, room) if s.max_tokens else room
        stops = [x for x in (*s.stop, *formatted.stop) if x]
        stop_ids = {ids[0] for ids in (self.tokenize(x) for x in formatted.stop) if len(ids) == 1}
        params = og.GeneratorParams(self._model)
        options: dict[str, Any] = {
            "max_length": n_prompt + limit,
            "do_sample": s.temperature > 0,
            "temperature": max(s.temperature, 1e-4),
            "top_p": s.top_p,
            "top_k": s.top_k or 0,
            "repetition_penalty": s.repeat_penalty,
        }
        if s.seed is not None:
            options["random_seed"] = s.seed & 0x7FFFFFFF
        params.set_search_options(**options)
        gen = og.Generator(self._model, params)
        stream = self._tok.create_stream()
        m = self._metrics
        if m is not None:
            m.prompt_tokens.labels(model=self.alias).inc(n_prompt)
        gen.append_tokens(tokens)
        pending, n_out, finish, last = "", 0, "length", time.perf_counter()
        while n_out < limit:
            if cancel.is_set():
                return
            if gen.is_done():
                finish = "stop"
                break
            gen.generate_next_token()
            token = int(gen.get_next_tokens()[0])
            now = time.perf_counter()
            if token in self._eos or token in stop_ids:
                finish = "stop"
                break
            n_out += 1
            if m is not None:
                m.tokens_generated.labels(model=self.alias).inc()
                if n_out > 1:
                    m.inter_token.labels(model=self.alias).observe(now - last)
            last = now
            pending += stream.decode(token)
            cut = find_stop(pending, stops)
            if cut is not None:
                pending, finish = pending[:cut], "stop"
                break
            keep = held_back(pending, stops)
            emit, pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
            if emit and n_out < limit:
                yield Chunk(text=emit)
            elif emit:
                pending = emit + pending
        yield Chunk(text=pending, finish_reason="stop" if finish == "stop" else "length",
                    prompt_tokens=n_prompt, completion_tokens=n_out)

    def score(self, tokens: Sequence[int]) -> list[float]:
        """Log-probability of each token after the first, given the ones before it."""
        import numpy as np
        import onnxruntime_genai as og

        params = og.GeneratorParams(self._model)
        params.set_search_options(max_length=len(tokens) + 1)
        gen = og.Generator(self._model, params)
        gen.append_tokens(list(tokens))
        logits = np.asarray(gen.get_output("logits"), dtype=np.float32)[0]
        return _log_probs(logits, tokens)


def _log_probs(logits: Any, tokens: Sequence[int]) -> list[float]:
    """log softmax(logits[i])[tokens[i + 1]] for each position but the last."""
    import numpy as np

    rows = np.asarray(logits[: len(tokens) - 1], dtype=np.float64)
    top = rows.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))
    picked = rows[np.arange(len(rows)), np.asarray(tokens[1:])]
    return list((picked - lse).tolist())


def _special_tokens(path: Path) -> dict[int, str]:
    """Added (special) tokens of a tokenizer.json, by id."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {int(t["id"]): str(t["content"]) for t in data.get("added_tokens", [])}
