"""The ONNX backend: execution providers, session options, and embedding models.

`open_backend` is the backend registry's factory for ONNX variants: an embedding model
runs here on an ONNX Runtime session (tokenized with the `tokenizers` package from the
variant's tokenizer.json; mean pooling over the attention mask, then L2 normalisation, as
sentence-transformers models require); a generative model is an onnxruntime-genai folder
and runs in `agent.runtime.onnx_genai`. Both take their execution provider from
`provider_plan`: the provider the variant asks for, then the others that serve its target
in the configured priority order (`runtime.onnx.providers`), then the CPU, each only if
`onnxruntime.get_available_providers()` lists it. A provider that is missing or fails to
initialise is skipped with its reason logged and kept in `details()["provider_fallback"]`.

onnxruntime, tokenizers and numpy are imported when a model loads, never before.
"""

from __future__ import annotations

import json
import logging
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import ModelLoadFailed, TaskNotSupported
from agent.metrics import Metrics
from agent.runtime.llama import default_threads
from agent.runtime.types import Chunk, Embeddings, GenerationRequest, ResolvedModel
from agent.settings import OnnxSettings, RuntimeSettings

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
# Providers that can serve a variant's target, by target (the priority among them comes
# from settings). A target not listed runs on the CPU.
TARGET_PROVIDERS: dict[str, tuple[str, ...]] = {
    "cuda": ("TensorrtExecutionProvider", "CUDAExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider"),
    "rocm": ("MIGraphXExecutionProvider", "ROCMExecutionProvider"),
    "migraphx": ("MIGraphXExecutionProvider", "ROCMExecutionProvider"),
    "dml": ("DmlExecutionProvider",),
    "metal": ("CoreMLExecutionProvider",),
    "coreml": ("CoreMLExecutionProvider",),
    "npu-qualcomm-hexagon": ("QNNExecutionProvider",),
    "npu-intel-npu": ("OpenVINOExecutionProvider",),
    "npu-amd-xdna": ("VitisAIExecutionProvider",),
    "openvino": ("OpenVINOExecutionProvider",),
}
_GRAPH_LEVEL = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
# Token-level outputs of sentence-transformers exports (mean-pooled here), by preference.
TOKEN_OUTPUTS = ("last_hidden_state", "token_embeddings")
POOLED_OUTPUTS = ("sentence_embedding", "embeddings")


@dataclass
class ProviderChoice:
    """The provider a model runs on, and why any before it were passed over."""

    provider: str
    fallback: list[str] = field(default_factory=list)  # "<provider>: <reason>"


def provider_plan(
    resolved: ResolvedModel, settings: OnnxSettings, available: Sequence[str]
) -> tuple[list[str], list[str]]:
    """(providers to try in order, reasons for those skipped as unavailable).

    The variant's own requirement ('onnxruntime:<Provider>') first, then the providers
    that serve its target in `settings.providers` order, then the CPU."""
    wanted: list[str] = []
    req = resolved.runtime_requirement or ""
    runtime, _, feature = req.partition(":")
    if runtime == "onnxruntime" and feature:
        wanted.append(feature)
    serving = TARGET_PROVIDERS.get(resolved.target.lower(), ())
    priority = {p: i for i, p in enumerate(settings.providers)}
    wanted += sorted((p for p in serving if p in priority and p not in wanted),
                     key=priority.__getitem__)
    if CPU not in wanted:
        wanted.append(CPU)
    tries, skipped = [], []
    listed = set(available)
    for p in wanted:
        if p in listed or p == CPU:
            tries.append(p)
        else:
            skipped.append(f"{p}: not available in this onnxruntime (it lists "
                           f"{', '.join(available) or 'none'})")
    return tries, skipped


