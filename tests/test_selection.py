"""Selection: table-driven over real device captures × catalog models, plus the policy file.

Hardware profiles come from `agent.hardware.detect(root=tests/fixtures/hw/<slug>,
probe_runtimes=False)` with explicit `RuntimeInfo` overrides (the captures do not say what
llama.cpp / onnxruntime were built with). Where a capture has no memory file, the test
supplies the device's RAM, except for the devices named "memory-unknown", which test that
case; where it lacks a device the hardware has, the override says so.
"""

from __future__ import annotations

import json
import random
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from agent.hardware import detect
from registry import errors
from registry.catalog import load_catalog
from registry.profile import (
    CpuInfo,
    GpuInfo,
    HardwareProfile,
    MemoryInfo,
    NpuInfo,
    RuntimeInfo,
)
from registry.selection import (
    DEFAULT_POLICY_PATH,
    POLICY_SCHEMA_PATH,
    MemoryPolicy,
    NoVariantFits,
    PolicyError,
    QuantizationPolicy,
    QuantizationRule,
    Selection,
    SelectionPolicy,
    estimate_memory,
    load_policy,
    memory_budget,
    policy_schema_json,
    select,
)
from registry.types import GB, VariantSpec

HW = Path(__file__).parent / "fixtures" / "hw"
GiB = 1 << 30
DEFAULT = SelectionPolicy()

NO_RUNTIMES = RuntimeInfo()
CPU_ONLY = RuntimeInfo(llama_cpp_version="0.3.36", onnx_providers=("CPUExecutionProvider",))
CUDA = RuntimeInfo(
    llama_gpu_offload=True, llama_backends=("cuda",),
    onnx_providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
)
OPENVINO = RuntimeInfo(onnx_providers=("OpenVINOExecutionProvider", "CPUExecutionProvider"))
QNN = RuntimeInfo(onnx_providers=("QNNExecutionProvider", "CPUExecutionProvider"))
HEXAGON = NpuInfo(kind="qualcomm-hexagon", name="Qualcomm Hexagon NPU (X1E-80-100)")
RKNN_VULKAN = RuntimeInfo(
    llama_gpu_offload=True, llama_backends=("vulkan",),
    onnx_providers=("RknpuExecutionProvider", "CPUExecutionProvider"),
)
VULKAN_ROCM = RuntimeInfo(llama_gpu_offload=True, llama_backends=("vulkan", "rocm"))

# name: (fixture slug, runtimes, RAM if the capture has none, other overrides)
DEVICES: dict[str, tuple[str, RuntimeInfo, int | None, dict[str, Any]]] = {
    "pi5": ("raspberry-pi-5", CPU_ONLY, None, {}),
    "jetson": ("jetson-orin-nano-super-jp6", CUDA, None, {}),
    "jetson-no-offload": ("jetson-orin-nano-super-jp6", CPU_ONLY, None, {}),
    "jetson-vulkan": (
        "jetson-orin-nano-super-jp6",
        RuntimeInfo(llama_gpu_offload=True, llama_backends=("vulkan",)), None, {},
    ),
    "core-ultra": ("intel-meteor-lake-npu-linux-npu-driver-15", OPENVINO, 32 * GiB, {}),
    "core-ultra-no-ov": ("intel-meteor-lake-npu-linux-npu-driver-15", CPU_ONLY, 32 * GiB, {}),
    "a100": ("nvidia-a100-sxm4-80gb-mig-server", CUDA, 512 * GiB, {}),
    "a100-no-gpu-runtime": ("nvidia-a100-sxm4-80gb-mig-server", CPU_ONLY, 512 * GiB, {}),
    # TODO(hardware fixtures): the X Elite capture is lscpu/sbc-bench only; the devkit's
    # Hexagon NPU is added here until the tree carries its remoteproc/fastrpc nodes.
    "x-elite": ("snapdragon-x-elite-devkit", QNN, None, {"npus": (HEXAGON,)}),
    "qcs8300-npu-offline": ("qualcomm-qcs8300-ride-sx-cdsp-offline", QNN, 16 * GiB, {}),
    "vmware-4gb": ("x86-xeon-gold-6326-vmware-vm", CPU_ONLY, 4 * GiB, {}),
    # captures without meminfo, left so: the RAM size is unknown
    "core-ultra-memory-unknown": ("intel-meteor-lake-npu-linux-npu-driver-15", OPENVINO, None,
                                  {}),
    "l40s-memory-unknown": ("x86-xeon-8562y-l40s-server", CUDA, None, {}),
    # an RK3588 whose NPU shows only through devfreq, its Mali GPU through devfreq + kbase
    "rock5b-devfreq-npu": ("rk3588-radxa-rock-5b-sbcbench-4qJr", RKNN_VULKAN, None, {}),
    # a Radeon 780M with a 4 GiB carve-out (the capture has no meminfo; the laptop's RAM)
    "radeon-780m": ("amd-radeon-780m-phoenix-lact", VULKAN_ROCM, 32 * GiB, {}),
}


