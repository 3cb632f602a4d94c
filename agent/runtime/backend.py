"""The backend seam: what a loaded model must do, and which backend loads which format.

A backend is one loaded model in one runtime: llama.cpp for GGUF (`agent.runtime.llama`),
ONNX Runtime for ONNX (`agent.runtime.onnx`: embedding models on a session,
onnxruntime-genai folders in `agent.runtime.onnx_genai`). The residency and scheduler
drive every backend the same way: `load_backend` opens it in the model's own thread,
`generate`/`embed`/`score`/`tokenize` run there one call at a time, `close` frees it.
Backends are registered by variant format with the module that implements them,
imported only when a model of that format loads, so an idle agent carries no runtime at
all; `available_formats()` tells selection (through the hardware
profile) which formats this installation can run, without importing anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from agent.errors import ModelLoadFailed

if TYPE_CHECKING:
    from agent.metrics import Metrics
    from agent.runtime.types import Chunk, Embeddings, GenerationRequest, ResolvedModel
    from agent.settings import RuntimeSettings

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendSpec",
    "Loader",
    "available_formats",
    "load_backend",
]


class Backend(Protocol):
    """A loaded model as the scheduler drives it. Not thread-safe: one call at a time,
    always from the model's own thread."""

    def generate(self, request: GenerationRequest, cancel: threading.Event) -> Iterator[Chunk]:
        """Stream the completion; the last chunk has finish_reason and usage. Returns
        without a final chunk once `cancel` is set (checked before every token)."""
        ...

    def embed(self, texts: Sequence[str]) -> Embeddings:
        """One L2-normalised vector per text, run in batches (raises TaskNotSupported for a
        model that cannot embed)."""
        ...

    def score(self, tokens: Sequence[int]) -> list[float]:
        """Log-probability of each token after the first given those before it (for
        perplexity); TaskNotSupported for a model that does not predict tokens."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """The model's tokens for `text`, as a prompt would be tokenized."""
        ...

    def memory_bytes(self) -> int:
        """Bytes this loaded model holds (weights, cache, buffers), as best known."""
        ...

    def details(self) -> dict[str, Any]:
        """What `edge-agent ps` shows about it (runtime, threads, context, ...)."""
        ...

    def close(self) -> None:
        """Free the model; safe to call twice."""
        ...


Loader = Callable[["ResolvedModel"], Backend]


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """Where the backend for one format lives and what it needs installed."""

    format: str
    runtime: str  # for messages: "llama.cpp", "onnxruntime"
    factory: str  # "module:function", called as function(resolved, settings, metrics)
    requires: tuple[str, ...]  # top-level modules that must be importable

    def installed(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.requires)


BACKENDS: dict[str, BackendSpec] = {
    "gguf": BackendSpec("gguf", "llama.cpp", "agent.runtime.llama:open_backend", ("llama_cpp",)),
    # Embedding models need only onnxruntime + tokenizers; generative ONNX models also
    # need onnxruntime_genai, checked when one loads.
    "onnx": BackendSpec("onnx", "onnxruntime", "agent.runtime.onnx:open_backend",
                        ("onnxruntime", "tokenizers")),
}


def available_formats() -> tuple[str, ...]:
    """Formats whose backend is installed and importable here (nothing is imported)."""
    return tuple(fmt for fmt, spec in sorted(BACKENDS.items()) if spec.installed())


def load_backend(
    resolved: ResolvedModel, settings: RuntimeSettings, metrics: Metrics | None = None
) -> Backend:
    """Open `resolved` with the backend registered for its format (in the calling thread)."""
    spec = BACKENDS.get(resolved.format)
    if spec is None:
        known = ", ".join(sorted(BACKENDS))
        raise ModelLoadFailed(
            f"model {resolved.alias}: variant {resolved.variant} is {resolved.format}; this "
            f"agent has backends for: {known}"
        )
    if not spec.installed():
        raise ModelLoadFailed(
            f"model {resolved.alias}: variant {resolved.variant} needs {spec.runtime}, which "
            "is not installed on this device"
        )
    module, _, name = spec.factory.partition(":")
    factory: Callable[..., Backend] = getattr(importlib.import_module(module), name)
    return factory(resolved, settings, metrics)
