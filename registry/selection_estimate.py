"""The memory estimate of a variant (docs/selection.md §2), written once for any number of them.

`estimate_facts(variants)` reads what the estimate needs from each variant into float64
columns (and whether it is GGUF); `estimate_inputs(facts)` computes the policy-independent
parts (bytes of weights, K and V elements cached per token, the model's own context);
`estimate_parts(inputs, policy)` applies a policy: weights, KV cache and overhead in bytes.
A GGUF variant's KV cache is `policy.kv_windows` windows of whole bytes (llama.cpp gives
each sequence it decodes at once a stream of the whole window; the agent sets the count
from runtime.parallel, and to 1 for an embedding model, whose task the variants do not
carry); an ONNX variant's is one window (onnxruntime-genai decodes one sequence at a time).
The selection engine, `registry.selection_index.VariantIndex`, runs the three over all its
variants at once; `estimate_memory` runs them over one. So the estimate selection compares
with a budget is, to the byte, `estimate_memory(v).total` (below 2**53 bytes; see below).

The arithmetic is float64, each part truncated to a whole number of bytes. It is exact while
the numbers stay below 2**53 (8 PiB); beyond that it is float64-accurate (relative error
below 2**-52), and so is selection's sum of the parts. An estimate that is not a finite
number (figures beyond float64's range) counts as one that cannot be made.

Facts of 0 count as unknown, like None: a `head_dim` of 0 is derived from `n_embd / n_head`,
an `n_head_kv` of 0 means full multi-head attention, a context of 0 is the policy's. A
`bits_per_weight` that is not a positive finite number is ignored (the table's is used).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from registry.selection_policy import SelectionPolicy
from registry.types import BITS_PER_WEIGHT, VariantSpec

__all__ = [
    "KV_BYTES_PER_ELEMENT",
    "KV_FALLBACK_PER_SQRT_PARAM",
    "KV_FALLBACK_PER_TOKEN",
    "BoolColumn",
    "EstimateInputs",
    "Facts",
    "FloatColumn",
    "MemoryEstimate",
    "estimate_facts",
    "estimate_inputs",
    "estimate_memory",
    "estimate_parts",
    "float_column",
    "to_float",
]

FloatColumn = NDArray[np.float64]
BoolColumn = NDArray[np.bool_]

# Bytes per cached K or V element (llama.cpp's --cache-type-k/-v; q8_0/q4_0 include scales).
KV_BYTES_PER_ELEMENT: dict[str, float] = {"f32": 4.0, "f16": 2.0, "q8_0": 1.0625, "q4_0": 0.5625}
# Unknown architecture: f16 K+V bytes per token ≈ this × sqrt(parameter_count). Fitted on
# the catalog (0.5×-2.2× of the exact figure from 135M to 8B parameters), docs/selection.md.
KV_FALLBACK_PER_SQRT_PARAM = 2.5
# Neither architecture nor parameter count known: assume a Llama-3-8B-sized cache.
KV_FALLBACK_PER_TOKEN = 131_072


class MemoryEstimate(NamedTuple):
    """Bytes a variant needs once loaded: weights + KV cache + runtime overhead."""

    weights: int
    kv_cache: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead


class EstimateInputs(NamedTuple):
    """What the estimates of some variants need that no policy changes, one entry each."""

    given: FloatColumn  # `estimated_memory`, taken at its word; NaN: estimate it
    weights: FloatColumn  # bytes of weights; NaN: unknown (no file size, no parameters)
    kv_per_token: FloatColumn  # K and V elements cached per token
    context: FloatColumn  # the model's own context length; 0 or NaN: unknown
    bits_per_weight: FloatColumn  # as the estimate and the ranking use it; NaN: unknown
    windowed: BoolColumn  # GGUF: its KV cache counts `policy.kv_windows` times


def to_float(x: float | None) -> float:
    """`x` as a float: None is NaN, an integer beyond float64's range is ±inf."""
    if x is None:
        return math.nan
    try:
        return float(x)
    except OverflowError:
        return math.inf if x > 0 else -math.inf


def float_column(values: Sequence[float | None]) -> FloatColumn:
    """`values` as a float64 column, converted as `to_float` does."""
    if values.count(None) == len(values):  # a fact nobody gave: skip numpy's slow path
        return np.full(len(values), np.nan)
    try:
        return np.array(values, dtype=np.float64)
    except OverflowError:
        return np.array([to_float(x) for x in values], dtype=np.float64)


class Facts(NamedTuple):
    """The facts of some variants the estimate reads, as float64 columns (NaN: not given).

    The fields are `VariantSpec`'s, except `table_bits_per_weight`: `BITS_PER_WEIGHT` of the
    variant's quantization, and `gguf`: whether its format is GGUF (a boolean column; the
    runtime that holds a KV window per concurrent sequence)."""

    estimated_memory: FloatColumn
    file_size: FloatColumn
    bits_per_weight: FloatColumn
    table_bits_per_weight: FloatColumn
    parameter_count: FloatColumn
    context_length: FloatColumn
    n_layers: FloatColumn
    n_embd: FloatColumn
    n_head: FloatColumn
    n_head_kv: FloatColumn
    head_dim: FloatColumn
    gguf: BoolColumn


# The model's architecture, shared by its variants: fetched in one C call per variant and
# converted once per distinct combination.
_ARCH = operator.itemgetter(
    "parameter_count", "context_length", "n_layers", "n_embd", "n_head", "n_head_kv", "head_dim"
)