@cache
def device(name: str) -> HardwareProfile:
    slug, runtimes, ram, extra = DEVICES[name]
    tree = HW / slug
    if not tree.is_dir():
        pytest.skip(f"hardware fixture {slug} is not present")
    profile = detect(root=tree, probe_runtimes=False)
    update: dict[str, Any] = {"runtimes": runtimes, **extra}
    if ram is not None:
        update["memory"] = MemoryInfo(total_bytes=ram, available_bytes=ram)
    return profile.model_copy(update=update)


def specs(alias: str) -> tuple[VariantSpec, ...]:
    return load_catalog().get(alias).specs()


def run(dev: str, alias: str, policy: SelectionPolicy = DEFAULT) -> Selection:
    return select(specs(alias), device(dev), policy, model_alias=alias)


def by_name(sel: Selection) -> dict[str, str]:
    return {c.variant.name: c.explanation for c in sel.candidates}


def test_fixture_profiles_carry_the_hardware_the_table_relies_on() -> None:
    assert device("pi5").cpu.arch == "aarch64" and not device("pi5").gpus
    assert device("jetson").gpus[0].vendor == "nvidia" and device("jetson").gpus[0].integrated
    a100 = device("a100").gpus[0]
    assert not a100.integrated and a100.memory_bytes == 80 * GiB
    assert device("core-ultra").npu("intel-npu") is not None
    qcs = device("qcs8300-npu-offline").npus
    assert qcs and qcs[0].kind == "qualcomm-hexagon" and not qcs[0].online


# device × model → the chosen variant, under the default policy
CHOICES = [
    ("pi5", "smollm2-135m", "gguf-q4_1-cpu"),
    ("pi5", "gemma3-270m", "gguf-q4_k_m-cpu"),
    ("pi5", "phi4-mini", "gguf-q4_k_m-cpu"),
    ("pi5", "qwen3-0.6b", "gguf-f16-cpu"),
    ("pi5", "bitnet-b1.58-2b4t", "gguf-tq1_0-cpu"),
    ("pi5", "minilm-l6-v2", "onnx-int8-cpu"),
    ("jetson", "phi4-mini", "gguf-q4_k_m-cuda"),
    ("jetson", "gemma3-4b", "gguf-q4_k_m-cuda"),
    ("jetson-no-offload", "phi4-mini", "gguf-q4_k_m-cpu"),
    ("jetson-vulkan", "phi4-mini", "gguf-q4_k_m-cpu"),
    ("core-ultra", "phi4-mini", "onnx-int4-npu-intel-npu"),
    ("core-ultra", "qwen3-1.7b", "onnx-int4-npu-intel-npu"),
    ("core-ultra-no-ov", "phi4-mini", "gguf-f16-cpu"),
    ("a100", "llama3.1-8b", "gguf-q8_0-cuda"),
    ("a100", "phi4-mini", "gguf-q4_k_m-cuda"),
    ("a100-no-gpu-runtime", "llama3.1-8b", "gguf-f16-cpu"),
    ("x-elite", "phi4-mini", "onnx-int4-npu-qualcomm-hexagon"),
    ("x-elite", "qwen3-4b", "onnx-int4-npu-qualcomm-hexagon"),
    ("qcs8300-npu-offline", "phi4-mini", "gguf-q8_0-cpu"),
    ("vmware-4gb", "gemma3-1b", "gguf-q4_k_m-cpu"),
    ("vmware-4gb", "smollm2-135m", "gguf-q4_1-cpu"),
]


@pytest.mark.parametrize(("dev", "alias", "expected"), CHOICES)
def test_choice(dev: str, alias: str, expected: str) -> None:
    sel = run(dev, alias)
    assert sel.chosen.name == expected, sel.explain()
    assert sel.model_alias == alias
    assert sel.estimated_memory <= sel.budget


@pytest.mark.parametrize("dev", sorted(DEVICES))
@pytest.mark.parametrize("alias", sorted(load_catalog().aliases))
def test_every_device_and_model_gets_a_choice_or_a_reason(dev: str, alias: str) -> None:
    """The whole table: a viable choice that fits, or NoVariantFits naming the smallest."""
    variants = specs(alias)
    try:
        sel = select(variants, device(dev), DEFAULT, model_alias=alias)
    except NoVariantFits as e:
        assert str(e).startswith(f"no variant of {alias} fits")
        assert len(e.candidates) == len(variants)
        assert all(c.verdict == "rejected" for c in e.candidates)
        return
    cands = sel.candidates
    assert sorted(c.variant.name for c in cands) == sorted(v.name for v in variants)
    assert [c.verdict for c in cands].count("chosen") == 1
    assert cands[0].verdict == "chosen" and cands[0].variant == sel.chosen
    ranks = [c.rank for c in cands if c.rank is not None]
    assert ranks == list(range(1, len(ranks) + 1))
    for c in cands:
        assert c.reasons and all(c.reasons)
        assert c.explanation.startswith(c.label + ": ")
        if c.verdict != "rejected":
            assert c.estimated_memory is not None and c.estimated_memory <= c.budget


# ----------------------------------------------------------------------------- the rules


