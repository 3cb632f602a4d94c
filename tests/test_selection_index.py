"""The selection engine (`VariantIndex`, which `select` is) against invariants that must hold
for any input: seeded random variant sets × hand-built hardware profiles × random policies.

There is one engine, so these tests do not compare two implementations; they check what any
correct selection must satisfy (docs/selection.md), and each can fail:

* the explanation lists every input exactly once: chosen, then ranked 2.., then rejected;
* the chosen variant fits its budget, which is `memory_budget` for its target, and every
  estimate is `estimate_memory(v).total`;
* a rejection never depends on the other variants: the rejected alone fit nowhere, the rest
  alone give the same choice and ranking;
* removing the winner promotes the runner-up (the choice is the first of the ranking);
* adding a strictly worse variant never changes the choice;
* shuffling the input changes nothing but the pick among complete ties.

The results of the earlier implementation (a Python loop, removed) are kept as expectations
by tests/test_selection.py (the device × model table) and tests/test_selection_regression.py.
Below the property tests: the semantics of inputs float64 cannot carry exactly.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from fnmatch import fnmatchcase
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
    estimate_memory,
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
    "rtx-cuda-gguf-backend-only": _profile(
        64 * GB,
        gpus=(GpuInfo(vendor="nvidia", name="RTX", memory_bytes=24 * GB),),
        runtimes=CUDA_RT.model_copy(update={"backends": ("gguf",)}),
    ),
    "cpu-8gib-no-backends": _profile(
        8 * GiB, runtimes=RuntimeInfo(onnx_providers=("CPUExecutionProvider",), backends=()),
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


def random_cases(seeds: range, sets: int, policies: int) -> list[tuple[Any, ...]]:
    """(case id, variants, profile name, policy, model alias) for every seed × set × profile ×
    policy, drawn in a fixed order (the regression table depends on it)."""
    out: list[tuple[Any, ...]] = []
    for seed in seeds:
        rng = random.Random(seed)
        for s in range(sets):
            variants = random_variants(rng)
            drawn = [random_policy(rng) for _ in range(policies)]
            alias = rng.choice([None, None, "named-by-caller"])
            for name in PROFILES:
                for p, policy in enumerate(drawn):
                    out.append((f"{seed}.{s}.{p} {name}", variants, name, policy, alias))
    return out


def judge(
    variants: list[VariantSpec], profile: HardwareProfile, policy: SelectionPolicy,
    alias: str | None = None,
) -> Selection | NoVariantFits:
    try:
        return select(variants, profile, policy, model_alias=alias)
    except NoVariantFits as e:
        return e


def _texts(out: Selection | NoVariantFits) -> Counter[tuple[str, str, tuple[str, ...]]]:
    return Counter((c.variant.name, c.verdict, c.reasons) for c in out.candidates)


def rule_allows(policy: SelectionPolicy, v: VariantSpec) -> bool:
    """What the policy's quantization rules say of `v`, written out from docs/selection.md §5."""
    rules = policy.quantizations
    keys = [k for k in rules.models if fnmatchcase(v.model_alias, k)]
    exact = v.model_alias in rules.models
    key = v.model_alias if exact else min(keys, key=lambda k: (-len(k), k), default=None)
    rule = rules.models[key] if key is not None else rules.default
    default_allow = rules.default.allow if rules.default.allow is not None else ("*",)
    allow = rule.allow if rule.allow is not None else default_allow
    forbid = rule.forbid if rule.forbid is not None else (rules.default.forbid or ())
    q = v.quantization.upper()
    return any(fnmatchcase(q, p.upper()) for p in allow) and not any(
        fnmatchcase(q, p.upper()) for p in forbid
    )


