"""What the API hands the runtime and gets back: requests, streamed chunks, loaded models.

Errors: the `InferenceError` branch of `agent.errors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # numpy is loaded with a runtime, not by the API at start-up
    import numpy as np
    from numpy.typing import NDArray


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class Sampling(BaseModel):
    """Sampling parameters shared by chat and completions (OpenAI names + llama.cpp's)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.8, ge=0, le=2)
    top_p: float = Field(default=0.95, gt=0, le=1)
    top_k: int = Field(default=40, ge=0)
    min_p: float = Field(default=0.05, ge=0, le=1)
    repeat_penalty: float = Field(default=1.0, gt=0)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, max_length=8)
    json_object: bool = Field(default=False, description="Constrain output to a JSON object.")
    json_schema: str | None = Field(
        default=None, description="Constrain output to this JSON Schema (JSON text)."
    )
    json_schema_strict: bool = Field(
        default=False, description="Refuse a json_schema with keywords the grammar cannot "
        "enforce (OpenAI's strict: true), instead of enforcing the rest.")
    logit_bias: dict[int, float] = Field(
        default_factory=dict, description="Added to these tokens' logits; -100 bans a token."
    )
    ignore_eos: bool = Field(
        default=False, description="llama.cpp's: never end at end-of-generation tokens "
        "(they are banned), so exactly max_tokens are generated.")
    logprobs: int | None = Field(
        default=None, ge=0, le=20,
        description="Report each generated token's log-probability and this many of the most "
        "likely alternatives (None: not at all).",
    )


class GenerationRequest(BaseModel):
    """One chat or completion call. Exactly one of `messages` / `prompt` is set."""

    model: str
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    prompt_ids: list[int] | None = Field(
        default=None, description="A completion prompt given as token ids (used as is)."
    )
    sampling: Sampling = Field(default_factory=Sampling)
    n: int = Field(default=1, ge=1, le=16, description="Choices to generate (share the prompt).")
    cache_prompt: bool | None = Field(
        default=None,
        description="Reuse a cached prompt prefix (llama.cpp's name). Default: yes, unless "
        "the request is greedy (temperature 0) or seeded: a prompt's tail evaluated in "
        "another batch shape can differ in the last bits, which can flip a near-tie, and "
        "such a request asks for the same text every time. `true` trades that for speed.",
    )
    keep_alive: float | None = Field(
        default=None, description="Seconds to keep the model loaded after this request."
    )


class Chunk(BaseModel):
    """A piece of a streamed generation. The last chunk has finish_reason and usage."""

    text: str = ""
    index: int = 0  # which of the request's `n` choices this chunk belongs to
    finish_reason: Literal["stop", "length"] | None = None
    # With Sampling.logprobs: the tokens this chunk's text came from, each
    # {"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}.
    logprobs: list[dict[str, Any]] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens taken from the prefix cache


class LoadedModel(BaseModel):
    """A loaded model as `edge-agent ps` and /agent/v1/loaded show it."""

    alias: str
    variant: str
    sha256: str
    memory_bytes: int
    loaded_at: float
    expires_at: float | None
    busy: bool
    queue_depth: int
    details: dict[str, Any] = Field(default_factory=dict)


class ResolvedModel(BaseModel):
    """What the lifecycle needs to load a model: the chosen variant and its file."""

    alias: str
    variant: str
    format: Literal["gguf", "onnx"]
    quantization: str
    target: str
    sha256: str
    path: str
    task: Literal["chat", "completion", "embedding"]
    architecture: str | None = None
    chat_template: str | None = None
    context_length: int | None = None
    estimated_memory: int = Field(ge=0, description="Bytes selection estimated for it.")
    runtime_requirement: str | None = Field(
        default=None, description="e.g. 'onnxruntime:CUDAExecutionProvider' (from the variant)."
    )


@dataclass(frozen=True, slots=True)
class Embeddings:
    """Vectors for some texts (float32, one row each, in their order) and the tokens the
    model read for them."""

    vectors: NDArray[np.float32]
    prompt_tokens: int