def test_nothing_fits_names_the_smallest_requirement() -> None:
    variants = specs("phi4-mini")
    vm = device("vmware-4gb")
    with pytest.raises(NoVariantFits) as e:
        select(variants, vm, DEFAULT, model_alias="phi4-mini")
    cpu = [v for v in variants if v.target == "cpu"]
    smallest = min(est.total for v in cpu if (est := estimate_memory(v, DEFAULT)))
    budget = memory_budget(vm, DEFAULT)
    assert budget == int(0.75 * 4 * GiB - 500_000_000)
    assert str(e.value) == (
        f"no variant of phi4-mini fits: smallest needs {smallest / 1e9:.1f} GB, "
        f"budget is {budget / 1e9:.1f} GB"
    )
    assert e.value.smallest == smallest and e.value.budget == budget
    assert isinstance(e.value, errors.NoVariantFits)  # what the CLI and API catch


def test_nothing_fits_under_a_memory_cap() -> None:
    policy = SelectionPolicy(memory=MemoryPolicy(max_bytes="2GB"))  # type: ignore[arg-type]
    with pytest.raises(NoVariantFits, match=r"smallest needs 2\.\d GB, budget is 2\.0 GB"):
        run("a100-no-gpu-runtime", "phi4-mini", policy)


def test_every_variant_rejected_for_other_reasons() -> None:
    policy = SelectionPolicy(
        quantizations=QuantizationPolicy(default=QuantizationRule(allow=("*",), forbid=("*",)))
    )
    with pytest.raises(NoVariantFits, match=r"every variant was rejected .*forbidden by policy"):
        run("pi5", "smollm2-135m", policy)
    with pytest.raises(NoVariantFits, match="no variant of phi4-mini to choose from"):
        select([], device("pi5"), DEFAULT, model_alias="phi4-mini")


def test_gpu_variant_without_gpu_runtime_falls_back_to_cpu() -> None:
    sel = run("a100-no-gpu-runtime", "phi4-mini")
    assert sel.chosen.target == "cpu"
    lines = by_name(sel)
    assert lines["gguf-q4_k_m-cuda"] == (
        "rejected: needs CUDA, llama.cpp was built without GPU offload"
    )
    assert lines["onnx-int4-cuda"] == (
        "rejected: needs onnxruntime:CUDAExecutionProvider, not available"
    )
    chosen = sel.chosen_candidate.explanation
    assert "falls back to cpu: gguf-q4_k_m-cuda rejected: needs CUDA, llama.cpp was built " \
           "without GPU offload" in chosen


def test_gpu_variant_without_gpu_is_rejected_quietly() -> None:
    sel = run("pi5", "phi4-mini")
    assert by_name(sel)["gguf-q4_k_m-cuda"] == "rejected: needs CUDA, none detected"
    assert "falls back" not in sel.chosen_candidate.explanation


def test_llama_backend_must_match_the_target() -> None:
    sel = run("jetson-vulkan", "phi4-mini")
    assert by_name(sel)["gguf-q4_k_m-cuda"] == (
        "rejected: needs CUDA, llama.cpp backends are: vulkan"
    )


def test_nvidia_gpu_with_offload_chooses_cuda_with_gpu_budget() -> None:
    sel = run("a100", "llama3.1-8b")
    assert sel.chosen.target == "cuda"
    assert sel.budget == 80 * GiB - 500_000_000  # discrete: GPU memory − GPU headroom
    assert sel.chosen_candidate.device == "gpu"
    lines = by_name(sel)
    assert lines["gguf-q8_0-cpu"].startswith("ranked ")
    assert "runs on cpu; gpu comes first in device order" in lines["gguf-q8_0-cpu"]


def test_integrated_gpu_uses_the_system_budget() -> None:
    sel = run("jetson", "phi4-mini")
    assert sel.chosen.target == "cuda"
    assert sel.budget == memory_budget(device("jetson"), DEFAULT)
    assert sel.budget == memory_budget(device("jetson"), DEFAULT, "cuda")


def test_offline_npu_is_rejected() -> None:
    sel = run("qcs8300-npu-offline", "phi4-mini")
    line = by_name(sel)["onnx-int4-npu-qualcomm-hexagon"]
    assert line.startswith("rejected: needs qualcomm-hexagon NPU, present but offline")
    assert "offline" in line.split("offline", 1)[1]  # the detail from the device
    assert sel.chosen.target == "cpu"
    assert "falls back to cpu: onnx-int4-npu-qualcomm-hexagon rejected" in (
        sel.chosen_candidate.explanation
    )


def test_npu_without_its_execution_provider_is_rejected() -> None:
    sel = run("core-ultra-no-ov", "phi4-mini")
    assert by_name(sel)["onnx-int4-npu-intel-npu"] == (
        "rejected: needs onnxruntime:OpenVINOExecutionProvider, not available"
    )
    assert run("core-ultra", "phi4-mini").chosen.target == "npu-intel-npu"


def test_npu_comes_first_even_below_the_quality_floor() -> None:
    sel = run("x-elite", "phi4-mini")
    assert sel.chosen.quantization == "int4"
    reasons = sel.chosen_candidate.reasons
    # Q4_K_M fits on the CPU, so "nothing at or above it fits" was untrue here.
    assert "int4 is below the preferred quality (Q4_K_M), but nothing at or above it runs on " \
        "npu" in reasons
    assert "highest quality within 50% of the budget (int4)" in reasons
    assert "runs on npu-qualcomm-hexagon; npu comes first in device order" in reasons


