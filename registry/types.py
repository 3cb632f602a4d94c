"""Shared vocabulary of the registry: tasks, formats, quantizations, targets, variant specs.

`VariantSpec` is the plain-data view of a variant that the catalog, the database and
selection all agree on, so selection never touches the ORM.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Task = Literal["chat", "completion", "embedding"]
Format = Literal["gguf", "onnx"]
# cpu | cuda | rocm | vulkan | metal | npu-<kind>, e.g. npu-intel-npu, npu-qualcomm-hexagon
Target = str

GB = 1_000_000_000

# Approximate bits per weight as stored, including block scales (llama.cpp's own figures
# for the K-quants; ternary TQ1_0 packs 5 trits per byte plus scales).
BITS_PER_WEIGHT: dict[str, float] = {
    "F32": 32.0,
    "F16": 16.0,
    "BF16": 16.0,
    "Q8_0": 8.5,
    "Q6_K": 6.5625,
    "Q5_K_M": 5.69,
    "Q5_K_S": 5.54,
    "Q5_1": 6.0,
    "Q5_0": 5.5,
    "Q4_K_M": 4.85,
    "Q4_K_S": 4.58,
    "Q4_1": 5.0,
    "Q4_0": 4.5,
    "IQ4_NL": 4.5,
    "Q3_K_M": 3.91,
    "Q2_K": 2.96,
    "TQ2_0": 2.06,
    "TQ1_0": 1.69,
    "I2_S": 2.0,
    "fp32": 32.0,
    "fp16": 16.0,
    "bf16": 16.0,
    "int8": 8.0,
    "int4": 4.0,
}

# Quality rank: higher keeps more of the source model's accuracy. Ternary quants of a
# model *trained* ternary (BitNet b1.58) are lossless; the variant says so with `native`.
QUALITY_RANK: dict[str, int] = {
    "F32": 100, "fp32": 100,
    "F16": 95, "BF16": 95, "fp16": 95, "bf16": 95,
    "Q8_0": 90, "int8": 85,
    "Q6_K": 80,
    "Q5_K_M": 72, "Q5_1": 70, "Q5_K_S": 69, "Q5_0": 68,
    "Q4_K_M": 60, "Q4_1": 57, "Q4_K_S": 56, "IQ4_NL": 55, "Q4_0": 52, "int4": 50,
    "Q3_K_M": 40,
    "Q2_K": 25,
    "TQ2_0": 20, "I2_S": 20, "TQ1_0": 18,
}  # fmt: skip


def bits_per_weight(quantization: str) -> float | None:
    return BITS_PER_WEIGHT.get(quantization)


def quality_rank(quantization: str, *, native: bool = False) -> int:
    """Rank of a quantization; a native (trained-at-this-precision) variant ranks as F16."""
    if native:
        return QUALITY_RANK["F16"]
    return QUALITY_RANK.get(quantization, 0)


class Measured(BaseModel):
    """What `edge-agent bench` measured for one variant on this hardware (registry.bench)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    load_seconds: float = Field(ge=0)
    peak_rss: int = Field(ge=0, description="Peak resident memory of the benchmark process.")
    prompt_tps: float | None = Field(default=None, description="Prompt tokens processed per s.")
    generation_tps: float | None = Field(default=None, description="Tokens generated per s.")
    perplexity: float | None = Field(default=None, description="On the bench corpus.")
    embeddings_per_second: float | None = None
    agreement: float | None = Field(
        default=None,
        description="Embedding models: mean cosine with the highest-precision variant.",
    )

    @property
    def speed(self) -> float | None:
        """The figure selection calls speed: tokens generated/s, else embeddings/s."""
        return self.generation_tps if self.generation_tps is not None else (
            self.embeddings_per_second)


class VariantSpec(BaseModel):
    """One runnable form of a model, as selection sees it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_alias: str
    name: str = Field(description="Unique within the model, e.g. 'gguf-q4_k_m-cpu'.")
    format: Format
    quantization: str
    bits_per_weight: float | None = None
    target: Target = "cpu"
    runtime_requirement: str | None = Field(
        default=None,
        description="What the runtime must offer, e.g. 'onnxruntime:QNNExecutionProvider'.",
    )
    file_size: int | None = Field(default=None, ge=0, description="Bytes on disk.")
    sha256: str | None = None
    parameter_count: int | None = Field(default=None, ge=0)
    context_length: int | None = Field(default=None, ge=0)
    n_layers: int | None = Field(default=None, ge=0)
    n_embd: int | None = Field(default=None, ge=0)
    n_head_kv: int | None = Field(default=None, ge=0)
    n_head: int | None = Field(default=None, ge=0)
    head_dim: int | None = Field(
        default=None, ge=0, description="Per-head width when it is not n_embd / n_head."
    )
    native: bool = Field(default=False, description="Model was trained at this precision.")
    installed: bool = Field(default=False, description="Its file is in the local store.")
    estimated_memory: int | None = Field(
        default=None, ge=0, description="Bytes, if already estimated; else selection estimates."
    )
    measured: Measured | None = Field(
        default=None, description="Benchmark results on this hardware, if any."
    )

    @property
    def quality(self) -> int:
        return quality_rank(self.quantization, native=self.native)