def check_invariants(
    variants: list[VariantSpec], profile: HardwareProfile, policy: SelectionPolicy,
    alias: str | None, rng: random.Random, *, estimates: bool = False,
) -> str:
    """Assert every invariant of the module docstring for one case; return its outcome kind."""
    out = judge(variants, profile, policy, alias)
    cands = out.candidates
    # every input exactly once, chosen first, then ranked 2.., then rejected
    assert sorted(id(c.variant) for c in cands) == sorted(id(v) for v in variants)
    order = ["chosen", "ranked", "rejected"]
    verdicts = [c.verdict for c in cands]
    assert verdicts == sorted(verdicts, key=order.index)
    n_fit = len(cands) - verdicts.count("rejected")
    assert [c.rank for c in cands if c.rank is not None] == list(range(1, n_fit + 1))
    for c in cands:
        assert c.reasons and all(c.reasons)
        assert c.explanation == f"{c.label}: {'; '.join(c.reasons)}"
        if c.verdict != "rejected":
            assert c.budget == memory_budget(profile, policy, c.variant.target)
            assert c.estimated_memory is not None and c.estimated_memory <= c.budget
    if estimates:
        for c in cands:
            est = estimate_memory(c.variant, policy)
            assert c.estimated_memory == (est.total if est else None), c.variant
    rejected = [c.variant for c in cands if c.verdict == "rejected"]
    fitting = [c.variant for c in cands if c.verdict != "rejected"]
    if rejected:  # a rejection never depends on the other variants
        alone = judge(rejected, profile, policy)
        assert isinstance(alone, NoVariantFits)
        assert _texts(alone) == Counter(
            (c.variant.name, "rejected", c.reasons) for c in cands if c.verdict == "rejected"
        )

    shuffled = variants[:]
    rng.shuffle(shuffled)
    again = judge(shuffled, profile, policy, alias)

    if isinstance(out, NoVariantFits):
        assert verdicts == ["rejected"] * len(variants)
        assert isinstance(again, NoVariantFits)
        assert again.smallest == out.smallest and _texts(again) == _texts(out)
        if out.smallest is None:
            assert str(again) == str(out)
            return "no fit: all rejected" if variants else "no fit: empty"
        assert out.budget is not None and out.smallest > out.budget
        over = [c for c in cands if c.estimated_memory is not None
                and c.estimated_memory > c.budget and c.reasons[0].endswith("budget")]
        assert out.smallest == min(c.estimated_memory or 0 for c in over)
        return "no fit: smallest"

    sel = out
    assert cands[0].variant is sel.chosen and cands[0].verdict == "chosen"
    # no rule rejects the chosen variant: policy, device order, the agent's backends
    assert rule_allows(policy, sel.chosen)
    assert cands[0].device in policy.device_order
    backends = profile.runtimes.backends
    assert backends is None or sel.chosen.format in backends
    assert sel.estimated_memory == cands[0].estimated_memory <= sel.budget
    assert sel.budget == memory_budget(profile, policy, sel.chosen.target)
    assert sel.model_alias == (alias or sel.chosen.model_alias)

    # the rejected do not matter: the fitting alone rank the same
    only = judge(fitting, profile, policy, alias)
    assert isinstance(only, Selection) and only.chosen is sel.chosen
    assert [c.explanation for c in only.candidates[1:]] == [
        c.explanation for c in cands[1:len(fitting)]
    ]
    # the choice is the first of the ranking: without it, the runner-up wins
    if len(fitting) > 1:
        rest = [v for v in variants if v is not sel.chosen]
        runner_up = judge(rest, profile, policy, alias)
        assert isinstance(runner_up, Selection) and runner_up.chosen is cands[1].variant
    # strictly worse variants change nothing, wherever they are inserted
    worse = [
        sel.chosen.model_copy(update={
            "name": sel.chosen.name + "~", "installed": False,
            "estimated_memory": sel.estimated_memory + 1,
        }),
        sel.chosen.model_copy(update={"target": "tpu"}),  # never runnable
    ]
    more = variants[:]
    for w in worse:
        more.insert(rng.randint(0, len(more)), w)
    bigger = judge(more, profile, policy, alias)
    assert isinstance(bigger, Selection) and bigger.chosen is sel.chosen
    # order: the same result, but for the pick among complete ties
    assert isinstance(again, Selection)
    if again.chosen == sel.chosen:
        assert again.model_dump(exclude={"candidates"}) == sel.model_dump(exclude={"candidates"})
        assert _texts(again) == _texts(out)
    else:
        mine = next(c for c in again.candidates if c.variant is sel.chosen)
        assert mine.reasons[0] == f"ties with {again.chosen.name}; ordered by name"
    return f"chosen ({policy.prefer}, {cands[0].device})"


SEEDS = range(12)