def test_policy_forbids_a_quantization() -> None:
    policy = SelectionPolicy(quantizations=QuantizationPolicy(
        models={"phi4-mini": QuantizationRule(forbid=("Q4_K_M",))}
    ))
    sel = run("pi5", "phi4-mini", policy)
    assert sel.chosen.quantization != "Q4_K_M"
    lines = by_name(sel)
    assert lines["gguf-q4_k_m-cpu"] == "rejected: quantization Q4_K_M forbidden by policy"
    assert lines["gguf-q4_k_m-cuda"] == "rejected: quantization Q4_K_M forbidden by policy"
    # the rule is per model: another model keeps its Q4_K_M
    assert run("pi5", "qwen3-4b", policy).chosen.quantization == "Q4_K_M"


def test_policy_rules_by_glob_exact_wins_and_case_is_ignored() -> None:
    policy = SelectionPolicy(quantizations=QuantizationPolicy(
        default=QuantizationRule(allow=("*",), forbid=("q2_*",)),
        models={
            "qwen3-*": QuantizationRule(allow=("q8_0",)),
            "qwen3-0.6*": QuantizationRule(allow=("f16", "int*")),
            "qwen3-4b": QuantizationRule(allow=("q4_k_m",)),
        },
    ))
    assert run("pi5", "qwen3-1.7b", policy).chosen.quantization == "Q8_0"
    sel = run("pi5", "qwen3-0.6b", policy)  # the longer glob wins
    assert sel.chosen.quantization in {"F16", "int8", "int4"}
    assert by_name(sel)["gguf-q8_0-cpu"] == (
        "rejected: quantization Q8_0 not allowed by policy (allowed: f16, int*)"
    )
    assert run("pi5", "qwen3-4b", policy).chosen.quantization == "Q4_K_M"
    q2 = VariantSpec(model_alias="phi4-mini", name="gguf-q2_k-cpu", format="gguf",
                     quantization="Q2_K", parameter_count=3_836_000_000)
    sel = select([*specs("phi4-mini"), q2], device("pi5"), policy)
    assert by_name(sel)["gguf-q2_k-cpu"] == "rejected: quantization Q2_K forbidden by policy"


def test_device_order_can_exclude_a_device() -> None:
    policy = SelectionPolicy(device_order=("cpu",))
    sel = run("a100", "llama3.1-8b", policy)
    assert sel.chosen.target == "cpu"
    assert by_name(sel)["gguf-q8_0-cuda"] == (
        "rejected: device gpu excluded by policy (device_order: cpu)"
    )


def test_unavailable_runtime_requirement() -> None:
    sel = run("pi5", "bitnet-b1.58-2b4t")
    assert by_name(sel)["gguf-i2_s-cpu"] == "rejected: needs bitnet.cpp, not available"


def with_backends(dev: str, backends: tuple[str, ...] | None) -> HardwareProfile:
    profile = device(dev)
    runtimes = profile.runtimes.model_copy(update={"backends": backends})
    return profile.model_copy(update={"runtimes": runtimes})


@pytest.mark.parametrize(
    ("dev", "alias", "prefer", "expected"),
    [("pi5", "qwen3-0.6b", "quality", "gguf-f16-cpu"),  # onnx-fp32-cpu without the rule
     ("pi5", "qwen3-0.6b", "balanced", "gguf-f16-cpu"),
     ("core-ultra", "phi4-mini", "balanced", "gguf-f16-cpu"),  # the NPU variant is ONNX
     ("pi5", "minilm-l6-v2", "balanced", None)],  # ONNX only: nothing left
)
def test_a_format_without_a_backend_is_rejected(
    dev: str, alias: str, prefer: str, expected: str | None
) -> None:
    policy = SelectionPolicy(prefer=prefer)  # type: ignore[arg-type]
    profile = with_backends(dev, ("gguf",))
    reason = "no onnx backend in this agent (available: gguf)"
    if expected is None:
        with pytest.raises(NoVariantFits) as e:
            select(specs(alias), profile, policy, model_alias=alias)
        assert str(e.value) == f"no variant of {alias} fits: every variant was rejected ({reason})"
        return
    sel = select(specs(alias), profile, policy, model_alias=alias)
    assert sel.chosen.name == expected
    onnx = [c for c in sel.candidates if c.variant.format == "onnx"]
    assert onnx and all(c.explanation == f"rejected: {reason}" for c in onnx)
    assert all(c.verdict != "rejected" or c.variant.format == "onnx" or c.variant.target != "cpu"
               for c in sel.candidates)
    assert f"{onnx[0].variant.name:<{max(len(v.name) for v in specs(alias))}}  rejected: " \
           f"{reason}" in sel.explain().splitlines()


def test_a_backend_rejection_of_a_present_npu_is_a_fallback() -> None:
    sel = select(specs("phi4-mini"), with_backends("core-ultra", ("gguf",)), DEFAULT)
    assert sel.chosen.target == "cpu"
    assert "falls back to cpu: onnx-int4-npu-intel-npu rejected: no onnx backend in this " \
           "agent (available: gguf)" in sel.chosen_candidate.reasons


