"""Benchmark: variant selection over 10,000 variants (goal: < 5 ms per call on a prepared index).

Generates a seeded population of variants (500 models × 20 variants, mixed formats,
targets, quantizations and runtime requirements), builds a `VariantIndex` of them once
(timed on its own: the registry rebuilds it only when its variants change), warms up, then
times, interleaved in the same process: `VariantIndex.select()` on the prepared index (the
goal), `select()` on the plain list (which is `VariantIndex(variants).select()`: build and
select, what a one-off caller pays) and a baseline: a plain loop that only computes each
variant's memory estimate. The ratios to the baseline are the figures that survive a noisy
machine. Checks that the chosen variant fits its budget and that both calls agree (they are
one engine), times reading the explanation of every candidate, and writes
bench/results/selection.json.

    .venv/bin/python bench/selection.py [--variants 10000] [--iterations 50] [--seed 7]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from registry.profile import (
    CpuInfo,
    GpuInfo,
    HardwareProfile,
    MemoryInfo,
    NpuInfo,
    RuntimeInfo,
)
from registry.selection import SelectionPolicy, select
from registry.selection_index import VariantIndex
from registry.types import BITS_PER_WEIGHT, VariantSpec

RESULTS = Path(__file__).resolve().parent / "results" / "selection.json"

# (format, target, runtime_requirement), weighted toward what real catalogs publish
TARGETS = [
    ("gguf", "cpu", None),
    ("gguf", "cpu", None),
    ("gguf", "cpu", None),
    ("gguf", "cuda", "llama.cpp:cuda"),
    ("gguf", "vulkan", "llama.cpp:vulkan"),
    ("onnx", "cpu", None),
    ("onnx", "cpu", None),
    ("onnx", "cuda", "onnxruntime:CUDAExecutionProvider"),
    ("onnx", "npu-intel-npu", "onnxruntime:OpenVINOExecutionProvider"),
    ("onnx", "npu-qualcomm-hexagon", "onnxruntime:QNNExecutionProvider"),
]
GGUF_QUANTS = [q for q in BITS_PER_WEIGHT if q[0].isupper()]
ONNX_QUANTS = [q for q in BITS_PER_WEIGHT if q[0].islower()]
# (n_layers, n_embd, n_head, n_head_kv, parameters): shapes like the catalog's
SHAPES = [
    (30, 576, 9, 3, 135e6),
    (18, 640, 4, 1, 268e6),
    (28, 1024, 16, 8, 600e6),
    (28, 2048, 16, 8, 1.7e9),
    (32, 3072, 24, 8, 3.8e9),
    (36, 2560, 32, 8, 4.0e9),
    (32, 4096, 32, 8, 8.0e9),
    (40, 5120, 40, 8, 14e9),
]


def make_variants(n: int, seed: int) -> list[VariantSpec]:
    rng = random.Random(seed)
    out: list[VariantSpec] = []
    per_model = 20
    for m in range((n + per_model - 1) // per_model):
        layers, embd, heads, kv_heads, params = rng.choice(SHAPES)
        arch_known = rng.random() < 0.9
        ctx = rng.choice([2048, 4096, 8192, 32768, 131072])
        for j in range(min(per_model, n - len(out))):
            fmt, target, req = rng.choice(TARGETS)
            quant = rng.choice(GGUF_QUANTS if fmt == "gguf" else ONNX_QUANTS)
            size = int(params * BITS_PER_WEIGHT[quant] / 8 * rng.uniform(0.95, 1.1))
            out.append(VariantSpec(
                model_alias=f"model-{m}",
                name=f"{fmt}-{quant.lower()}-{target}-{j}",
                format=fmt,
                quantization=quant,
                bits_per_weight=BITS_PER_WEIGHT[quant],
                target=target,
                runtime_requirement=req,
                file_size=size if rng.random() < 0.7 else None,
                parameter_count=int(params),
                context_length=ctx,
                n_layers=layers if arch_known else None,
                n_embd=embd if arch_known else None,
                n_head=heads if arch_known else None,
                n_head_kv=kv_heads if arch_known else None,
                native=quant in ("TQ1_0", "TQ2_0") and rng.random() < 0.5,
                installed=rng.random() < 0.05,
            ))
    return out


# A workstation that exercises every branch: discrete NVIDIA GPU with CUDA runtimes, an
# Intel NPU with OpenVINO, no Vulkan backend, no Qualcomm NPU.
PROFILE = HardwareProfile(
    cpu=CpuInfo(arch="x86_64", vendor="GenuineIntel", cores_physical=16, cores_logical=22),
    memory=MemoryInfo(total_bytes=64_000_000_000, available_bytes=50_000_000_000),
    gpus=(GpuInfo(vendor="nvidia", name="NVIDIA RTX 4090", memory_bytes=25_757_220_864),),
    npus=(NpuInfo(kind="intel-npu", name="Intel NPU (Meteor Lake)", driver="intel_vpu"),),
    runtimes=RuntimeInfo(
        llama_gpu_offload=True,
        llama_backends=("cuda",),
        onnx_providers=(
            "CUDAExecutionProvider", "OpenVINOExecutionProvider", "CPUExecutionProvider",
        ),
    ),
)


def baseline(variants: Sequence[VariantSpec], policy: SelectionPolicy) -> float:
    """Only the memory estimate of each variant, as a plain loop (no checks, no ranking)."""
    context = policy.context_length
    share = 1 + policy.memory.overhead_fraction
    fixed = policy.memory.overhead_bytes
    total = 0.0
    for v in variants:
        size = v.file_size
        if size is None:
            size = (v.parameter_count or 0) * (v.bits_per_weight or 4.5) / 8
        if v.n_layers and v.n_embd and v.n_head:
            per_token = 2 * v.n_layers * (v.n_head_kv or v.n_head) * (v.n_embd // v.n_head)
        else:
            per_token = 65536
        ctx = min(v.context_length or context, context)
        total += size * share + fixed + per_token * ctx * 2
    return total


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", type=int, default=10_000)
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    variants = make_variants(args.variants, args.seed)
    policy = SelectionPolicy()
    t0 = time.perf_counter()
    index = VariantIndex(variants)
    build_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(args.warmup):
        select(variants, PROFILE, policy)
        index.select(PROFILE, policy)
        baseline(variants, policy)

    sel_ms: list[float] = []
    idx_ms: list[float] = []
    base_ms: list[float] = []
    for _ in range(args.iterations):  # interleaved, so all see the same machine load
        sel_ms.append(timed(lambda: select(variants, PROFILE, policy)))
        idx_ms.append(timed(lambda: index.select(PROFILE, policy)))
        base_ms.append(timed(lambda: baseline(variants, policy)))

    selection = select(variants, PROFILE, policy)
    explain_ms = timed(lambda: selection.candidates)
    counts = {"chosen": 0, "ranked": 0, "rejected": 0}
    for c in selection.candidates:
        counts[c.verdict] += 1
    indexed = index.select(PROFILE, policy)
    index_explain_ms = timed(lambda: indexed.candidates)
    same = indexed.chosen is selection.chosen and indexed.model_dump() == selection.model_dump()
    if not same or selection.estimated_memory > selection.budget:
        print("select() and VariantIndex.select() disagree, or the choice does not fit",
              file=sys.stderr)
        return 1

    def stats(xs: list[float]) -> dict[str, float]:
        return {"median": statistics.median(xs), "p95": percentile(xs, 95), "min": min(xs)}

    result = {
        "benchmark": "selection",
        "variants": len(variants),
        "iterations": args.iterations,
        "seed": args.seed,
        "select_ms": stats(sel_ms),
        "baseline_ms": stats(base_ms),
        "ratio_median": statistics.median(sel_ms) / statistics.median(base_ms),
        "explain_ms": explain_ms,
        "goal_ms": 5.0,
        "index_select_ms": stats(idx_ms),
        "index_ratio_median": statistics.median(idx_ms) / statistics.median(base_ms),
        "index_speedup_median": statistics.median(sel_ms) / statistics.median(idx_ms),
        "index_build_ms": build_ms,
        "index_explain_ms": index_explain_ms,
        "index_same_result": same,
        "chosen": selection.chosen.name,
        "verdicts": counts,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    print(f"select() over {len(variants)} variants, {args.iterations} iterations")
    print(f"  index.select  median {result['index_select_ms']['median']:.3f} ms   "
          f"p95 {result['index_select_ms']['p95']:.3f} ms   (prepared index; goal < 5 ms)")
    print(f"  select        median {result['select_ms']['median']:.2f} ms   "
          f"p95 {result['select_ms']['p95']:.2f} ms   (plain list: build + select)")
    print(f"  baseline      median {result['baseline_ms']['median']:.2f} ms   "
          f"p95 {result['baseline_ms']['p95']:.2f} ms   (estimate-only loop)")
    print(f"  ratio select/baseline {result['ratio_median']:.2f}×   "
          f"index.select/baseline {result['index_ratio_median']:.3f}×   "
          f"select/index.select {result['index_speedup_median']:.1f}×")
    print(f"  index build (once, O(n) Python): {build_ms:.1f} ms")
    print(f"  explanation of all candidates (lazy, once): {explain_ms:.1f} ms  {counts}")
    print(f"  wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