@pytest.mark.parametrize("seed", SEEDS)
def test_invariants_over_random_cases(seed: int) -> None:
    rng = random.Random(1000 + seed)
    seen: Counter[str] = Counter()
    for n, (_, variants, name, policy, alias) in enumerate(random_cases(range(seed, seed + 1),
                                                                         sets=3, policies=2)):
        seen[check_invariants(variants, PROFILES[name], policy, alias, rng,
                              estimates=n % 7 == 0)] += 1
    assert sum(seen.values()) == 3 * 2 * len(PROFILES)


@pytest.mark.parametrize("seed", SEEDS[:4])
def test_invariants_with_several_kv_windows(seed: int) -> None:
    """The agent selects a generating model with `kv_windows = runtime.parallel`: every
    invariant holds, every estimate is still `estimate_memory(v).total` (GGUF rows with the
    windows, ONNX rows without), and a size rejection that the windows decide says so."""
    rng = random.Random(2000 + seed)
    noted = 0
    for _, variants, name, policy, alias in random_cases(range(seed, seed + 1), sets=3,
                                                         policies=2):
        several = policy.model_copy(update={"kv_windows": 4})
        check_invariants(variants, PROFILES[name], several, alias, rng, estimates=True)
        out = judge(variants, PROFILES[name], several, alias)
        for c in out.candidates:
            own = [r for r in c.reasons if not r.startswith("falls back")]  # not others'
            note = "4 windows of" in "; ".join(own)
            noted += note
            assert not note or (c.variant.format == "gguf"
                                and c.variant.estimated_memory is None)
    assert noted  # the windows were shown somewhere


def test_the_random_cases_cover_every_outcome() -> None:
    """The generator reaches every outcome, so the invariants above are not vacuous."""
    seen: Counter[str] = Counter()
    for _, variants, name, policy, _alias in random_cases(SEEDS, sets=3, policies=2):
        out = judge(variants, PROFILES[name], policy)
        if isinstance(out, NoVariantFits):
            seen["no fit: smallest" if out.smallest is not None else "no fit: other"] += 1
            continue
        cands = out.candidates
        seen[f"chosen ({policy.prefer})"] += 1
        seen[f"device {cands[0].device}"] += 1
        seen["chosen below floor"] += cands[0].reasons[0].endswith("fits")
        seen["falls back"] += any(r.startswith("falls back") for r in cands[0].reasons)
        seen["backend rejection"] += any("backend in this agent" in c.reasons[0]
                                         for c in cands if c.verdict == "rejected")
        for c in cands[1:]:
            if c.verdict == "ranked":
                seen["ranked: " + c.reasons[0].split(" ", 2)[0]] += 1
    for kind in ("no fit: smallest", "no fit: other", "chosen (quality)", "chosen (balanced)",
                 "chosen (speed)", "device cpu", "device gpu", "device npu",
                 "chosen below floor", "falls back", "backend rejection", "ranked: runs",
                 "ranked: lower", "ranked: not", "ranked: larger", "ranked: ties"):
        assert seen[kind] >= 3, (kind, seen)


def test_empty_variant_list() -> None:
    for profile in PROFILES.values():
        with pytest.raises(NoVariantFits, match=r"^no variant of the model to choose from$"):
            VariantIndex([]).select(profile, SelectionPolicy())
        with pytest.raises(NoVariantFits, match=r"^no variant of phi to choose from$") as e:
            select([], profile, SelectionPolicy(), model_alias="phi")
        assert e.value.candidates == [] and e.value.smallest is None


def test_full_ties_pick_the_first_in_input_order() -> None:
    v = VariantSpec(model_alias="m", name="v", format="gguf", quantization="Q4_K_M",
                    parameter_count=10**9)
    twins = [v, v.model_copy(), v.model_copy()]
    for first in range(3):
        ordered = twins[first:] + twins[:first]
        sel = VariantIndex(ordered).select(PROFILES["cpu-16gib-cpu-runtimes"], SelectionPolicy())
        assert sel.chosen is ordered[0]
        assert [c.variant for c in sel.candidates] == ordered  # ties keep input order
        assert sel.candidates[1].explanation == "ranked 2: ties with v; ordered by name"