def test_no_backend_at_all_rejects_everything() -> None:
    with pytest.raises(NoVariantFits) as e:
        select(specs("qwen3-0.6b"), with_backends("pi5", ()), DEFAULT, model_alias="qwen3-0.6b")
    assert str(e.value) == (
        "no variant of qwen3-0.6b fits: every variant was rejected (no gguf backend in this "
        "agent (available: none); no onnx backend in this agent (available: none))"
    )
    assert e.value.smallest is None
    assert {c.explanation for c in e.value.candidates} == {
        "rejected: no gguf backend in this agent (available: none)",
        "rejected: no onnx backend in this agent (available: none)",
    }
    assert len(e.value.candidates) == len(specs("qwen3-0.6b"))


def test_device_order_comes_before_the_backend_rule() -> None:
    policy = SelectionPolicy(device_order=("cpu",))
    sel = select(specs("phi4-mini"), with_backends("core-ultra", ("gguf",)), policy)
    lines = by_name(sel)
    assert lines["onnx-int4-npu-intel-npu"] == (
        "rejected: device npu excluded by policy (device_order: cpu)"
    )
    assert lines["onnx-int4-cpu"] == "rejected: no onnx backend in this agent (available: gguf)"


@pytest.mark.parametrize("dev", ["pi5", "a100", "x-elite", "core-ultra", "qcs8300-npu-offline"])
def test_unknown_backends_change_nothing(dev: str) -> None:
    """backends=None (not checked) is the profile as before; listing both formats is too."""
    for alias in ("phi4-mini", "qwen3-0.6b", "minilm-l6-v2"):
        reference = select(specs(alias), device(dev), DEFAULT, model_alias=alias)
        assert device(dev).runtimes.backends is None
        for backends in (None, ("gguf", "onnx"), ("onnx", "gguf", "other")):
            sel = select(specs(alias), with_backends(dev, backends), DEFAULT, model_alias=alias)
            assert sel.model_dump() == reference.model_dump()


def test_memory_rejection_reason() -> None:
    sel = run("pi5", "phi4-mini")
    line = by_name(sel)["gguf-f16-cpu"]
    assert re.fullmatch(r"rejected: \d+\.\d GB estimated > 5\.8 GB budget", line), line


@pytest.mark.parametrize(
    ("prefer", "expected"),
    [("quality", "onnx-fp32-cpu"), ("balanced", "gguf-f16-cpu"), ("speed", "gguf-q4_k_m-cpu")],
)
def test_preference_changes_the_choice(prefer: str, expected: str) -> None:
    policy = SelectionPolicy(prefer=prefer)  # type: ignore[arg-type]
    assert run("pi5", "qwen3-0.6b", policy).chosen.name == expected


def test_speed_without_a_floor_takes_the_fewest_bits() -> None:
    policy = SelectionPolicy(prefer="speed", min_quality=None)
    sel = run("pi5", "qwen3-0.6b", policy)
    assert sel.chosen.name == "onnx-int4-cpu"
    assert "more bits per weight than int4 (4.5 > 4)" in by_name(sel)["gguf-q4_0-cpu"]


def test_balanced_prefers_comfortable_variants() -> None:
    sel = run("pi5", "phi4-mini")  # nothing at Q4_K_M or above is within 50% of 5.8 GB
    assert sel.chosen.name == "gguf-q4_k_m-cpu"
    assert sel.chosen_candidate.reasons[0] == (
        "smallest estimate at or above Q4_K_M; none fits within 50% of the budget"
    )
    assert by_name(sel)["gguf-q4_0-cpu"] == (
        "ranked 3: Q4_0 is below the preferred quality (Q4_K_M)"
    )
    sel = run("core-ultra-no-ov", "phi4-mini")  # 32 GiB: F16 is comfortable
    assert sel.chosen.name == "gguf-f16-cpu"


def test_installed_breaks_ties() -> None:
    cuda_q4 = next(v for v in specs("phi4-mini") if v.name == "gguf-q4_k_m-cpu")
    twin = cuda_q4.model_copy(update={"name": "gguf-q4_k_m-cpu-mirror", "installed": True})
    sel = select([cuda_q4, twin], device("pi5"), DEFAULT)
    assert sel.chosen.name == "gguf-q4_k_m-cpu-mirror"
    assert by_name(sel)["gguf-q4_k_m-cpu"] == "ranked 2: not installed; gguf-q4_k_m-cpu-mirror is"
    plain = twin.model_copy(update={"installed": False})
    sel = select([plain, cuda_q4], device("pi5"), DEFAULT)
    assert sel.chosen.name == "gguf-q4_k_m-cpu"  # then by name
    assert by_name(sel)["gguf-q4_k_m-cpu-mirror"].endswith("ordered by name")


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dev", ["pi5", "a100", "x-elite", "core-ultra"])
def test_shuffled_input_gives_the_same_result(dev: str, seed: int) -> None:
    variants = [s for m in load_catalog().models for s in m.specs()]
    reference = select(variants, device(dev), DEFAULT)
    shuffled = variants[:]
    random.Random(seed).shuffle(shuffled)
    again = select(shuffled, device(dev), DEFAULT)
    assert again.chosen == reference.chosen
    assert again.model_dump() == reference.model_dump()


