"""Devices for selection: can a variant's device run here, and how much memory may it use.

`judge_device` rules on one (format, target, runtime requirement) combination for a hardware
profile and policy (docs/selection.md §1); `memory_budget` is the budget of §3. Selection
judges each distinct combination once, however many variants share it.
"""

from __future__ import annotations

from typing import NamedTuple

from registry.profile import GpuInfo, HardwareProfile, llama_features_missing
from registry.selection_policy import DeviceClass, SelectionPolicy

__all__ = [
    "MEMORY_UNKNOWN", "DeviceVerdict", "device_class", "judge_device", "llama_build_mismatch",
    "memory_budget", "system_budget",
]

_GPU_TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    # target: (label in messages, GPU vendors that can run it; () = any GPU). Vulkan and
    # DirectML take any GPU, Arm Mali and Qualcomm Adreno included; Metal keeps "other"
    # (Apple), which Mali and Adreno no longer fall under since they have vendors of their own.
    "cuda": ("CUDA", ("nvidia",)),
    "rocm": ("ROCm", ("amd",)),
    "sycl": ("SYCL", ("intel",)),
    "vulkan": ("Vulkan", ()),
    "metal": ("Metal", ("other",)),
    "dml": ("DirectML", ()),
}
_DEFAULT_EP: dict[str, str] = {
    "cuda": "CUDAExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "dml": "DmlExecutionProvider",
    "npu-qualcomm-hexagon": "QNNExecutionProvider",
    "npu-intel-npu": "OpenVINOExecutionProvider",
    "npu-amd-xdna": "VitisAIExecutionProvider",
    "npu-rockchip-rknpu": "RknpuExecutionProvider",
}


def device_class(target: str) -> DeviceClass:
    if target == "cpu":
        return "cpu"
    return "npu" if target.startswith("npu-") else "gpu"


# Why a variant whose budget is system RAM cannot be judged when the RAM size is unknown.
MEMORY_UNKNOWN = "memory unknown: the device reported no RAM size, so no budget"


def system_budget(profile: HardwareProfile, policy: SelectionPolicy) -> int:
    """Bytes of system RAM models may use (CPU, NPU, integrated GPU): the RAM share less the
    headroom kept for the OS, capped by `max_bytes` (the cap is the budget, not a share).

    0 when the RAM size is unknown (`profile.memory.total_bytes` is None); `judge_device`
    then rejects every variant on such a device with `MEMORY_UNKNOWN` instead of comparing
    with 0, so no message ever says "budget is 0 MB" for a device that did not say."""
    mem = policy.memory
    if profile.memory.total_bytes is None:
        return 0
    budget = mem.fraction * profile.memory.total_bytes - mem.headroom_bytes
    if mem.max_bytes is not None:
        budget = min(budget, mem.max_bytes)
    return max(0, int(budget))


def _gpu_for(profile: HardwareProfile, vendors: tuple[str, ...]) -> GpuInfo | None:
    gpus = [g for g in profile.gpus if not vendors or g.vendor in vendors]
    # prefer the discrete GPU with the most memory; shared-memory GPUs last
    gpus.sort(key=lambda g: (g.integrated or g.memory_bytes is None, -(g.memory_bytes or 0)))
    return gpus[0] if gpus else None


def memory_budget(profile: HardwareProfile, policy: SelectionPolicy, target: str = "cpu") -> int:
    """Bytes a variant for `target` may use: GPU memory for a discrete GPU, else system RAM."""
    if device_class(target) == "gpu" and target in _GPU_TARGETS:
        gpu = _gpu_for(profile, _GPU_TARGETS[target][1])
        if gpu is not None and not gpu.integrated and gpu.memory_bytes is not None:
            return max(0, gpu.memory_bytes - policy.memory.gpu_headroom_bytes)
    return system_budget(profile, policy)


class DeviceVerdict(NamedTuple):
    """What selection knows about one (format, target, runtime requirement) combination."""

    reason: str | None  # why it cannot run here; None when it can
    cls: DeviceClass
    rank: int  # position of `cls` in the policy's device_order (its length if left out)
    budget: int
    budget_label: str  # "budget" or "GPU budget", as messages name it
    present: bool  # the device exists here (so a rejection is about runtime, state or size)