def estimate_facts(
    variants: Sequence[VariantSpec],
    table_bits_per_weight: FloatColumn | None = None,
    gguf: BoolColumn | None = None,
) -> Facts:
    """The facts of `variants` the estimate reads. `table_bits_per_weight` and `gguf`, if the
    caller has them (the selection engine has both from its codes, without a pass over the
    variants), are `BITS_PER_WEIGHT` of each variant's quantization and whether its format
    is GGUF, as columns."""
    facts: list[dict[str, Any]] = [v.__dict__ for v in variants]
    if table_bits_per_weight is None:
        table_bits_per_weight = float_column(
            [BITS_PER_WEIGHT.get(f["quantization"]) for f in facts]
        )
    if gguf is None:
        gguf = np.array([f["format"] == "gguf" for f in facts], dtype=np.bool_)
    seen: dict[tuple[Any, ...], int] = {}
    arch = np.array([seen.setdefault(k, len(seen)) for k in map(_ARCH, facts)], dtype=np.intp)
    params, ctx, layers, embd, heads, kv_heads, head_dim = (
        float_column(c)[arch] for c in (zip(*seen, strict=True) if seen else [()] * 7)
    )
    given, size, own_bpw = (
        float_column([f[name] for f in facts])
        for name in ("estimated_memory", "file_size", "bits_per_weight")
    )
    return Facts(given, size, own_bpw, table_bits_per_weight, params, ctx, layers, embd, heads,
                 kv_heads, head_dim, gguf)


def estimate_inputs(facts: Facts) -> EstimateInputs:
    """The policy-independent parts of each variant's estimate (docs/selection.md §2)."""
    f = facts
    # comparisons with NaN (a fact not given) are False, which is what every test below wants
    with np.errstate(all="ignore"):
        own = f.bits_per_weight
        bpw = np.where(np.isfinite(own) & (own > 0), own, f.table_bits_per_weight)
        weights = np.where(np.isnan(f.file_size), f.parameter_count * bpw / 8, f.file_size)
        layers, embd, heads = f.n_layers, f.n_embd, f.n_head
        width = np.where(
            f.head_dim > 0, f.head_dim, np.where((embd > 0) & (heads > 0), embd // heads, 0.0)
        )
        kvh = np.where(f.n_head_kv > 0, f.n_head_kv, heads)
        # nothing known of the architecture: from the parameters (derived from the size)
        params = np.where(np.isnan(f.parameter_count), weights * 8 / bpw, f.parameter_count)
        per_token = np.where(
            (layers > 0) & (width > 0) & (kvh > 0),
            2 * layers * kvh * width,
            np.where(
                (layers > 0) & (embd > 0),
                2 * layers * embd,  # no head counts: assume full multi-head attention
                np.where(
                    params > 0,
                    KV_FALLBACK_PER_SQRT_PARAM * np.sqrt(params),
                    KV_FALLBACK_PER_TOKEN,
                ) / 2,
            ),
        )
    return EstimateInputs(f.estimated_memory, weights, per_token, f.context_length, bpw, f.gguf)


def estimate_parts(
    inputs: EstimateInputs, policy: SelectionPolicy
) -> tuple[FloatColumn, FloatColumn, FloatColumn]:
    """(weights, KV cache, overhead) in whole bytes under `policy`; NaN or ±inf where the
    variant cannot be estimated. A given `estimated_memory` is all weights.

    The KV cache of a GGUF variant is `policy.kv_windows` windows (one per sequence the
    runtime decodes at once, each a stream of the whole context), so a variant that fits
    with one window but not with the windows loading allocates is not chosen."""
    mem = policy.memory
    limit = to_float(policy.context_length)
    with np.errstate(all="ignore"):
        ctx = np.where((inputs.context > 0) & (inputs.context < limit), inputs.context, limit)
        weights = np.trunc(inputs.weights)
        kv = np.trunc(inputs.kv_per_token * ctx * KV_BYTES_PER_ELEMENT[policy.kv_cache_type])
        if policy.kv_windows > 1:  # whole windows: n × one window's bytes, as llama.cpp has
            kv = np.where(inputs.windowed, kv * float(policy.kv_windows), kv)
        overhead = np.trunc(to_float(mem.overhead_bytes) + mem.overhead_fraction * inputs.weights)
    given = ~np.isnan(inputs.given)
    if given.any():
        weights = np.where(given, np.trunc(inputs.given), weights)
        kv = np.where(given, 0.0, kv)
        overhead = np.where(given, 0.0, overhead)
    return weights, kv, overhead


def estimate_memory(v: VariantSpec, policy: SelectionPolicy) -> MemoryEstimate | None:
    """The estimate selection uses for `v`, broken down; None when it cannot be estimated.

    Its `total` is the candidate's `estimated_memory` in a `Selection` (below 2**53 bytes;
    beyond, selection's float64 sum of the parts may round). A variant with
    `estimated_memory` set is taken at its word (all of it as weights).
    """
    parts = estimate_parts(estimate_inputs(estimate_facts([v])), policy)
    weights, kv, overhead = (float(part[0]) for part in parts)
    if not math.isfinite(weights + kv + overhead):
        return None
    return MemoryEstimate(int(weights), int(kv), int(overhead))