def _population(seed: int, n: int = 600) -> list[VariantSpec]:
    """Random variants of many models, with every target kind and some unknown facts."""
    rng = random.Random(seed)
    quants = ["F16", "Q8_0", "Q6_K", "Q4_K_M", "Q4_0", "Q2_K", "TQ1_0", "int8", "int4", "fp16"]
    targets = [("gguf", "cpu", None), ("gguf", "cuda", "llama.cpp:cuda"), ("onnx", "cpu", None),
               ("onnx", "npu-qualcomm-hexagon", None), ("onnx", "cuda", None)]
    out = []
    for i in range(n):
        fmt, target, req = rng.choice(targets)
        params = rng.choice([135e6, 6e8, 1.7e9, 3.8e9, 8e9, 70e9])
        out.append(VariantSpec(
            model_alias=f"m{i % 7}", name=f"v{i}", format=fmt, quantization=rng.choice(quants),
            target=target, runtime_requirement=req,
            file_size=int(params * rng.uniform(0.2, 2)) if rng.random() < 0.5 else None,
            parameter_count=int(params) if rng.random() < 0.9 else None,
            context_length=rng.choice([None, 2048, 8192]),
            n_layers=rng.choice([None, 24, 32]), n_embd=rng.choice([None, 2048, 4096]),
            n_head=rng.choice([None, 16, 32]), n_head_kv=rng.choice([None, 4, 8]),
            head_dim=rng.choice([None, None, 128]), native=rng.random() < 0.1,
            installed=rng.random() < 0.2,
        ))
    return out


@pytest.mark.parametrize("prefer", ["quality", "balanced", "speed"])
@pytest.mark.parametrize("seed", range(4))
def test_fast_path_agrees_with_the_full_ranking(prefer: str, seed: int) -> None:
    policy = SelectionPolicy(
        prefer=prefer,  # type: ignore[arg-type]
        quantizations=QuantizationPolicy(models={"m1": QuantizationRule(forbid=("Q4_*",))}),
    )
    variants = _population(seed)
    for dev in ("pi5", "a100", "x-elite"):
        sel = select(variants, device(dev), policy)
        cands = sel.candidates
        assert len(cands) == len(variants)
        assert cands[0].variant == sel.chosen and cands[0].estimated_memory == sel.estimated_memory
        for c in cands:
            est = estimate_memory(c.variant, policy)
            assert c.estimated_memory == (est.total if est else None) or (
                est is not None and c.estimated_memory is not None
                and abs(c.estimated_memory - est.total) <= 2
            )


def test_selection_is_json() -> None:
    sel = run("a100-no-gpu-runtime", "phi4-mini")
    data = json.loads(sel.model_dump_json())
    assert data["chosen"]["name"] == sel.chosen.name
    assert len(data["candidates"]) == len(specs("phi4-mini"))
    first = data["candidates"][0]
    assert first["verdict"] == "chosen" and first["label"] == "chosen" and first["rank"] == 1
    assert first["explanation"].startswith("chosen: ")
    assert {c["label"] for c in data["candidates"]} >= {"ranked 2", "rejected"}


def test_explain_lists_every_candidate() -> None:
    sel = run("x-elite", "phi4-mini")
    lines = sel.explain().splitlines()
    assert len(lines) == len(specs("phi4-mini"))
    for v in specs("phi4-mini"):
        assert sum(line.split()[0] == v.name for line in lines) == 1


# ----------------------------------------------------------------------------- estimates