def test_index_keeps_its_own_copy_of_the_variants() -> None:
    variants = [V]
    index = VariantIndex(variants)
    variants.append(V.model_copy(update={"name": "later", "installed": True}))
    assert len(index) == 1
    assert index.select(CPU16, SelectionPolicy()).chosen is V


def test_index_selects_repeatedly_under_different_policies() -> None:
    variants = [V, V.model_copy(update={"name": "q8", "quantization": "Q8_0"}),
                V.model_copy(update={"name": "q2", "quantization": "Q2_K"})]
    index = VariantIndex(variants)
    for prefer, name in (("quality", "q8"), ("speed", "v"), ("balanced", "q8")):
        policy = SelectionPolicy(prefer=prefer)  # type: ignore[arg-type]
        assert index.select(CPU16, policy).chosen.name == name
        assert select(variants, CPU16, policy).model_dump() == (
            index.select(CPU16, policy).model_dump()
        )


@pytest.mark.parametrize("profile",
                         ["rtx-npu-cuda", "two-gpus-vulkan-rocm", "cpu-2gib-no-runtimes"])
@pytest.mark.parametrize("prefer", ["quality", "balanced", "speed"])
def test_estimates_on_the_budget_boundaries(profile: str, prefer: str) -> None:
    """Estimates equal to the budget (fits), one more (does not), equal to the comfortable share
    of it, and equal estimates over different budgets (the first one names the smallest)."""
    hw = PROFILES[profile]
    policy = SelectionPolicy(prefer=prefer, balanced_fraction=0.5)  # type: ignore[arg-type]
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
    sel = select(variants, hw, policy)
    by_name = {c.variant.name: c for c in sel.candidates}
    for c in sel.candidates:
        if c.variant.estimated_memory == c.budget + 1 or c.variant.name.endswith("-5"):
            assert c.verdict == "rejected"
    assert by_name["cpu-0"].verdict != "rejected"  # exactly the budget fits
    if prefer == "balanced" and profile == "rtx-npu-cuda":
        assert sel.chosen.name == "cuda-2"
    rng = random.Random(0)
    for _ in range(3):
        rng.shuffle(variants)
        check_invariants(variants, hw, policy, None, rng)
        over = [v.model_copy(update={"estimated_memory": 2**40}) for v in variants]
        with pytest.raises(NoVariantFits) as e:
            select(over, hw, policy)
        assert e.value.smallest == 2**40
        budgets = {memory_budget(hw, policy, v.target) for v in over}
        assert e.value.budget in budgets


# ----------------------------------------------------------------------------- float64 inputs

V = VariantSpec(model_alias="m", name="v", format="gguf", quantization="Q4_K_M",
                parameter_count=10**9, n_layers=24, n_embd=2048, n_head=16)
CPU16 = PROFILES["cpu-16gib-cpu-runtimes"]
DEFAULT = SelectionPolicy()


def test_estimate_is_exact_below_2_53_and_float64_accurate_beyond() -> None:
    est = estimate_memory(V, DEFAULT)
    assert est is not None
    weights = 10**9 * 4.85 / 8
    assert est == (int(weights), 2 * 24 * 16 * 128 * 4096 * 2, int(200_000_000 + 0.05 * weights))
    (sel_est,) = (c.estimated_memory for c in select([V], CPU16, DEFAULT).candidates)
    assert sel_est == est.total
    # a given estimate beyond 2**53 is rounded to float64, in selection and in the breakdown
    huge = V.model_copy(update={"estimated_memory": 2**53 + 1})
    assert estimate_memory(huge, DEFAULT) == (2**53, 0, 0)
    with pytest.raises(NoVariantFits) as e:
        select([huge], CPU16, DEFAULT)
    assert e.value.smallest == 2**53
    # parts are whole bytes; their float64 sum rounds like any float64 beyond 2**53
    big = VariantSpec(model_alias="m", name="big", format="gguf", quantization="F32",
                      file_size=2**56, n_layers=1, n_embd=1, n_head=1)
    policy = SelectionPolicy(context_length=1, kv_cache_type="f32",
                             memory=MemoryPolicy(overhead_fraction=0, overhead_bytes=8))
    assert estimate_memory(big, policy) == (2**56, 8, 8)
    with pytest.raises(NoVariantFits) as e:
        select([big], CPU16, policy)
    assert e.value.smallest is not None
    assert math.isclose(e.value.smallest, 2**56 + 16, rel_tol=2**-52)


