"""VariantIndex.select equals registry.selection.select: seeded random variant sets × hand-built
hardware profiles × random policies, plus the inputs the columns cannot carry exactly.

Equality is of everything a caller can see: the chosen object itself, `Selection.model_dump()`
(alias, chosen, prefer, estimate, budget and every candidate with verdict, rank, estimate,
budget and reasons), `explain()`, and for `NoVariantFits` the message, `smallest`, `budget`
and the candidates.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest

from registry.profile import CpuInfo, GpuInfo, HardwareProfile, MemoryInfo, NpuInfo, RuntimeInfo
from registry.selection import (
    MemoryPolicy,
    NoVariantFits,
    QuantizationPolicy,
    QuantizationRule,
    Selection,
    SelectionPolicy,
    memory_budget,
    select,
)
from registry.selection_index import VariantIndex
from registry.types import BITS_PER_WEIGHT, GB, VariantSpec

GiB = 1 << 30
CPU = CpuInfo(arch="x86_64", cores_physical=8, cores_logical=16)


def _profile(ram: int, **kw: Any) -> HardwareProfile:
    return HardwareProfile(cpu=CPU, memory=MemoryInfo(total_bytes=ram, available_bytes=ram), **kw)


CUDA_RT = RuntimeInfo(
    llama_gpu_offload=True, llama_backends=("cuda",),
    onnx_providers=("CUDAExecutionProvider", "OpenVINOExecutionProvider", "CPUExecutionProvider"),
)
PROFILES: dict[str, HardwareProfile] = {
    "cpu-2gib-no-runtimes": _profile(2 * GiB),
    "cpu-16gib-cpu-runtimes": _profile(
        16 * GiB, runtimes=RuntimeInfo(onnx_providers=("CPUExecutionProvider",))
    ),
    "rtx-npu-cuda": _profile(
        64 * GB,
        gpus=(GpuInfo(vendor="nvidia", name="RTX", memory_bytes=24 * GB),),
        npus=(NpuInfo(kind="intel-npu", name="Intel NPU"),),
        runtimes=CUDA_RT,
    ),
    "rtx-no-gpu-runtime": _profile(
        32 * GB, gpus=(GpuInfo(vendor="nvidia", name="RTX", memory_bytes=8 * GB),),
    ),
    "jetson-integrated": _profile(
        8 * GiB, gpus=(GpuInfo(vendor="nvidia", name="Orin", integrated=True),),
        runtimes=RuntimeInfo(llama_gpu_offload=True, llama_backends=("cuda", "vulkan"),
                             onnx_providers=("CUDAExecutionProvider",)),
    ),
    "two-gpus-vulkan-rocm": _profile(
        16 * GB,
        gpus=(GpuInfo(vendor="amd", name="iGPU", integrated=True),
              GpuInfo(vendor="amd", name="dGPU", memory_bytes=4 * GB),
              GpuInfo(vendor="nvidia", name="old", memory_bytes=2 * GB)),
        runtimes=RuntimeInfo(llama_gpu_offload=True, llama_backends=("Vulkan", "rocm"),
                             onnx_providers=("ROCMExecutionProvider", "DmlExecutionProvider")),
    ),
    "hexagon-online-qnn": _profile(
        16 * GiB, npus=(NpuInfo(kind="qualcomm-hexagon", name="Hexagon"),),
        runtimes=RuntimeInfo(onnx_providers=("QNNExecutionProvider", "CPUExecutionProvider")),
    ),
    "hexagon-offline": _profile(
        16 * GiB,
        npus=(NpuInfo(kind="qualcomm-hexagon", name="Hexagon", online=False,
                      detail="remoteproc2 (cdsp) state is offline"),
              NpuInfo(kind="amd-xdna", name="XDNA")),
        runtimes=RuntimeInfo(onnx_providers=("QNNExecutionProvider", "VitisAIExecutionProvider")),
    ),
}

TARGETS = ["cpu", "cpu", "cpu", "cuda", "rocm", "vulkan", "metal", "dml", "sycl", "tpu",
           "npu-intel-npu", "npu-qualcomm-hexagon", "npu-amd-xdna", "npu-hailo"]
REQUIREMENTS = [None, None, None, "llama.cpp", "llama.cpp:cpu", "llama.cpp:cuda",
                "llama.cpp:vulkan", "onnxruntime:CUDAExecutionProvider",
                "onnxruntime:QNNExecutionProvider", "onnxruntime:CPUExecutionProvider",
                "onnxruntime:OpenVINOExecutionProvider", "bitnet.cpp"]
QUANTS = [*BITS_PER_WEIGHT, "Q3_K_XL", "mxfp4"]  # the last two are in no table
ALIASES = ["phi", "phi-mini", "qwen3-0.6b", "qwen3-4b", "gemma"]
PARAMS = [135e6, 6e8, 1.7e9, 3.8e9, 8e9, 70e9]


def _maybe(rng: random.Random, p: float, value: Any) -> Any:
    return value if rng.random() < p else None


def random_variants(rng: random.Random) -> list[VariantSpec]:
    """Variants with every target kind, unknown facts, duplicates and exact ties."""
    n = rng.choice([0, 1, 3, 8, 20, 40, 60, 100, 150, 300])
    aliases = rng.sample(ALIASES, rng.randint(1, len(ALIASES)))
    out: list[VariantSpec] = []
    for i in range(n):
        if out and rng.random() < 0.08:  # an exact duplicate, or a twin differing in one field
            twin = rng.choice(out)
            changes: list[dict[str, Any]] = [
                {}, {"installed": not twin.installed}, {"name": f"t{i}"},
                {"target": rng.choice(TARGETS)},  # the same estimate on another device
            ]
            change = rng.choice(changes)
            out.append(twin.model_copy(update=change))
            continue
        quant = rng.choice(QUANTS)
        params = rng.choice(PARAMS)
        bpw = BITS_PER_WEIGHT.get(quant)
        arch = rng.random() < 0.7
        out.append(VariantSpec(
            model_alias=rng.choice(aliases),
            name=f"v{rng.randrange(max(1, n // 2))}",  # names repeat: ties go down to the name
            format=rng.choice(["gguf", "onnx"]),
            quantization=quant,
            bits_per_weight=rng.choice([None, None, bpw, 0.0, round(rng.uniform(1.5, 9), 2)]),
            target=rng.choice(TARGETS),
            runtime_requirement=rng.choice(REQUIREMENTS),
            file_size=rng.choice([None, 0, int(params * (bpw or 4) / 8 * rng.uniform(0.9, 1.1)),
                                  int(params * rng.uniform(0.1, 2))]),
            parameter_count=_maybe(rng, 0.8, rng.choice([0, int(params)])),
            context_length=rng.choice([None, 0, 512, 4096, 8192, 131072]),
            n_layers=_maybe(rng, 0.9, rng.choice([0, 24, 32])) if arch else None,
            n_embd=_maybe(rng, 0.9, rng.choice([0, 1000, 2048, 4096])) if arch else None,
            n_head=_maybe(rng, 0.8, rng.choice([0, 16, 32])) if arch else None,
            n_head_kv=_maybe(rng, 0.7, rng.choice([0, 4, 8])) if arch else None,
            head_dim=_maybe(rng, 0.3, rng.choice([0, 64, 128])) if arch else None,
            native=rng.random() < 0.1,
            installed=rng.random() < 0.2,
            estimated_memory=_maybe(rng, 0.1, rng.choice([0, 10**6, int(params * 0.7)])),
        ))
    return out


def _rule(rng: random.Random) -> QuantizationRule:
    globs = ["Q4_*", "q8_0", "int*", "*_K_*", "F16", "TQ?_0", "[QI]*", "fp*", "*"]
    return QuantizationRule(
        allow=rng.choice([None, None, (), tuple(rng.sample(globs, rng.randint(1, 3))),
                          (*rng.sample(globs, rng.randint(1, 3)), "*")]),
        forbid=rng.choice([None, (), tuple(rng.sample(globs[:-1], rng.randint(1, 2)))]),
    )


def random_policy(rng: random.Random) -> SelectionPolicy:
    """Each preference, floor or none, rules per alias and glob, budgets down to nothing."""
    models: dict[str, QuantizationRule] = {}
    for key in rng.sample(["phi", "phi*", "qwen3-*", "qwen3-4b", "*", "g?mma", "nomatch"],
                          rng.choice([0, 0, 1, 2, 3])):
        models[key] = _rule(rng)
    default = rng.choice([QuantizationRule(allow=("*",), forbid=())] * 3 + [_rule(rng)])
    max_bytes = rng.choice([None, None, 10**8, 6 * 10**8, 2 * GB, 5 * GB])
    return SelectionPolicy(
        prefer=rng.choice(["quality", "balanced", "speed"]),
        min_quality=rng.choice([None, "Q4_K_M", "Q8_0", "Q2_K", "int8"]),
        balanced_fraction=rng.choice([0.5, 0.25, 0.8, 1.0]),
        device_order=rng.choice([("npu", "gpu", "cpu"), ("gpu", "npu", "cpu"), ("cpu",),
                                 ("gpu", "cpu"), ("cpu", "npu")]),
        context_length=rng.choice([4096, 4096, 1, 2048, 32768]),
        kv_cache_type=rng.choice(["f16", "f16", "f32", "q8_0", "q4_0"]),
        memory=MemoryPolicy(
            fraction=rng.choice([0.75, 0.75, 0.1, 1.0]),
            max_bytes=max_bytes,
            headroom_bytes=rng.choice([500_000_000, 0, 10**9]),
            gpu_headroom_bytes=rng.choice([500_000_000, 0]),
            overhead_bytes=rng.choice([200_000_000, 0, 123_456_789]),
            overhead_fraction=rng.choice([0.05, 0.0, 0.3]),
        ),
        quantizations=QuantizationPolicy(default=default, models=models),
    )


def outcome(run: Callable[[], Selection]) -> tuple[Any, ...]:
    """Everything a caller can observe of one selection."""
    try:
        sel = run()
    except NoVariantFits as e:
        return ("NoVariantFits", str(e), e.smallest, e.budget,
                [c.model_dump() for c in e.candidates])
    return ("Selection", id(sel.chosen), sel.model_dump(), sel.explain(),
            sel.chosen_candidate.explanation)


def assert_same(
    variants: list[VariantSpec], profile: HardwareProfile, policy: SelectionPolicy,
    model_alias: str | None = None,
) -> str:
    index = VariantIndex(variants)
    expected = outcome(lambda: select(variants, profile, policy, model_alias=model_alias))
    got = outcome(lambda: index.select(profile, policy, model_alias=model_alias))
    assert got == expected
    if expected[0] == "NoVariantFits":
        return "no fit: smallest" if expected[2] is not None else "no fit: all rejected"
    return f"chosen ({policy.prefer})"


SEEDS = range(25)
SETS_PER_SEED = 6
POLICIES_PER_SET = 2


@pytest.mark.parametrize("seed", SEEDS)
def test_index_select_equals_select(seed: int) -> None:
    rng = random.Random(seed)
    seen: Counter[str] = Counter()
    for _ in range(SETS_PER_SEED):
        variants = random_variants(rng)
        policies = [random_policy(rng) for _ in range(POLICIES_PER_SET)]
        alias = rng.choice([None, None, "named-by-caller"])
        for profile in PROFILES.values():
            for policy in policies:
                seen[assert_same(variants, profile, policy, alias)] += 1
    assert sum(seen.values()) == SETS_PER_SEED * POLICIES_PER_SET * len(PROFILES)


def test_the_random_cases_cover_every_outcome() -> None:
    """The generator reaches every outcome (so the equivalence above is not vacuous)."""
    seen: Counter[str] = Counter()
    for seed in SEEDS:
        rng = random.Random(seed)
        for _ in range(SETS_PER_SEED):
            variants = random_variants(rng)
            policies = [random_policy(rng) for _ in range(POLICIES_PER_SET)]
            rng.choice([None, None, "named-by-caller"])
            for profile in PROFILES.values():
                for policy in policies:
                    try:
                        sel = select(variants, profile, policy)
                    except NoVariantFits as e:
                        seen["no fit: smallest" if e.smallest is not None else "no fit: other"] += 1
                        continue
                    seen[f"chosen ({policy.prefer})"] += 1
                    seen[f"device {sel.chosen_candidate.device}"] += 1
                    seen["chosen below floor"] += sel.candidates[0].reasons[0].endswith("fits")
    for kind in ("no fit: smallest", "no fit: other", "chosen (quality)", "chosen (balanced)",
                 "chosen (speed)", "device cpu", "device gpu", "device npu",
                 "chosen below floor"):
        assert seen[kind] >= 5, (kind, seen)


def test_empty_variant_list() -> None:
    for profile in PROFILES.values():
        assert_same([], profile, SelectionPolicy())
        assert_same([], profile, SelectionPolicy(), model_alias="phi")


def test_full_ties_pick_the_first_in_input_order() -> None:
    v = VariantSpec(model_alias="m", name="v", format="gguf", quantization="Q4_K_M",
                    parameter_count=10**9)
    twins = [v, v.model_copy(), v.model_copy()]
    sel = VariantIndex(twins).select(PROFILES["cpu-16gib-cpu-runtimes"], SelectionPolicy())
    assert sel.chosen is twins[0]
    assert_same(twins, PROFILES["cpu-16gib-cpu-runtimes"], SelectionPolicy())


# Inputs the float64 columns cannot carry exactly: the index hands them to select().
V = VariantSpec(model_alias="m", name="v", format="gguf", quantization="Q4_K_M",
                parameter_count=10**9, n_layers=24, n_embd=2048, n_head=16)
CPU16 = PROFILES["cpu-16gib-cpu-runtimes"]


@pytest.mark.parametrize("update", [
    {"estimated_memory": 2**60},
    {"estimated_memory": 2**53 + 1, "name": "w"},
    {"file_size": 10**30},  # exact as float(size) in both; est ≈ 1e30, over budget
    {"n_layers": 2**40, "n_head_kv": 2**10},  # KV elements per token beyond 2**53
    {"context_length": 2**70},
    {"bits_per_weight": float("inf")},
    {"bits_per_weight": float("nan"), "file_size": 10**9},
    {"bits_per_weight": -4.0, "n_layers": None},  # negative estimate: cannot estimate
    # negative parameters derived from the size: sqrt raises in select() (and in the build)
    {"bits_per_weight": -4.0, "n_layers": None, "parameter_count": None, "file_size": 10**9},
])
def test_values_beyond_exact_floats_match_select(update: dict[str, Any]) -> None:
    variants = [V, V.model_copy(update={"name": "small", "parameter_count": 10**8}),
                V.model_copy(update=update)]
    for policy in (SelectionPolicy(prefer="quality"), SelectionPolicy(prefer="speed"),
                   SelectionPolicy(memory=MemoryPolicy(max_bytes=10**8))):
        try:
            expected = outcome(partial(select, variants, CPU16, policy))
        except (ValueError, OverflowError) as e:
            with pytest.raises(type(e)):
                VariantIndex(variants).select(CPU16, policy)
            continue
        assert outcome(partial(VariantIndex(variants).select, CPU16, policy)) == expected


def test_huge_budget_and_context_match_select() -> None:
    variants = [V, V.model_copy(update={"name": "w", "quantization": "Q8_0"})]
    huge = _profile(2**62 + 1)
    assert_same(variants, huge, SelectionPolicy())
    big_gpu = GpuInfo(vendor="nvidia", name="huge", memory_bytes=2**60 + 1)
    assert_same(variants, _profile(2**62 + 1, gpus=(big_gpu,), runtimes=CUDA_RT),
                SelectionPolicy())
    assert_same(variants, CPU16, SelectionPolicy(context_length=2**60))
    # a context float64 cannot hold: 6 × (2**53 + 1) and 6 × float(2**53 + 1) round apart
    odd = V.model_copy(update={"n_layers": 3, "n_embd": 1, "n_head": 1, "context_length": None})
    assert_same([odd], CPU16, SelectionPolicy(context_length=2**53 + 1))
    assert_same(variants, CPU16, SelectionPolicy(
        memory=MemoryPolicy(overhead_bytes=2**60)))


def test_index_keeps_its_own_copy_of_the_variants() -> None:
    variants = [V]
    index = VariantIndex(variants)
    variants.append(V.model_copy(update={"name": "later", "installed": True}))
    assert len(index) == 1
    assert index.select(CPU16, SelectionPolicy()).chosen is V


def test_estimate_arithmetic_is_select_s_to_the_last_bit() -> None:
    """size × (1 + share) + fixed + KV, left to right: 2**56 + 8 + 8 is 2**56, not 2**56 + 16."""
    v = VariantSpec(model_alias="m", name="big", format="gguf", quantization="F32",
                    file_size=2**56, n_layers=1, n_embd=1, n_head=1)  # 2 KV elements per token
    policy = SelectionPolicy(
        context_length=1, kv_cache_type="f32",
        memory=MemoryPolicy(overhead_fraction=0, overhead_bytes=8),
    )
    with pytest.raises(NoVariantFits) as e:
        VariantIndex([v]).select(CPU16, policy)
    assert e.value.smallest == 2**56
    assert_same([v], CPU16, policy)


@pytest.mark.parametrize("profile",
                         ["rtx-npu-cuda", "two-gpus-vulkan-rocm", "cpu-2gib-no-runtimes"])
@pytest.mark.parametrize("prefer", ["quality", "balanced", "speed"])
def test_estimates_on_the_budget_boundaries(profile: str, prefer: str) -> None:
    """Estimates equal to the budget (fits), one more (does not), equal to the comfortable share
    of it, and equal estimates over different budgets (the first one names the smallest)."""
    hw = PROFILES[profile]
    policy = SelectionPolicy(prefer=prefer, balanced_fraction=0.5)
    variants: list[VariantSpec] = []
    for n, (target, req) in enumerate([("cpu", None), ("cuda", "llama.cpp:cuda"),
                                       ("vulkan", "llama.cpp:vulkan"), ("rocm", None)]):
        budget = memory_budget(hw, policy, target)
        for m, est in enumerate([budget, budget + 1, budget // 2, budget // 2 + 1, budget // 2 - 1,
                                 budget * 2]):
            variants.append(VariantSpec(
                model_alias="m", name=f"{target}-{m}", format="gguf",
                # balanced: Q8_0 exactly at the comfortable share beats the comfortable Q4_K_M
                quantization=["F16", "F32", "Q8_0", "F16", "Q4_K_M", "Q2_K"][m],
                target=target, runtime_requirement=req, estimated_memory=est,
                installed=n == m,
            ))
    if prefer == "balanced" and profile == "rtx-npu-cuda":
        assert VariantIndex(variants).select(hw, policy).chosen.name == "cuda-2"
    rng = random.Random(0)
    for _ in range(5):
        rng.shuffle(variants)
        assert_same(variants, hw, policy)
        over = [v.model_copy(update={"estimated_memory": 2**40}) for v in variants]
        assert_same(over, hw, policy)