def test_estimate_formula_for_smollm2() -> None:
    smol = specs("smollm2-135m")[0]
    est = estimate_memory(smol, DEFAULT)
    assert est is not None
    assert est.weights == 98_362_432
    assert est.kv_cache == 2 * 30 * 4096 * 3 * (576 // 9) * 2
    assert est.overhead == int(200_000_000 + 0.05 * 98_362_432)
    sel = run("pi5", "smollm2-135m")
    assert sel.estimated_memory == est.total or abs(sel.estimated_memory - est.total) <= 2


def test_estimate_matches_selection_for_every_catalog_variant() -> None:
    policy = SelectionPolicy(prefer="quality", device_order=("cpu", "gpu", "npu"))
    for model in load_catalog().models:
        for v in model.specs():
            est = estimate_memory(v, policy)
            assert est is not None
            sel = select([v.model_copy(update={"target": "cpu", "runtime_requirement": None})],
                         device("a100"), policy)
            assert abs(sel.estimated_memory - est.total) <= 2, v.name


def test_estimate_caps_context_and_follows_kv_type() -> None:
    bitnet = specs("bitnet-b1.58-2b4t")[0]  # trained context 4096
    long = SelectionPolicy(context_length=32_768)
    est_long = estimate_memory(bitnet, long)
    est_default = estimate_memory(bitnet, DEFAULT)
    assert est_long is not None and est_default is not None
    assert est_long.kv_cache == est_default.kv_cache
    q8 = estimate_memory(bitnet, SelectionPolicy(kv_cache_type="q8_0"))
    assert q8 is not None and q8.kv_cache == pytest.approx(est_default.kv_cache * 1.0625 / 2)


def test_estimate_counts_kv_windows_for_gguf_only() -> None:
    """`kv_windows` multiplies a GGUF variant's KV cache (llama.cpp holds a window per
    concurrent sequence), never an ONNX one's; weights and overhead do not change. Among
    mixed formats the engine applies it row by row, to the byte of `estimate_memory`."""
    phi = {v.name: v for v in specs("phi4-mini")}
    gguf, onnx = phi["gguf-q4_k_m-cpu"], phi["onnx-int4-cpu"]
    four = SelectionPolicy(kv_windows=4)
    for v, windows in ((gguf, 4), (onnx, 1)):
        one, est = estimate_memory(v, DEFAULT), estimate_memory(v, four)
        assert one is not None and est is not None
        assert one.kv_cache == 2 * 32 * 8 * 128 * 4096 * 2  # Phi-4-mini: 512 MiB a window
        assert est == (one.weights, windows * one.kv_cache, one.overhead), v.name
    # each window is whole bytes: an odd per-window figure (q8_0) multiplies, not rounds
    q8 = SelectionPolicy(kv_cache_type="q8_0", kv_windows=3)
    odd = gguf.model_copy(update={"n_layers": 1, "n_head_kv": 1, "head_dim": 1,
                                  "context_length": 7})
    assert estimate_memory(odd, q8).kv_cache == 3 * int(2 * 7 * 1.0625)  # type: ignore[union-attr]
    # the engine, over both formats at once, compares exactly these figures
    sel = select([gguf, onnx], device("a100"), four.model_copy(update={"prefer": "quality"}))
    by_name = {c.variant.name: c.estimated_memory for c in sel.candidates}
    assert by_name == {v.name: estimate_memory(v, four).total  # type: ignore[union-attr]
                       for v in (gguf, onnx)}
    # a given estimate is taken at its word, windows or not
    given = gguf.model_copy(update={"estimated_memory": 123})
    assert estimate_memory(given, four) == (123, 0, 0)


def test_estimate_fallbacks() -> None:
    bare = VariantSpec(model_alias="m", name="v", format="gguf", quantization="Q4_0",
                       parameter_count=4_000_000_000)
    est = estimate_memory(bare, DEFAULT)
    assert est is not None
    assert est.weights == 4_000_000_000 * 4.5 / 8
    assert est.kv_cache == int(2.5 * 4_000_000_000 ** 0.5 * 4096)
    mha = bare.model_copy(update={"n_layers": 10, "n_embd": 1000})
    est_mha = estimate_memory(mha, DEFAULT)
    assert est_mha is not None and est_mha.kv_cache == 2 * 10 * 1000 * 4096 * 2
    assert estimate_memory(bare.model_copy(update={"parameter_count": None}), DEFAULT) is None
    given = bare.model_copy(update={"estimated_memory": 123})
    assert estimate_memory(given, DEFAULT) == (123, 0, 0)


def test_unestimable_variant_is_rejected() -> None:
    v = VariantSpec(model_alias="m", name="v", format="gguf", quantization="Q4_0")
    with pytest.raises(NoVariantFits) as e:
        select([v], device("pi5"), DEFAULT)
    assert e.value.candidates[0].explanation == (
        "rejected: cannot estimate memory: no file size and no parameter count"
    )


# ----------------------------------------------------------------------------- hardware classes


def _gguf(name: str, target: str, size: int) -> VariantSpec:
    return VariantSpec(model_alias="m", name=name, format="gguf", quantization="Q4_K_M",
                       target=target, estimated_memory=size)


def test_memory_unknown_is_said_not_a_zero_budget() -> None:
    assert device("core-ultra-memory-unknown").memory.total_bytes is None
    with pytest.raises(NoVariantFits) as e:
        run("core-ultra-memory-unknown", "phi4-mini")
    assert "memory unknown" in str(e.value) and "budget is 0 MB" not in str(e.value)
    assert e.value.smallest is None
    lines = {c.variant.name: c.explanation for c in e.value.candidates}
    assert lines["gguf-q4_k_m-cpu"] == (
        "rejected: memory unknown: the device reported no RAM size, so no budget")
    # the NPU's budget is system RAM too
    assert lines["onnx-int4-npu-intel-npu"].startswith("rejected: memory unknown")


def test_memory_unknown_leaves_a_discrete_gpu_its_own_budget() -> None:
    sel = run("l40s-memory-unknown", "llama3.1-8b")
    assert sel.chosen.target == "cuda"
    assert sel.budget == 46068 * 2**20 - 500_000_000  # the GPU's memory, known
    assert by_name(sel)["gguf-q8_0-cpu"].startswith("rejected: memory unknown")


def test_amd_apu_igpu_budgets_against_system_ram() -> None:
    profile = device("radeon-780m")
    (gpu,) = profile.gpus
    assert gpu.integrated and gpu.memory_bytes == 4 * GiB  # the carve-out
    variants = [_gguf("vulkan-6gb", "vulkan", 6 * GB), _gguf("cpu-6gb", "cpu", 6 * GB)]
    sel = select(variants, profile, DEFAULT)
    # it was taken for a discrete card with 4 GiB of VRAM: "6.0 GB estimated > 3.8 GB GPU
    # budget"; as an iGPU it shares the laptop's RAM
    assert sel.chosen.name == "vulkan-6gb"
    assert sel.budget == memory_budget(profile, DEFAULT) == memory_budget(profile, DEFAULT,
                                                                          "vulkan")


def test_soc_gpu_off_pci_is_a_vulkan_device_on_system_ram() -> None:
    profile = device("rock5b-devfreq-npu")
    variants = [_gguf("vulkan", "vulkan", 2 * GB), _gguf("metal", "metal", 2 * GB),
                _gguf("cpu", "cpu", 2 * GB)]
    sel = select(variants, profile, DEFAULT)
    assert sel.chosen.name == "vulkan"  # was "needs Vulkan, none detected"
    assert sel.budget == memory_budget(profile, DEFAULT)
    # Mali has a vendor of its own now, so it is not taken for Metal's "other" (Apple) GPU
    assert by_name(sel)["metal"] == "rejected: needs Metal, none detected"


def test_npu_with_state_unknown_is_reported_but_not_offered() -> None:
    npu = VariantSpec(model_alias="m", name="onnx-npu", format="onnx", quantization="int8",
                      target="npu-rockchip-rknpu", estimated_memory=GB)
    sel = select([npu, _gguf("cpu", "cpu", GB)], device("rock5b-devfreq-npu"), DEFAULT)
    assert sel.chosen.name == "cpu"
    line = by_name(sel)["onnx-npu"]
    assert line.startswith("rejected: needs rockchip-rknpu NPU, present but offline (state "
                           "unknown: seen only through its devfreq node fdab0000.npu")


def test_memory_budget_for_hand_built_profiles() -> None:
    profile = HardwareProfile(
        cpu=CpuInfo(arch="x86_64", cores_physical=8, cores_logical=16),
        memory=MemoryInfo(total_bytes=16 * GB, available_bytes=8 * GB),
        gpus=(
            GpuInfo(vendor="nvidia", name="small", memory_bytes=8 * GB),
            GpuInfo(vendor="nvidia", name="big", memory_bytes=24 * GB),
        ),
    )
    assert memory_budget(profile, DEFAULT) == 12 * GB - 500_000_000
    assert memory_budget(profile, DEFAULT, "cuda") == 24 * GB - 500_000_000
    capped = SelectionPolicy(memory=MemoryPolicy(max_bytes="4GB"))  # type: ignore[arg-type]
    assert memory_budget(profile, capped) == 4 * GB  # the cap is the budget itself


# ----------------------------------------------------------------------------- policy file


def test_default_policy_file_is_the_defaults() -> None:
    assert load_policy(DEFAULT_POLICY_PATH) == SelectionPolicy()
    assert load_policy() == SelectionPolicy()


def test_policy_schema_is_in_sync() -> None:
    committed = POLICY_SCHEMA_PATH.read_text(encoding="utf-8")
    assert committed == policy_schema_json(), (
        "regenerate: .venv/bin/python -c 'from registry.selection import *; "
        "POLICY_SCHEMA_PATH.write_text(policy_schema_json())'"
    )


def _policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "selection.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_invalid_policy_names_file_line_and_field(tmp_path: Path) -> None:
    path = _policy(tmp_path, "prefer: balanced\nmemory:\n  fraction: 1.5\n")
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    assert str(e.value).startswith(f"{path}:3: memory.fraction: ")
    assert isinstance(e.value, errors.PolicyError)


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        ("prefer: fastest\n", 1, "prefer"),
        ("min_quality: Q9_9\n", 1, "min_quality"),
        ("device_order: [gpu, gpu]\n", 1, "device_order"),
        ("context_length: 4096\nmemry: {}\n", 2, "memry"),
        ("quantizations:\n  models:\n    phi4-mini:\n      forbid: [Q2_K]\n      alow: []\n",
         5, "quantizations.models.phi4-mini.alow"),
        ("quantizations:\n  default:\n    allow: Q4_0\n", 3, "quantizations.default.allow"),
    ],
)
def test_policy_errors(tmp_path: Path, text: str, line: int, field: str) -> None:
    path = _policy(tmp_path, text)
    with pytest.raises(PolicyError, match=rf"^{re.escape(str(path))}:{line}: {re.escape(field)}"):
        load_policy(path)


def test_policy_yaml_syntax_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r":2: invalid YAML"):
        load_policy(_policy(tmp_path, "prefer: speed\nmin_quality: Q4_0: Q8_0\n"))


def test_policy_sizes_accept_units(tmp_path: Path) -> None:
    policy = load_policy(_policy(tmp_path, "memory:\n  max_bytes: 4GiB\n  headroom_bytes: 1GB\n"))
    assert policy.memory.max_bytes == 4 * GiB and policy.memory.headroom_bytes == GB


def test_every_policy_field_is_documented() -> None:
    doc = (Path(__file__).parents[1] / "docs" / "selection.md").read_text(encoding="utf-8")

    def fields(model: type[Any], prefix: str = "") -> list[str]:
        out = []
        for name, info in model.model_fields.items():
            out.append(prefix + name)
            assert info.description, f"{prefix}{name} has no description"
            sub = info.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                out += fields(sub, f"{prefix}{name}.")
        return out

    for name in fields(SelectionPolicy):
        assert f"`{name}" in doc, f"{name} is not in docs/selection.md"