@pytest.mark.parametrize("bpw", [None, 0.0, -4.0, float("nan"), float("inf"), float("-inf")])
def test_bits_per_weight_counts_only_when_positive_and_finite(bpw: float | None) -> None:
    """Otherwise the table's figure for the quantization is used, in the estimate and the
    ranking alike (the variant then ties with one that gives no figure)."""
    plain = V.model_copy(update={"n_layers": None})  # the KV fallback reads the parameters too
    odd = plain.model_copy(update={"bits_per_weight": bpw, "name": "w"})
    assert estimate_memory(odd, DEFAULT) == estimate_memory(plain, DEFAULT)
    for prefer in ("quality", "balanced", "speed"):
        policy = SelectionPolicy(prefer=prefer)  # type: ignore[arg-type]
        sel = select([odd, plain], CPU16, policy)
        assert sel.chosen is plain  # a complete tie but for the name
        assert sel.candidates[1].reasons == ("ties with v; ordered by name",)
    sized = odd.model_copy(update={"parameter_count": None, "file_size": 10**9})
    est = estimate_memory(sized, DEFAULT)
    assert est is not None and est.weights == 10**9


def test_facts_of_zero_count_as_unknown() -> None:
    """head_dim 0 is n_embd / n_head, n_head_kv 0 is n_head; context 0 is the policy's."""
    gqa = V.model_copy(update={"n_head_kv": 4, "head_dim": 0, "context_length": 0})
    est = estimate_memory(gqa, DEFAULT)
    assert est is not None and est.kv_cache == 2 * 24 * 4 * (2048 // 16) * 4096 * 2
    mha = V.model_copy(update={"n_head_kv": 0, "head_dim": None})
    est = estimate_memory(mha, DEFAULT)
    assert est is not None and est.kv_cache == 2 * 24 * 16 * 128 * 4096 * 2
    (cand,) = select([gqa], CPU16, DEFAULT).candidates
    assert cand.estimated_memory == estimate_memory(gqa, DEFAULT).total  # type: ignore[union-attr]


@pytest.mark.parametrize("update", [
    {"file_size": 10**400},
    {"parameter_count": 10**400},
    {"estimated_memory": 10**400},
    {"n_layers": 10**200, "n_embd": 10**200},  # a KV cache beyond float64's range
])
def test_figures_beyond_float64_cannot_be_estimated(update: dict[str, Any]) -> None:
    odd = V.model_copy(update={**update, "name": "odd"})
    assert estimate_memory(odd, DEFAULT) is None
    sel = select([V, odd], CPU16, DEFAULT)
    assert sel.chosen is V
    assert sel.candidates[1].explanation == (
        "rejected: cannot estimate memory: its figures are beyond float64's range"
    )
    assert sel.candidates[1].estimated_memory is None
    with pytest.raises(NoVariantFits, match=r"every variant was rejected .*beyond float64"):
        select([odd], CPU16, DEFAULT)
    no_share = SelectionPolicy(memory=MemoryPolicy(overhead_fraction=0))  # 0 × inf is NaN
    assert estimate_memory(odd, no_share) is None
    (cand,) = (c for c in select([V, odd], CPU16, no_share).candidates if c.variant is odd)
    assert cand.reasons == ("cannot estimate memory: its figures are beyond float64's range",)


def test_huge_budgets_and_contexts() -> None:
    variants = [V, V.model_copy(update={"name": "w", "quantization": "Q8_0"})]
    quality = SelectionPolicy(prefer="quality")
    for profile in (_profile(2**62 + 1),
                    _profile(2**62, gpus=(GpuInfo(vendor="nvidia", name="huge",
                                                  memory_bytes=2**60 + 1),), runtimes=CUDA_RT)):
        sel = select(variants, profile, quality)
        assert sel.chosen.name == "w" and sel.budget == memory_budget(profile, quality)
    long = SelectionPolicy(context_length=10**400)  # capped by nothing: the model's is unknown
    sel = select([V.model_copy(update={"context_length": 8192}), V], CPU16, long)
    assert sel.chosen.context_length == 8192
    assert sel.candidates[1].explanation.endswith("beyond float64's range")