def choose_provider(
    resolved: ResolvedModel,
    settings: OnnxSettings,
    open_with: Callable[[str], Any],
    available: Sequence[str] | None = None,
) -> tuple[Any, ProviderChoice]:
    """Open the model with the first provider that initialises: `open_with(provider)`
    returns the opened thing or raises; the CPU is the last resort."""
    if available is None:
        import onnxruntime

        available = onnxruntime.get_available_providers()
    tries, skipped = provider_plan(resolved, settings, available)
    reasons = list(skipped)
    for provider in tries:
        try:
            opened = open_with(provider)
        except Exception as exc:  # the provider's own error: a missing library, a bad device
            reasons.append(f"{provider}: failed to initialise: {' '.join(str(exc).split())}")
            if provider == CPU:
                raise ModelLoadFailed(
                    f"model {resolved.alias}: cannot load {resolved.path}: {'; '.join(reasons)}"
                ) from exc
            continue
        for r in reasons:
            log.warning("%s: falling back from %s", resolved.alias, r)
        return opened, ProviderChoice(provider, reasons)
    raise AssertionError("unreachable: the CPU is always tried")  # pragma: no cover


def session_options(settings: RuntimeSettings) -> Any:
    """ONNX Runtime session options from the settings (threads, optimisation, arena)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    onnx = settings.onnx
    opts.intra_op_num_threads = onnx.intra_op_threads or settings.threads or default_threads()
    opts.inter_op_num_threads = onnx.inter_op_threads
    opts.execution_mode = (ort.ExecutionMode.ORT_SEQUENTIAL if onnx.inter_op_threads == 1
                           else ort.ExecutionMode.ORT_PARALLEL)
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                            _GRAPH_LEVEL[onnx.graph_optimization])
    opts.enable_cpu_mem_arena = onnx.memory_arena
    opts.log_severity_level = 3  # errors only: provider fallbacks are reported by us
    return opts


def open_session(path: str, settings: RuntimeSettings, provider: str) -> Any:
    """An InferenceSession on exactly `provider` (nodes it cannot run still go to the CPU);
    raises when onnxruntime would silently run on something else."""
    import onnxruntime as ort

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = ort.InferenceSession(path, session_options(settings), providers=[provider])
    if provider not in session.get_providers():
        said = "; ".join(str(w.message) for w in caught) or "no reason given"
        raise RuntimeError(f"onnxruntime initialised {', '.join(session.get_providers())} "
                           f"instead ({said})")
    return session


class OnnxEmbedder:
    """A loaded ONNX embedding model: tokenizer + session, batches padded to their longest
    text (texts sorted by length, so a batch pads little)."""

    def __init__(
        self, resolved: ResolvedModel, session: Any, tokenizer: Any, choice: ProviderChoice,
        settings: RuntimeSettings,
    ) -> None:
        self.resolved = resolved
        self.alias = resolved.alias
        self._session = session
        self._tok = tokenizer
        self.choice = choice
        self.batch_size = settings.onnx.embedding_batch_size
        self.threads = session.get_session_options().intra_op_num_threads
        self._inputs = {i.name for i in session.get_inputs()}
        self._output, self._pooled = _embedding_output(session)
        self.dimensions = int(session.get_outputs()[self._output].shape[-1])
        self._closed = False

    @classmethod
    def load(cls, resolved: ResolvedModel, settings: RuntimeSettings) -> OnnxEmbedder:
        tokenizer = _load_tokenizer(resolved)
        session, choice = choose_provider(
            resolved, settings.onnx, lambda p: open_session(resolved.path, settings, p)
        )
        return cls(resolved, session, tokenizer, choice, settings)

    def embed(self, texts: Sequence[str]) -> Embeddings:
        import numpy as np

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self.dimensions), dtype=np.float32)
        tokens = 0
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            vectors, n = self._run([texts[i] for i in rows])
            out[rows] = vectors
            tokens += n
        return Embeddings(out, tokens)

    def _run(self, texts: list[str]) -> tuple[NDArray[np.float32], int]:
        import numpy as np

        encoded = self._tok.encode_batch(texts)
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
        feed: dict[str, Any] = {"input_ids": ids}
        if "attention_mask" in self._inputs:
            feed["attention_mask"] = mask
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = np.array([e.type_ids for e in encoded], dtype=np.int64)
        hidden = self._session.run(
            [self._session.get_outputs()[self._output].name], feed
        )[0].astype(np.float32, copy=False)
        if self._pooled:
            pooled = hidden
        else:  # mean over the real tokens, as sentence-transformers pools
            weights = mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled / np.maximum(norms, 1e-12), int(mask.sum())

    def generate(self, request: GenerationRequest, cancel: threading.Event) -> Iterator[Chunk]:
        raise TaskNotSupported(f"model {self.alias} is an embedding model; use /v1/embeddings")

    def score(self, tokens: Sequence[int]) -> list[float]:
        raise TaskNotSupported(f"model {self.alias} is an embedding model; it has no perplexity")

    def tokenize(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    def memory_bytes(self) -> int:
        return self.resolved.estimated_memory

    def details(self) -> dict[str, Any]:
        return {
            "backend": "onnxruntime",
            "provider": self.choice.provider,
            "provider_fallback": self.choice.fallback,
            "threads": self.threads,
            "dimensions": self.dimensions,
            "batch_size": self.batch_size,
            "pooling": "model" if self._pooled else "mean",
        }

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._session = None


def _embedding_output(session: Any) -> tuple[int, bool]:
    """Which output holds the embeddings, and whether it is already pooled: a known name,
    else the first float output of rank 3 (token level)."""
    outs = session.get_outputs()
    for names, pooled in ((TOKEN_OUTPUTS, False), (POOLED_OUTPUTS, True)):
        for name in names:
            for i, o in enumerate(outs):
                if o.name == name:
                    return i, pooled
    for i, o in enumerate(outs):
        if o.type == "tensor(float)" and len(o.shape or ()) == 3:
            return i, False
    raise ModelLoadFailed("the ONNX model has no output that holds token embeddings "
                          f"(outputs: {', '.join(o.name for o in outs)})")


def _load_tokenizer(resolved: ResolvedModel) -> Any:
    """The variant's tokenizer.json (a side file), padding to the longest text of a batch
    and truncating where the tokenizer says (else at the model's context)."""
    from tokenizers import Tokenizer

    path = Path(resolved.path).with_name("tokenizer.json")
    if not path.is_file():
        raise ModelLoadFailed(
            f"model {resolved.alias}: variant {resolved.variant} has no tokenizer.json; "
            "import the model's folder (model.onnx + tokenizer.json)"
        )
    tok = Tokenizer.from_file(str(path))
    pad = tok.padding or {}
    pad_id = int(pad.get("pad_id", 0))
    pad_token = str(pad.get("pad_token", "[PAD]"))
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token)  # no fixed length: batch longest
    if tok.truncation is None:
        tok.enable_truncation(max_length=min(resolved.context_length or 512, 512))
    return tok


def _is_genai(resolved: ResolvedModel) -> bool:
    return Path(resolved.path).with_name("genai_config.json").is_file()


def open_backend(
    resolved: ResolvedModel, settings: RuntimeSettings, metrics: Metrics | None = None
) -> Any:
    """The backend registry's factory for ONNX variants (agent.runtime.backend)."""
    if resolved.task == "embedding":
        return OnnxEmbedder.load(resolved, settings)
    if _is_genai(resolved):
        from agent.runtime.onnx_genai import GenAIBackend

        return GenAIBackend.load(resolved, settings, metrics=metrics)
    raise ModelLoadFailed(
        f"model {resolved.alias}: an ONNX {resolved.task} model runs through "
        "onnxruntime-genai, which needs its folder (genai_config.json next to the model); "
        "build one with its model builder and import the folder"
    )


def read_genai_config(resolved: ResolvedModel) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        Path(resolved.path).with_name("genai_config.json").read_text(encoding="utf-8")
    )
    return data
