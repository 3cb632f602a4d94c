"""The selection policy: how a device trades quality, speed and memory (policies/selection.yaml).

Validated by pydantic (unknown keys are errors); invalid files raise `PolicyError` naming
file, line and field. The JSON Schema committed in policies/schemas/ is generated from
`SelectionPolicy`. `registry.selection` applies it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator

from policies import packaged
from registry.errors import PolicyError
from registry.types import QUALITY_RANK
from registry.yamlfile import load_yaml_model

DEFAULT_POLICY_PATH = packaged("selection.yaml")
POLICY_SCHEMA_PATH = packaged("schemas/selection.schema.json")

DeviceClass = Literal["npu", "gpu", "cpu"]
Preference = Literal["quality", "balanced", "speed"]
KvCacheType = Literal["f32", "f16", "q8_0", "q4_0"]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MemoryPolicy(_Strict):
    """How much memory a model may use, and how its use is estimated."""

    fraction: float = Field(
        default=0.75, gt=0, le=1,
        description="Share of total system RAM a model may use (CPU, integrated GPU and NPU).",
    )
    max_bytes: ByteSize | None = Field(
        default=None,
        description="Absolute cap on the system-RAM budget (bytes, or '4GB'/'4GiB'); null: none.",
    )
    headroom_bytes: ByteSize = Field(
        default=ByteSize(500_000_000),
        description="Subtracted from the system-RAM budget for the OS and the agent itself.",
    )
    gpu_headroom_bytes: ByteSize = Field(
        default=ByteSize(500_000_000),
        description="Subtracted from a discrete GPU's memory (CUDA context, fragmentation).",
    )
    overhead_bytes: ByteSize = Field(
        default=ByteSize(200_000_000),
        description="Fixed runtime overhead added to every estimate (compute buffers, code).",
    )
    overhead_fraction: float = Field(
        default=0.05, ge=0, le=1,
        description="Runtime overhead proportional to the weights, added to every estimate.",
    )


class QuantizationRule(_Strict):
    """Allowed and forbidden quantizations (case-insensitive globs, e.g. 'Q4_*', 'int4')."""

    allow: tuple[str, ...] | None = Field(
        default=None,
        description="A variant must match one of these; null inherits the default rule.",
    )
    forbid: tuple[str, ...] | None = Field(
        default=None,
        description="A variant matching any of these is rejected; null inherits the default.",
    )


class QuantizationPolicy(_Strict):
    """Which quantizations may be selected, by default and per model alias."""

    default: QuantizationRule = Field(
        default=QuantizationRule(allow=("*",), forbid=()),
        description="Rule for models no entry of `models` matches (unset: allow all, forbid none).",
    )
    models: dict[str, QuantizationRule] = Field(
        default_factory=dict,
        description=(
            "Per-model rules keyed by alias or alias glob ('qwen3-*'). An exact alias wins, "
            "else the longest matching glob; unset fields inherit from `default`."
        ),
    )


class MeasuredPolicy(_Strict):
    """How benchmark results on this hardware (`edge-agent bench`) rank variants, when a
    variant that fits has them: they replace the static preference."""

    use: bool = Field(
        default=True, description="Rank by measurements when this hardware has any."
    )
    goal: Literal["quality", "speed"] = Field(
        default="quality",
        description=(
            "quality: lowest measured perplexity (embedding models: highest agreement with "
            "the highest-precision variant) among variants meeting the floors below; speed: "
            "fastest measured among those within `tolerance` of the best quality."
        ),
    )
    min_tokens_per_second: float | None = Field(
        default=10.0, ge=0,
        description="Generation speed a language-model variant must have measured; null: none.",
    )
    min_embeddings_per_second: float | None = Field(
        default=None, ge=0,
        description="Throughput an embedding variant must have measured; null: none.",
    )
    max_memory_fraction: float | None = Field(
        default=None, gt=0, le=1,
        description="Share of total RAM the measured peak memory may reach; null: none.",
    )
    tolerance: float = Field(
        default=0.05, ge=0, le=1,
        description=(
            "goal=speed: how far from the best quality still counts as equal: a relative "
            "perplexity increase (0.05: 5 %), or an absolute drop in embedding agreement."
        ),
    )


class SelectionPolicy(_Strict):
    """How selection trades quality, speed and memory on a device."""

    prefer: Preference = Field(
        default="balanced",
        description=(
            "quality: highest quality rank; speed: fewest bits per weight; balanced: highest "
            "quality among variants using at most `balanced_fraction` of the budget, else the "
            "smallest estimate."
        ),
    )
    min_quality: str | None = Field(
        default="Q4_K_M",
        description=(
            "Variants of lower quality rank than this quantization rank below every variant at "
            "or above it (still chosen when nothing better fits). null: no floor."
        ),
    )
    balanced_fraction: float = Field(
        default=0.5, gt=0, le=1,
        description="prefer=balanced: share of the budget a variant may use and still be "
        "comfortable.",
    )
    device_order: tuple[DeviceClass, ...] = Field(
        default=("npu", "gpu", "cpu"), min_length=1,
        description="Devices in order of preference; a device left out is never used.",
    )
    context_length: int = Field(
        default=4096, ge=1,
        description="Context the KV cache is sized for in estimates (capped by the model's own).",
    )
    kv_cache_type: KvCacheType = Field(
        default="f16", description="Element type of the KV cache: f32, f16, q8_0 or q4_0."
    )
    kv_windows: int = Field(
        default=1, ge=1,
        description=(
            "KV windows of `context_length` a GGUF variant holds at once, one per concurrent "
            "sequence; its KV cache counts this many times (ONNX variants hold one). The "
            "agent sets it from runtime.parallel for a generating model, 1 for an embedding "
            "model."
        ),
    )
    memory: MemoryPolicy = Field(
        default_factory=MemoryPolicy, description="Memory budget and estimate parameters."
    )
    quantizations: QuantizationPolicy = Field(
        default_factory=QuantizationPolicy,
        description="Allowed and forbidden quantizations, by default and per model.",
    )
    measured: MeasuredPolicy = Field(
        default_factory=MeasuredPolicy,
        description="Ranking by benchmark results measured on this hardware.",
    )

    @field_validator("min_quality")
    @classmethod
    def _known_quality(cls, v: str | None) -> str | None:
        if v is not None and v not in QUALITY_RANK:
            raise ValueError(f"unknown quantization {v!r} (known: {', '.join(QUALITY_RANK)})")
        return v

    @field_validator("device_order")
    @classmethod
    def _unique_devices(cls, v: tuple[DeviceClass, ...]) -> tuple[DeviceClass, ...]:
        if len(set(v)) != len(v):
            raise ValueError("device_order lists a device twice")
        return v


def load_policy(path: Path | None = None) -> SelectionPolicy:
    """The policy in `path` (default: the packaged selection.yaml, or the built-in defaults).

    Invalid input raises `PolicyError` naming the file, the line and the field.
    """
    if path is None:
        if not DEFAULT_POLICY_PATH.is_file():
            return SelectionPolicy()
        path = DEFAULT_POLICY_PATH
    return load_yaml_model(path, SelectionPolicy, PolicyError)


def policy_schema_json() -> str:
    """The JSON Schema of `SelectionPolicy`, as committed in policies/schemas/."""
    return json.dumps(SelectionPolicy.model_json_schema(), indent=2, sort_keys=True) + "\n"