def _requirement_reason(req: str, profile: HardwareProfile) -> str | None:
    rt = profile.runtimes
    runtime, _, feature = req.partition(":")
    if runtime == "llama.cpp":
        if not feature or feature == "cpu":
            return None
        if not rt.llama_gpu_offload:
            return f"needs {req}, llama.cpp was built without GPU offload"
        if feature.lower() not in {b.lower() for b in rt.llama_backends}:
            have = ", ".join(rt.llama_backends) or "none"
            return f"needs {req}, llama.cpp backends are: {have}"
        return None
    if runtime == "onnxruntime":
        if not feature or feature == "CPUExecutionProvider" or feature in rt.onnx_providers:
            return None
        return f"needs {req}, not available"
    return f"needs {req}, not available"


def judge_device(
    fmt: str, target: str, req: str | None, profile: HardwareProfile, policy: SelectionPolicy,
    system_budget: int,
) -> DeviceVerdict:
    """Whether variants of format `fmt` for `target` needing `req` can run here, and their
    device's budget (`system_budget` is `system_budget(profile, policy)`, computed once).

    The first reason that applies: the policy's device_order, then the agent's backends for
    the format, then the hardware, then the runtimes.
    """
    verdict = _judge_hardware(fmt, target, req, profile, policy, system_budget)
    backends = profile.runtimes.backends
    if backends is not None and fmt not in backends and verdict.cls in policy.device_order:
        have = ", ".join(backends) or "none"
        return verdict._replace(reason=f"no {fmt} backend in this agent (available: {have})")
    if fmt == "gguf" and verdict.cls in policy.device_order and \
            (missing := llama_features_missing(profile.cpu, profile.runtimes)):
        return verdict._replace(reason=llama_build_mismatch(missing))
    return verdict


def llama_build_mismatch(missing: tuple[str, ...]) -> str:
    """Why GGUF cannot run: the llama.cpp build uses instructions this CPU lacks."""
    return (f"llama.cpp here was built for CPU features this CPU lacks ({', '.join(missing)}) "
            "and would stop with SIGILL: install llama-cpp-python built for this CPU "
            "(GGML_NATIVE=OFF, or built on a machine of this CPU)")


def _judge_hardware(
    fmt: str, target: str, req: str | None, profile: HardwareProfile, policy: SelectionPolicy,
    system_budget: int,
) -> DeviceVerdict:
    cls = device_class(target)
    order = policy.device_order
    rank = order.index(cls) if cls in order else len(order)
    budget, label = system_budget, "budget"
    present = cls == "cpu"

    def out(reason: str | None) -> DeviceVerdict:
        return DeviceVerdict(reason, cls, rank, budget, label, present)

    if cls not in order:
        return out(f"device {cls} excluded by policy (device_order: {', '.join(order)})")
    if cls == "gpu":
        if target not in _GPU_TARGETS:
            return out(f"unknown target {target!r}")
        name, vendors = _GPU_TARGETS[target]
        gpu = _gpu_for(profile, vendors)
        if gpu is None:
            return out(f"needs {name}, none detected")
        present = True
        if not gpu.integrated and gpu.memory_bytes is not None:
            budget, label = memory_budget(profile, policy, target), "GPU budget"
        if fmt == "gguf":
            rt = profile.runtimes
            if not rt.llama_gpu_offload:
                return out(f"needs {name}, llama.cpp was built without GPU offload")
            if target not in {b.lower() for b in rt.llama_backends}:
                have = ", ".join(rt.llama_backends) or "none"
                return out(f"needs {name}, llama.cpp backends are: {have}")
    elif cls == "npu":
        kind = target.removeprefix("npu-")
        npus = [n for n in profile.npus if n.kind == kind]
        if not npus:
            return out(f"needs {kind} NPU, none detected")
        present = True
        if not any(n.online for n in npus):
            detail = next((n.detail for n in npus if n.detail), None)
            why = f" ({detail})" if detail else ""
            return out(f"needs {kind} NPU, present but offline{why}")
        if fmt == "gguf" and req is None:
            return out(f"llama.cpp cannot run on the {kind} NPU")
    if req is None and fmt == "onnx" and cls != "cpu":
        ep = _DEFAULT_EP.get(target)
        req = f"onnxruntime:{ep}" if ep else None
        if req is None:
            return out(f"no onnxruntime execution provider known for {target!r}")
    reason = _requirement_reason(req, profile) if req else None
    if reason is None and label == "budget" and profile.memory.total_bytes is None:
        reason = MEMORY_UNKNOWN  # a size judgment: after every hardware and runtime rule
    return out(reason)
